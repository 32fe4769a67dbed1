"""Wire-level fuzzer: drives a live redis-server 7.0 / valkey-server 9.1 with the module loaded,
sending generated commands as raw RESP (any bytes: NUL, invalid UTF-8, CR/LF, U+0100, huge and
negative numbers, up to 100,000 arguments), mixed with connects, disconnects, RESP3, MULTI,
SUBSCRIBE, tracking, MONITOR, inline commands, ACL users, SELECT, CONFIG SET of every maxage.*
setting, module unload/reload (with refused arguments too) and a replica attaching.

After every step: the server is alive and answers PING within 2 s on the control connection
(CLIENT NO-EVICT on, named fuzz-control; reconnected when something closed it), and, while the
module is loaded, INFO maxage's maxage_tracked_clients equals the number of CLIENT LIST lines
(retried for up to 1 s). On an attached replica the same check allows exactly one missing
client when it is the replica's own link to its master (no client event fires for it; counted
and printed as a note). Every --idle-check-every steps nothing is sent for a second and the
server's CPU must stay below 30% (measured twice before it counts).

A failure (crash, hang, noreply, mismatch, cpu-spin, module) is written with the last 50 steps
(argv base64, plus a readable form), the maxage settings accepted so far, INFO maxage and the
crash report to fuzz/wire-crashes/<flavor>-<timestamp>.json; it is minimized on fresh servers
(the last command alone, then with the settings, then the 50 steps, then chunk removal), and
the run goes on with a fresh server. Exit status 1 if anything failed.

The regression corpus fuzz/wire-regressions/*.json is replayed first, against each server, each
file on a fresh server: {"description", "encoding": "base64"|"hex", "commands": [argv, ...]}
where an argv is a list of encoded arguments (sent on one connection) or {"conn": name,
"argv": [...]} (a new name is a new connection); "@MODULE_PATH@" stands for the module's path;
{"sleep_ms": n} pauses; optional "idle_clients" (connected first, never used), "replica" (true:
a replica with the module is attached first), "checks" (["idle-cpu"]), "repeat" (fresh servers
to try, for failures that show only sometimes) and "servers".

    scripts/wire-fuzz [--server redis|valkey|both] [--commands N] [--seed S] [--seconds T]
                      [--regressions-only] [--no-regressions] [--skip ACTION,...]
                      [--avoid-known-crashers] [--idle-check-every N] [--replay FILE]
"""

import argparse
import base64
import collections
import json
import os
import random
import re
import sys
import time
import traceback

from maxage_tools import processes, servers
from maxage_tools.resp import ConnClosed, ReplyTimeout, RespConn, RespError, encode

# What is sent comes from the grammar (wire_fuzz.py); this file runs it against live servers.
from maxage_tools.wire_fuzz import (
    CHANNELS,
    CONTROL_NAME,
    KEYS,
    LIB_NAMES,
    LIB_VERS,
    NAMES,
    PASSWORD,
    Gen,
    Sanitizer,
)

CRASH_DIR = os.path.join(processes.ROOT, "fuzz", "wire-crashes")
REGRESSION_DIR = os.path.join(processes.ROOT, "fuzz", "wire-regressions")
HISTORY = 50
# In a regression file, this argument stands for the module's path on this machine.
MODULE_PATH_TOKEN = b"@MODULE_PATH@"
PING_TIMEOUT = 2.0
MISMATCH_RETRY_S = 1.0
IDLE_CPU_LIMIT = 0.30
# The main server: full syncs start at once (the default diskless delay is 5 s).
MAIN_CONFIG = ["repl-diskless-sync-delay 0", "maxclients 2000"]


def parse_client_list(text):
    clients = []
    for line in text.split(b"\n"):
        line = line.strip(b"\r")
        if not line:
            continue
        fields = {}
        for part in line.split(b" "):
            key, sep, value = part.partition(b"=")
            if sep:
                fields[key] = value
        clients.append(fields)
    return clients


def info_field(text, field):
    match = re.search(rb"(?m)^" + re.escape(field) + rb":([^\r\n]*)", text)
    return match.group(1) if match else None


def readable(argv, limit=300):
    """A human-readable form of one command (Python bytes escapes), shortened when huge."""
    if len(argv) > 12:
        head = " ".join(_readable_arg(a) for a in argv[:8])
        return f"{head} ... ({len(argv)} arguments in all)"
    text = " ".join(_readable_arg(a) for a in argv)
    return text if len(text) <= limit else text[:limit] + "..."


def _readable_arg(arg):
    if arg and re.fullmatch(rb"[\x21-\x7e]+", arg) and b'"' not in arg and b"\\" not in arg:
        return arg.decode()
    try:
        text = arg.decode("utf-8")
        if all(c.isprintable() for c in text) and "\x00" not in text:
            return json.dumps(text, ensure_ascii=False)
    except UnicodeDecodeError:
        pass
    return '"' + "".join(_byte_escape(b) for b in arg) + '"'


def _byte_escape(b):
    if 0x20 <= b < 0x7F and b not in (0x22, 0x5C):
        return chr(b)
    return f"\\x{b:02x}"


def _inline_escape(byte):
    if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C):
        return bytes([byte])
    return b"\\x%02x" % byte


def crash_excerpt(log, tail=3000):
    """The parts of a server log that say why it died: the lines before the crash report,
    its stack trace, any Rust panic, and the end of the log."""
    parts = []
    start = log.find("=== REDIS BUG REPORT START")
    if start < 0:
        start = log.find("=== VALKEY BUG REPORT START")
    if start >= 0:
        before = log[:start].splitlines()[-30:]
        parts.append("\n".join(before))
        trace = log.find("------ STACK TRACE ------", start)
        if trace >= 0:
            end = log.find("------ INFO OUTPUT ------", trace)
            parts.append(log[trace : end if end > 0 else trace + 6000])
    panic = log.find("panicked at")
    if panic >= 0:
        parts.append(log[max(0, panic - 200) : panic + 3000])
    parts.append(log[-tail:])
    return "\n...\n".join(parts)


def b64(arg):
    return base64.b64encode(arg).decode()


def unb64(text):
    return base64.b64decode(text)


# Failures ----------------------------------------------------------------------------------


class Failure(Exception):
    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


# Frames of the server's idle background threads, which the crash report lists too.
IDLE_THREAD_FRAMES = {
    "pthread_cond_wait",
    "mutexQueuePop",
    "bioProcessBackgroundJobs",
    "__libc_start_main",
    "main",
    "_start",
}


def crash_signature(log):
    """A short, stable description of why the server died, from its log and stderr."""
    parts = []
    match = re.search(r"panicked at ([^\n]*?):\d+:\d+:\n([^\n]*)", log)
    if match:
        location = match.group(1).split("/src/", 1)[-1]
        message = re.sub(r"\(\d.*", "(..)", match.group(2))[:120]
        parts.append(f"panic at {location}: {message}")
        frames = re.findall(r"\n\s+\d+: (redis_maxage::[^\n]*)", log)
        if frames:
            parts.append(f"in {frames[0].strip()}")
    else:
        sig = re.search(r"crashed by signal: (\d+)", log)
        if sig:
            parts.append(f"signal {sig.group(1)}")
        trace = log.find("STACK TRACE")
        if trace >= 0:
            names = [
                name
                for name in re.findall(r"\((\w+)\+0x[0-9a-f]+\)", log[trace : trace + 20000])
                if name not in IDLE_THREAD_FRAMES
            ]
            if names:
                parts.append("in " + " < ".join(names[:3]))
        assertion = re.search(r"ASSERTION FAILED[^\n]*\n[^\n]*", log)
        if assertion:
            parts.append(assertion.group(0).replace("\n", " ")[:160])
        frames = re.findall(r"(libredis_maxage\.so\([^)\n]*\))", log)
        if frames:
            parts.append("at " + frames[0])
    return "; ".join(parts) or "no crash report in the log"


# The harness -------------------------------------------------------------------------------


class Worker:
    def __init__(self, name, conn, resp3):
        self.name = name
        self.conn = conn
        self.resp3 = resp3
        self.subscribed = False
        self.monitor = False
        self.age = 0


class Node:
    """One server with its control connection and the per-step checks."""

    def __init__(self, flavor, module_args=(), extra_config=(), label="main"):
        self.flavor = flavor
        self.label = label
        self.server = servers.Server(
            flavor, module_args=module_args, extra_config=extra_config, prefix="maxage-wfuzz-"
        )
        self.module_loaded = True
        self.control = None
        self.control_reconnects = 0
        self.last_clients = []
        self.last_info = b""
        self.connect_control()

    @property
    def port(self):
        return self.server.port

    def connect_control(self):
        if self.control is not None:
            self.control.close()
        try:
            conn = RespConn(self.port, timeout=PING_TIMEOUT)
            conn.send(
                encode([b"CLIENT", b"NO-EVICT", b"on"])
                + encode([b"CLIENT", b"SETNAME", CONTROL_NAME])
            )
            conn.read(PING_TIMEOUT)
            conn.read(PING_TIMEOUT)
        except ConnClosed as err:
            self.control = None
            raise self.crash_failure(f"a fresh connection to {self.label} failed: {err}") from err
        except ReplyTimeout as err:
            self.control = None
            raise self.crash_failure(
                f"a fresh connection to {self.label} got no reply in {PING_TIMEOUT} s"
            ) from err
        self.control = conn

    def crash_failure(self, what=None):
        """A crash if the process exits within 3 s (it may still be writing its crash
        report), else a hang."""
        deadline = time.monotonic() + 3
        while self.server.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        code = self.server.returncode()
        if code is None:
            return Failure("hang", what or f"{self.label} server is alive but does not answer")
        return Failure(
            "crash",
            f"{self.label} server exited with status {code}: {crash_signature(self.server.log())}",
        )

    def control_call(self, argv, timeout=PING_TIMEOUT):
        """A command on the control connection, reconnecting when the server closed it (a
        closed control connection is no failure, a server that does not answer is)."""
        for _attempt in range(3):
            if self.control is None or self.control.closed:
                self.connect_control()
                self.control_reconnects += 1
            try:
                return self.control.call(argv, timeout)
            except ConnClosed:
                if not self.server.alive():
                    raise self.crash_failure() from None
                self.control = None
                continue
            except ReplyTimeout:
                raise self.hang_failure(f"no reply in {timeout} s to {readable(argv)}") from None
        raise Failure("hang", f"the control connection to {self.label} keeps being closed")

    def hang_failure(self, what):
        if not self.server.alive():
            return self.crash_failure()
        fresh = servers.ping(self.port, timeout=PING_TIMEOUT)
        cpu0 = self.server.cpu_seconds()
        time.sleep(0.5)
        cpu1 = self.server.cpu_seconds()
        cpu = "?" if cpu0 is None or cpu1 is None else f"{(cpu1 - cpu0) / 0.5:.0%}"
        if fresh:
            return Failure("noreply", f"{self.label}: {what} (a fresh connection answers PING)")
        return self.crash_failure(
            f"{self.label}: {what}; a fresh connection gets no PONG; cpu {cpu}"
        )

    def snapshot(self):
        """PING, INFO maxage and CLIENT LIST in one round trip."""
        pipeline = encode([b"PING"]) + encode([b"INFO", b"maxage"]) + encode([b"CLIENT", b"LIST"])
        for _attempt in range(4):
            if self.control is None or self.control.closed:
                self.connect_control()
                self.control_reconnects += 1
            try:
                self.control.send(pipeline)
                pong = self.control.read_reply(PING_TIMEOUT)
                info = self.control.read_reply(PING_TIMEOUT)
                client_list = self.control.read_reply(PING_TIMEOUT)
            except ConnClosed:
                if not self.server.alive():
                    raise self.crash_failure() from None
                self.control = None
                continue
            except ReplyTimeout:
                raise self.hang_failure("no PONG within 2 s on the control connection") from None
            if pong != b"PONG" or not isinstance(info, bytes) or not isinstance(client_list, bytes):
                # Out of step (e.g. a reply left over): start a fresh control connection.
                self.control.close()
                self.control = None
                continue
            return info, client_list
        raise Failure("hang", f"the control connection to {self.label} keeps being closed")

    def check(self, allow_untracked_master_link=False):
        """Alive, answering, and (module loaded) registry == CLIENT LIST. Returns a note when a
        replica's master link is the only difference (see allow_untracked_master_link)."""
        deadline = time.monotonic() + MISMATCH_RETRY_S
        while True:
            info, client_list = self.snapshot()
            self.last_info = info
            clients = parse_client_list(client_list)
            self.last_clients = clients
            if not self.module_loaded:
                return None
            tracked = info_field(info, b"maxage_tracked_clients")
            if tracked is None:
                raise Failure("module", f"{self.label}: INFO maxage has no tracked_clients")
            tracked = int(tracked)
            if tracked == len(clients):
                return None
            master_links = sum(1 for c in clients if b"M" in c.get(b"flags", b""))
            if allow_untracked_master_link and master_links and tracked == len(clients) - 1:
                return "master-link-untracked"
            if time.monotonic() > deadline:
                detail = " ".join(
                    f"id={c.get(b'id', b'?').decode()}/flags={c.get(b'flags', b'?').decode()}"
                    for c in clients[:20]
                )
                raise Failure(
                    "mismatch",
                    f"{self.label}: maxage_tracked_clients={tracked} but CLIENT LIST has "
                    f"{len(clients)} lines ({detail})",
                )
            time.sleep(0.02)

    def idle_cpu(self, seconds=1.0):
        before = self.server.cpu_seconds()
        time.sleep(seconds)
        after = self.server.cpu_seconds()
        if before is None or after is None:
            raise self.crash_failure()
        return (after - before) / seconds

    def stop(self):
        if self.control is not None:
            self.control.close()
        self.server.stop()


class Stats:
    FIELDS = (
        "commands",
        "connects",
        "config_sets",
        "kills",
        "module_reloads",
        "replica_attaches",
        "failures",
    )

    def __init__(self):
        self.counts = collections.Counter()
        self.notes = collections.Counter()
        self.signatures = collections.Counter()
        self.minimal = {}

    def add(self, field, n=1):
        self.counts[field] += n


class Fuzzer:
    def __init__(
        self, flavor, seed, avoid_known=False, crash_dir=CRASH_DIR, idle_every=4000, skip=()
    ):
        self.skip = set(skip)
        self.flavor = flavor
        self.seed = seed
        self.rng = random.Random(f"{flavor}-{seed}")
        self.gen = Gen(self.rng)
        self.sanitize = Sanitizer(avoid_known)
        self.crash_dir = crash_dir
        self.idle_every = idle_every
        self.stats = Stats()
        self.history = collections.deque(maxlen=HISTORY)
        self.step_no = 0
        self.node = None
        self.replica = None
        self.replica_steps = 0
        self.workers = {}
        self.idle_sockets = []
        self.config_state = {}  # maxage.<name> -> value last accepted by CONFIG SET
        self.acl_users = set()
        self.minimize_s = 60.0  # Time left for minimizing failures in this run.
        self.attempted = set()  # Failure signatures already minimized (or tried).

    # Setup ----------------------------------------------------------------------------------

    def start(self):
        self.node = Node(self.flavor, extra_config=MAIN_CONFIG)
        self.workers = {}
        self.idle_sockets = []
        self.config_state = {}
        self.acl_users = set()

    def teardown(self):
        for worker in self.workers.values():
            worker.conn.close()
        self.workers = {}
        for sock in self.idle_sockets:
            sock.close()
        self.idle_sockets = []
        if self.replica is not None:
            self.replica.stop()
            self.replica = None
        if self.node is not None:
            self.node.stop()
            self.node = None

    # History --------------------------------------------------------------------------------

    def record(self, conn, argv=None, action="command", **extra):
        entry = {"step": self.step_no, "conn": conn, "action": action}
        if argv is not None:
            entry["argv"] = argv
        entry.update(extra)
        self.history.append(entry)
        return entry

    # Connections ----------------------------------------------------------------------------

    def connect_worker(self, name=None):
        if name is None:
            name = f"w{self.rng.randrange(12)}"
        old = self.workers.pop(name, None)
        if old is not None:
            old.conn.close()
        resp3 = self.gen.chance(0.4)
        hello = None
        if resp3:
            hello = [b"HELLO", b"3"]
            if self.gen.chance(0.2):
                hello += [b"SETNAME", self.gen.value(NAMES)]
            if self.gen.chance(0.1) and self.acl_users:
                hello += [b"AUTH", self.gen.pick(sorted(self.acl_users)), PASSWORD]
        self.record(name, action="connect", resp3=resp3)
        self.stats.add("connects")
        try:
            conn = RespConn(self.node.port, timeout=PING_TIMEOUT)
        except ConnClosed as err:
            raise self.node.crash_failure(f"cannot connect: {err}") from err
        worker = Worker(name, conn, resp3)
        self.workers[name] = worker
        if hello is not None:
            self.send(worker, hello)
        return worker

    def any_worker(self):
        live = [w for w in self.workers.values() if not w.conn.closed and not w.monitor]
        if not live or self.gen.chance(0.05):
            return self.connect_worker()
        return self.gen.pick(sorted(live, key=lambda w: w.name))

    def send(self, worker, argv, replies=1, target=None):
        """Send one generated command on a worker and read its replies. A closed connection is
        no failure (kills close workers); a reply that never comes is."""
        node = target or self.node
        argv = self.sanitize(argv)
        self.record(worker.name if target is None else "replica", argv)
        self.stats.add("commands")
        if worker.conn.closed:
            return None
        worker.conn.drain()
        reply = None
        try:
            worker.conn.send_command(argv)
            for _ in range(replies):
                reply = worker.conn.read_reply(PING_TIMEOUT, skip_messages=worker.subscribed)
        except ConnClosed:
            return None
        except ReplyTimeout:
            worker.conn.close()
            raise node.hang_failure(f"no reply to {readable(argv)}") from None
        return reply

    def control(self, argv, node=None):
        node = node or self.node
        argv = self.sanitize(argv)
        self.record("control" if node is self.node else "replica-control", argv)
        self.stats.add("commands")
        return node.control_call(argv)

    # Actions --------------------------------------------------------------------------------

    def act_kill(self):
        argv = self.gen.kill_command()
        self.stats.add("kills")
        if self.gen.chance(0.05):
            self.control(argv)
        else:
            self.send(self.any_worker(), argv)

    def act_huge(self):
        head = self.gen.pick(
            [
                [b"MAXAGE.KILL"],
                [b"MAXAGE.LIST"],
                [b"CLIENT", b"KILL"],
                [b"MAXAGE.CLIENTKILL", b"KILL"],
            ]
        )
        self.stats.add("kills")
        self.send(self.any_worker(), head + self.gen.huge_filters())

    def act_list(self):
        argv = [b"MAXAGE.LIST"] + self.gen.filters(allow_list=True)
        self.send(self.any_worker(), argv)

    def act_preview(self):
        self.send(self.any_worker(), self.gen.preview())

    def act_self_request(self):
        self.send(self.any_worker(), self.gen.self_request())

    def act_config_set(self):
        argv = self.gen.config_set()
        self.stats.add("config_sets")
        if self.gen.chance(0.85):
            reply = self.control(argv)
        else:
            reply = self.send(self.any_worker(), argv)
        if reply == b"OK":
            for i in range(2, len(argv) - 1, 2):
                self.config_state[argv[i].lower()] = argv[i + 1]

    def act_config_get(self):
        pattern = self.gen.pick(
            [b"maxage.*", b"maxage.rules", b"maxage.exempt-*", b"*max*", self.gen.junk()]
        )
        self.send(self.any_worker(), [b"CONFIG", b"GET", pattern])

    def act_config_rewrite(self):
        self.control([b"CONFIG", b"REWRITE"])

    def act_connect(self):
        self.connect_worker()

    def act_disconnect(self):
        live = sorted(self.workers)
        if live:
            worker = self.workers.pop(self.gen.pick(live))
            self.record(worker.name, action="disconnect")
            worker.conn.close()

    def act_idle_sockets(self):
        if self.gen.chance(0.5) or not self.idle_sockets:
            n = self.gen.rng.randint(1, 20)
            self.record("idle", action="idle-open", count=n)
            for _ in range(n):
                if len(self.idle_sockets) >= 60:
                    break
                try:
                    self.idle_sockets.append(RespConn(self.node.port, timeout=PING_TIMEOUT))
                except ConnClosed:
                    break
                self.stats.add("connects")
        else:
            n = self.gen.rng.randint(1, len(self.idle_sockets))
            self.record("idle", action="idle-close", count=n)
            for sock in self.idle_sockets[:n]:
                sock.close()
            del self.idle_sockets[:n]

    def act_setname(self):
        self.send(self.any_worker(), [b"CLIENT", b"SETNAME", self.gen.value(NAMES)])

    def act_setinfo(self):
        field = self.gen.pick([b"LIB-NAME", b"LIB-VER"])
        value = self.gen.value(LIB_NAMES if field == b"LIB-NAME" else LIB_VERS)
        self.send(self.any_worker(), [b"CLIENT", b"SETINFO", field, value])

    def act_multi(self):
        worker = self.any_worker()
        self.send(worker, [b"MULTI"])
        for _ in range(self.gen.rng.randint(0, 4)):
            sub = self.gen.pick(
                [
                    self.gen.kill_command,
                    lambda: [b"MAXAGE.LIST"] + self.gen.filters(allow_list=True),
                    self.gen.preview,
                    self.gen.config_set,
                    lambda: [b"SET", self.gen.pick(KEYS), b"v"],
                ]
            )()
            self.send(worker, sub)
        self.send(worker, [b"EXEC"] if self.gen.chance(0.85) else [b"DISCARD"])

    def act_subscribe(self):
        worker = self.any_worker()
        channels = [self.gen.pick(CHANNELS) for _ in range(self.gen.rng.randint(1, 3))]
        command = b"PSUBSCRIBE" if self.gen.chance(0.2) else b"SUBSCRIBE"
        argv = self.sanitize([command] + channels)
        self.record(worker.name, argv)
        self.stats.add("commands")
        if worker.conn.closed:
            return
        try:
            worker.conn.send_command(argv)
            for _ in channels:
                # Confirmations are pushes under RESP3; an error (NOPERM) is the only reply.
                if isinstance(worker.conn.read(PING_TIMEOUT), RespError):
                    break
            else:
                worker.subscribed = True
        except ConnClosed:
            pass
        except ReplyTimeout:
            worker.conn.close()
            raise self.node.hang_failure(f"no reply to {readable(argv)}") from None

    def act_tracking(self):
        worker = self.any_worker()
        argv = [b"CLIENT", b"TRACKING", b"on"]
        if self.gen.chance(0.6):
            argv += [b"REDIRECT", self.gen.value(self.gen.ids())]
        if self.gen.chance(0.2):
            argv += [b"BCAST"] + ([b"PREFIX", b"k"] if self.gen.chance(0.5) else [])
        if self.gen.chance(0.2):
            argv.append(self.gen.pick([b"OPTIN", b"OPTOUT", b"NOLOOP"]))
        self.send(worker, argv)
        self.send(worker, [b"GET", self.gen.pick(KEYS)])

    def act_traffic(self):
        worker = self.any_worker()
        argv = self.gen.pick(
            [
                [b"SET", self.gen.pick(KEYS), self.gen.value([b"v"])],
                [b"GET", self.gen.pick(KEYS)],
                [b"PING"],
                [b"PUBLISH", self.gen.pick(CHANNELS), b"hello"],
                [b"CLIENT", b"ID"],
                [b"CLIENT", b"INFO"],
                [b"RESET"],
            ]
        )
        reply = self.send(worker, argv)
        if argv == [b"RESET"] and reply == b"RESET":
            worker.subscribed = False
            worker.resp3 = False

    def act_no_evict(self):
        self.send(self.any_worker(), [b"CLIENT", b"NO-EVICT", self.gen.value([b"on", b"off"])])

    def act_select(self):
        self.send(self.any_worker(), [b"SELECT", self.gen.number(0, 20)])

    def act_acl(self):
        user = self.gen.pick([b"fuzzuser", b"fuzzro"])
        if self.gen.chance(0.1):
            self.control([b"ACL", b"DELUSER", user])
            self.acl_users.discard(user)
            return
        argv = [b"ACL", b"SETUSER", user, b"reset", b"on", b">" + PASSWORD, b"~*", b"&*"]
        reply = self.control(argv + self.gen.acl_rules())
        if reply == b"OK":
            self.acl_users.add(user)
        worker = self.any_worker()
        password = PASSWORD if self.gen.chance(0.9) else self.gen.junk()
        self.send(worker, [b"AUTH", user, password])
        for _ in range(self.gen.rng.randint(1, 3)):
            sub = self.gen.pick(
                [self.gen.kill_command, self.gen.preview, self.gen.config_set, lambda: [b"PING"]]
            )()
            self.send(worker, sub)

    def act_monitor(self):
        worker = self.connect_worker()
        self.send(worker, [b"MONITOR"])
        worker.monitor = True

    def act_inline(self):
        """The same commands as an inline (telnet-style) line, quoting and all."""
        worker = self.any_worker()
        argv = self.gen.pick([self.gen.kill_command, self.gen.preview, self.gen.config_set])()
        # Inside double quotes the server's inline parser takes \xNN escapes; a raw NUL would
        # end the line early for it (it looks for the newline with strchr).
        argv = self.sanitize(argv)
        line = b" ".join(b'"' + b"".join(_inline_escape(c) for c in a) + b'"' for a in argv)
        self.record(worker.name, action="inline", raw=line)
        self.stats.add("commands")
        if worker.conn.closed:
            return
        try:
            worker.conn.send(line + b"\r\n")
            worker.conn.read_reply(PING_TIMEOUT)
        except ConnClosed:
            pass
        except ReplyTimeout:
            worker.conn.close()
            raise self.node.hang_failure(f"no reply to inline {line[:200]!r}") from None

    def act_sleep(self):
        ms = self.gen.pick([1, 2, 5, 10, 30, 100])
        self.record("-", action="sleep", ms=ms)
        time.sleep(ms / 1000)

    def act_module_reload(self):
        self.stats.add("module_reloads")
        node = self.node
        if self.gen.chance(0.7):
            # The module refuses to unload while a client's last command was one of its own
            # (the server would keep a pointer to the unloaded command): usually clear that.
            for worker in list(self.workers.values()):
                self.send(worker, [b"PING"])
        reply = self.control([b"MODULE", b"UNLOAD", b"maxage"])
        if isinstance(reply, RespError) and b"ACL users" in reply.message:
            # Valkey refuses while an ACL user names one of the module's commands.
            for user in sorted(self.acl_users):
                self.control([b"ACL", b"DELUSER", user])
            self.acl_users = set()
            reply = self.control([b"MODULE", b"UNLOAD", b"maxage"])
        if reply != b"OK":
            if isinstance(reply, RespError) and node.module_loaded:
                self.stats.notes[f"MODULE UNLOAD refused: {reply.message[:80]!r}"] += 1
            return
        node.module_loaded = False
        self.config_state = {}
        path = processes.module_path().encode()
        reply = self.control([b"MODULE", b"LOAD", path] + self.gen.module_args())
        if reply != b"OK":
            # A refused load must leave nothing behind: let a client connect and run a command
            # before loading again (a reload straight away can hide what the refusal left).
            if self.gen.chance(0.5):
                self.send(self.connect_worker(), [b"PING"])
                self.check()
            reply = self.control([b"MODULE", b"LOAD", path] + self.gen.valid_module_args())
        if reply != b"OK":
            raise Failure("module", f"MODULE LOAD with valid arguments failed: {reply!r}")
        node.module_loaded = True

    def act_replica(self):
        if self.replica is None:
            self.stats.add("replica_attaches")
            self.record("replica", action="replica-start")
            self.replica = Node(self.flavor, extra_config=MAIN_CONFIG, label="replica")
            self.replica_steps = 0
            port = str(self.node.port).encode()
            self.control([b"REPLICAOF", b"127.0.0.1", port], node=self.replica)
            return
        if self.gen.chance(0.5):
            self.control([b"REPLICAOF", b"NO", b"ONE"], node=self.replica)
            self.record("replica", action="replica-stop")
            self.replica.stop()
            self.replica = None
        else:
            # Something generated, on the replica, from a connection of its own.
            argv = self.gen.pick([self.gen.kill_command, self.gen.preview, self.gen.config_set])()
            self.record("replica", argv)
            self.stats.add("commands")
            try:
                conn = RespConn(self.replica.port, timeout=PING_TIMEOUT)
            except ConnClosed as err:
                raise self.replica.crash_failure() from err
            try:
                conn.call(self.sanitize(argv), PING_TIMEOUT)
            except ConnClosed:
                pass
            except ReplyTimeout:
                raise self.replica.hang_failure(f"no reply to {readable(argv)}") from None
            finally:
                conn.close()

    ACTIONS = (
        ("kill", 24),
        ("list", 9),
        ("preview", 6),
        ("self_request", 5),
        ("config_set", 12),
        ("config_get", 2),
        ("config_rewrite", 0.1),
        ("connect", 7),
        ("disconnect", 4),
        ("idle_sockets", 2),
        ("setname", 4),
        ("setinfo", 2),
        ("multi", 3),
        ("subscribe", 1.5),
        ("tracking", 2),
        ("traffic", 5),
        ("no_evict", 1.5),
        ("select", 1.5),
        ("acl", 1.2),
        ("monitor", 0.15),
        ("inline", 1),
        ("sleep", 1.2),
        ("huge", 0.04),
        ("module_reload", 0.12),
        ("replica", 0.25),
    )

    def step(self):
        names = [a for a, _ in self.ACTIONS if a not in self.skip]
        weights = [w for a, w in self.ACTIONS if a not in self.skip]
        action = self.rng.choices(names, weights)[0]
        self.current_action = action
        getattr(self, "act_" + action)()
        for worker in list(self.workers.values()):
            worker.age += 1
            if worker.monitor:
                worker.conn.drain()
                if worker.age > 20:
                    worker.conn.close()
                    del self.workers[worker.name]
        self.check()

    def check(self):
        self.node.check()
        self.gen.clients = self.node.last_clients
        if self.replica is not None:
            self.replica_steps += 1
            note = self.replica.check(allow_untracked_master_link=True)
            if note:
                self.stats.notes[
                    "replica: maxage_tracked_clients = CLIENT LIST lines - 1, the missing one "
                    "being the replica's link to its master (flags=M; no client event fires for it)"
                ] += 1

    def idle_check(self):
        """With nothing sent for a second, the server must be (nearly) idle."""
        self.record("-", action="idle-cpu-check")
        time.sleep(0.2)
        cpu = self.node.idle_cpu(1.0)
        if cpu > IDLE_CPU_LIMIT:
            # A spin lasts: look once more before calling it one (and keep what INFO said).
            self.node.check()
            cpu = min(cpu, self.node.idle_cpu(1.0))
        if cpu > IDLE_CPU_LIMIT:
            failure = Failure(
                "cpu-spin",
                f"server CPU {cpu:.0%} over 1 s with nothing sent (limit {IDLE_CPU_LIMIT:.0%}); "
                f"maxage config set: {self._config_text()}",
            )
            # Which clients the module is busy with: MAXAGE.LIST and CLIENT LIST, as they are.
            failure.extra = {}
            for key, argv in (
                ("maxage_list", [b"MAXAGE.LIST"]),
                ("client_list", [b"CLIENT", b"LIST"]),
            ):
                try:
                    failure.extra[key] = repr(self.node.control_call(argv))
                except Failure:
                    pass
            raise failure

    def _config_text(self):
        return " ".join(f"{k.decode()}={readable([v])}" for k, v in self.config_state.items())

    # Failure handling -----------------------------------------------------------------------

    def handle_failure(self, failure):
        self.stats.add("failures")
        log = self.node.server.log() if self.node else ""
        if self.replica is not None and failure.message.startswith("replica"):
            log = self.replica.server.log()
        signature = failure.kind
        if failure.kind == "crash":
            signature = "crash: " + crash_signature(log)
        elif failure.kind in ("mismatch", "cpu-spin", "hang", "noreply", "module"):
            signature = failure.kind
        self.stats.signatures[signature] += 1
        steps = list(self.history)
        config_state = dict(self.config_state)
        last_info = self.node.last_info.decode("utf-8", "replace") if self.node else ""
        self.teardown()
        minimal = None
        if self.minimize_s > 0 and signature not in self.attempted:
            self.attempted.add(signature)
            began = time.monotonic()
            minimal = minimize(
                self.flavor, failure.kind, steps, config_state, budget_s=min(15, self.minimize_s)
            )
            self.minimize_s -= time.monotonic() - began
            if minimal is not None:
                self.stats.minimal[signature] = minimal
        path = write_crash(
            self.crash_dir,
            self.flavor,
            {
                "flavor": self.flavor,
                "seed": self.seed,
                "step": self.step_no,
                "kind": failure.kind,
                "message": failure.message,
                "signature": signature,
                "config_state": {k.decode(): b64(v) for k, v in config_state.items()},
                "minimal": encode_steps(minimal) if minimal else None,
                "minimal_readable": [readable_step(s) for s in minimal] if minimal else None,
                "info_maxage_at_last_check": last_info,
                **getattr(failure, "extra", {}),
                "log_excerpt": crash_excerpt(log),
                "steps": encode_steps(steps),
            },
        )
        print(f"FAILURE [{self.flavor}] step {self.step_no}: {failure.kind}: {failure.message}")
        if minimal:
            print("  minimal reproducer (fresh server):")
            for entry in minimal:
                print(f"    {readable_step(entry)}")
        else:
            last = next((s for s in reversed(steps) if "argv" in s), None)
            if last:
                print(f"  last command: {readable(last['argv'])} (not reproduced alone)")
        print(f"  written to {os.path.relpath(path)}")
        self.start()

    # The run --------------------------------------------------------------------------------

    def run(self, commands, seconds):
        start = time.monotonic()
        self.start()
        next_idle = self.idle_every
        try:
            while self.stats.counts["commands"] < commands:
                if seconds and time.monotonic() - start > seconds:
                    break
                self.step_no += 1
                try:
                    self.step()
                    if self.idle_every and self.step_no >= next_idle:
                        next_idle += self.idle_every
                        self.idle_check()
                except Failure as failure:
                    self.handle_failure(failure)
                except servers.ServerError as err:
                    # A server that does not start at all: say so and try once more.
                    self.stats.add("failures")
                    self.stats.signatures[f"server did not start: {str(err)[:200]}"] += 1
                    print(f"FAILURE [{self.flavor}] step {self.step_no}: {err}")
                    self.teardown()
                    self.start()
                except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError):
                    # A bug in the fuzzer itself: loud, counted, and the run goes on.
                    self.stats.add("harness_errors")
                    print(f"HARNESS ERROR [{self.flavor}] step {self.step_no}:")
                    traceback.print_exc()
                    self.teardown()
                    self.start()
        finally:
            self.teardown()
        return time.monotonic() - start


# Steps on disk and replay ------------------------------------------------------------------


def encode_steps(steps):
    out = []
    for entry in steps:
        entry = dict(entry)
        if "argv" in entry:
            entry["readable"] = readable(entry["argv"])
            entry["argv"] = [b64(a) for a in entry["argv"]]
        if "raw" in entry:
            entry["raw"] = b64(entry["raw"])
        out.append(entry)
    return out


def readable_step(entry):
    if "argv" in entry:
        return f"[{entry['conn']}] {readable(entry['argv'])}"
    if "raw" in entry:
        return f"[{entry['conn']}] inline {entry['raw'][:200]!r}"
    extra = {k: v for k, v in entry.items() if k not in ("step", "conn", "action")}
    return f"[{entry['conn']}] {entry['action']} {extra if extra else ''}".rstrip()


def write_crash(directory, flavor, payload):
    os.makedirs(directory, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 0
    while True:
        path = os.path.join(directory, f"{flavor}-{stamp}{'-' + str(n) if n else ''}.json")
        if not os.path.exists(path):
            break
        n += 1
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    return path


def replay(
    flavor, steps, idle_clients=0, checks=("alive", "registry"), quiet_ms=200, replica=False
):
    """Replays steps on a fresh server. Returns None when every check passed, else the
    Failure. Connections named in the steps are opened as needed; control/replica steps run
    on one connection of their own; the fuzzer's replica attaches are skipped, but with
    replica=True a replica (module loaded) is attached before the first step."""
    node = Node(flavor, extra_config=MAIN_CONFIG, label="main")
    replica_node = None
    conns = {}
    idle = []
    try:
        try:
            if replica:
                replica_node = Node(flavor, extra_config=MAIN_CONFIG, label="replica")
                port = str(node.port).encode()
                replica_node.control_call([b"REPLICAOF", b"127.0.0.1", port])
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    info = replica_node.control_call([b"INFO", b"replication"])
                    if b"master_link_status:up" in info:
                        break
                    time.sleep(0.02)
            for _ in range(idle_clients):
                idle.append(RespConn(node.port))
            # Connections die with the server: a crash shows up as ConnClosed anywhere.
            for entry in steps:
                action = entry.get("action", "command")
                name = entry.get("conn", "w0")
                if name.startswith("replica"):
                    continue
                if action == "connect":
                    if name in conns:
                        conns.pop(name).close()
                    continue
                if action == "disconnect":
                    if name in conns:
                        conns.pop(name).close()
                    continue
                if action == "sleep":
                    time.sleep(entry.get("ms", 0) / 1000)
                    continue
                if action == "idle-open":
                    for _ in range(entry.get("count", 1)):
                        idle.append(RespConn(node.port))
                    continue
                if "argv" not in entry and "raw" not in entry:
                    continue
                conn = conns.get(name)
                if conn is None or conn.closed:
                    try:
                        conn = conns[name] = RespConn(node.port)
                    except ConnClosed as err:
                        raise node.crash_failure(f"cannot connect: {err}") from err
                data = entry["raw"] + b"\r\n" if "raw" in entry else encode(entry["argv"])
                try:
                    conn.send(data)
                    frame = conn.read(PING_TIMEOUT)
                    if "argv" in entry and entry["argv"][0].upper() in (
                        b"SUBSCRIBE",
                        b"PSUBSCRIBE",
                    ):
                        for _ in entry["argv"][2:]:
                            frame = conn.read(PING_TIMEOUT)
                    del frame
                    argv0 = entry.get("argv", [b""])[0].upper()
                    if argv0 == b"MODULE" and entry["argv"][1].upper() in (b"UNLOAD", b"LOAD"):
                        node.module_loaded = b"maxage_tracked_clients" in node.control_call(
                            [b"INFO", b"maxage"]
                        )
                except ConnClosed:
                    pass
                except ReplyTimeout:
                    conn.close()
                    raise node.hang_failure(f"no reply to {readable_step(entry)}") from None
                if not node.server.alive():
                    raise node.crash_failure()
                if "registry" in checks:
                    node.check()
            time.sleep(quiet_ms / 1000)
            if "registry" in checks or "alive" in checks:
                node.check()
            if "idle-cpu" in checks:
                cpu = node.idle_cpu(1.0)
                if cpu > IDLE_CPU_LIMIT:
                    raise Failure(
                        "cpu-spin",
                        f"server CPU {cpu:.0%} over 1 s with {idle_clients} idle client(s) "
                        f"(limit {IDLE_CPU_LIMIT:.0%})",
                    )
                node.check()
        except ConnClosed as err:
            failure = node.crash_failure(f"cannot connect: {err}")
            failure.log = node.server.log()
            return failure
        except Failure as failure:
            failure.log = node.server.log()
            return failure
        return None
    finally:
        for conn in list(conns.values()) + idle:
            conn.close()
        node.stop()
        if replica_node is not None:
            replica_node.stop()


def minimize(flavor, kind, steps, config_state, budget_s=20.0):
    """The smallest list of steps found that fails the same way on a fresh server, or None."""
    deadline = time.monotonic() + budget_s
    commands = [s for s in steps if "argv" in s or "raw" in s]
    if not commands:
        return None
    checks = ("alive", "registry", "idle-cpu") if kind == "cpu-spin" else ("alive", "registry")
    idle = 1 if kind == "cpu-spin" else 0

    def fails(candidate):
        # Twice before saying no: some failures show only on some fresh servers.
        for _attempt in range(2):
            if time.monotonic() > deadline:
                return False
            try:
                failure = replay(flavor, candidate, idle_clients=idle, checks=checks)
            except servers.ServerError:
                return False
            if failure is not None and failure.kind == kind:
                return True
        return False

    config_steps = [
        {"conn": "control", "action": "command", "argv": [b"CONFIG", b"SET", name, value]}
        for name, value in config_state.items()
    ]
    last = commands[-1]
    candidates = [[last], config_steps + [last]] if kind != "cpu-spin" else [config_steps]
    for candidate in candidates:
        if candidate and fails(candidate):
            return ddmin(candidate, fails)
    if fails(steps):
        return ddmin(steps, fails)
    return None


def ddmin(steps, fails):
    """Delta debugging (chunk removal) down to a list where removing any one chunk passes."""
    chunk = max(1, len(steps) // 2)
    while chunk >= 1 and len(steps) > 1:
        i = 0
        removed = False
        while i < len(steps):
            candidate = steps[:i] + steps[i + chunk :]
            if candidate and fails(candidate):
                steps = candidate
                removed = True
            else:
                i += chunk
        if not removed:
            if chunk == 1:
                break
            chunk //= 2
    return steps


# The regression corpus ---------------------------------------------------------------------


def load_regressions(directory=REGRESSION_DIR):
    out = []
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(directory, name)) as f:
            data = json.load(f)
        decode = bytes.fromhex if data.get("encoding") == "hex" else unb64
        steps = []
        for command in data["commands"]:
            # A command is an argv (sent on connection w0) or {"conn": name, "argv": argv}: a
            # connection is opened when first named, so a new name means a new connection.
            conn, argv = "w0", command
            if isinstance(command, dict) and "sleep_ms" in command:
                steps.append({"conn": "-", "action": "sleep", "ms": command["sleep_ms"]})
                continue
            if isinstance(command, dict):
                conn, argv = command.get("conn", "w0"), command["argv"]
            argv = [decode(a) for a in argv]
            argv = [processes.module_path().encode() if a == MODULE_PATH_TOKEN else a for a in argv]
            steps.append({"conn": conn, "action": "command", "argv": argv})
        out.append((name[: -len(".json")], data, steps))
    return out


def run_regressions(flavor, directory=REGRESSION_DIR):
    """Replays every regression file on a fresh server; returns the names that failed."""
    failed = []
    regressions = load_regressions(directory)
    for name, data, steps in regressions:
        if flavor not in data.get("servers", servers.FLAVORS):
            continue
        checks = ["alive", "registry"] + list(data.get("checks", []))
        # "repeat": how many fresh servers to try, for a failure that shows only sometimes.
        for _ in range(data.get("repeat", 1)):
            failure = replay(
                flavor,
                steps,
                idle_clients=data.get("idle_clients", 0),
                checks=checks,
                replica=data.get("replica", False),
            )
            if failure is not None:
                break
        if failure is None:
            print(f"  pass  {flavor} {name}")
            continue
        failed.append(name)
        detail = failure.message
        print(f"  FAIL  {flavor} {name}: {failure.kind}: {detail}")
    return failed, len(regressions)


def decode_steps(entries):
    steps = []
    for entry in entries:
        entry = dict(entry)
        if "argv" in entry:
            entry["argv"] = [unb64(a) for a in entry["argv"]]
        if "raw" in entry:
            entry["raw"] = unb64(entry["raw"])
        steps.append(entry)
    return steps


def replay_file(path, flavor=None):
    """--replay: 0 when it passes everywhere it was replayed, 1 when it fails somewhere."""
    with open(path) as f:
        data = json.load(f)
    if "commands" in data:
        directory, name = os.path.split(os.path.abspath(path))
        regression = {n: (d, s) for n, d, s in load_regressions(directory)}
        data, steps = regression[name[: -len(".json")]]
        flavors = [flavor] if flavor else list(data.get("servers", servers.FLAVORS))
        idle, checks = data.get("idle_clients", 0), ["alive", "registry"] + data.get("checks", [])
        with_replica = data.get("replica", False)
    else:
        steps = decode_steps(data.get("minimal") or data["steps"])
        flavors = [flavor or data["flavor"]]
        idle = 1 if data.get("kind") == "cpu-spin" else 0
        checks = ["alive", "registry"] + (["idle-cpu"] if idle else [])
        with_replica = False
    bad = 0
    for name in flavors:
        for _ in range(data.get("repeat", 1)):
            failure = replay(name, steps, idle_clients=idle, checks=checks, replica=with_replica)
            if failure is not None:
                break
        if failure is None:
            print(f"pass  {name} {path}")
        else:
            bad += 1
            print(f"FAIL  {name} {path}: {failure.kind}: {failure.message}")
    return 1 if bad else 0


# The command line --------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="wire-fuzz", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--server", choices=["redis", "valkey", "both"], default="both")
    parser.add_argument("--commands", type=int, default=20000, help="commands per server")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--seconds", type=float, default=0, help="stop each server after this")
    parser.add_argument("--regressions-only", action="store_true")
    parser.add_argument("--no-regressions", action="store_true", help="skip the corpus replay")
    parser.add_argument(
        "--idle-check-every",
        type=int,
        default=4000,
        help="steps between idle-CPU checks (1 s each; 0: never)",
    )
    parser.add_argument(
        "--avoid-known-crashers",
        action="store_true",
        help="never send NUL or characters whose code is a multiple of 256 (to explore past "
        "the known NUL-in-error-text crash on builds that still have it)",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated actions never to take, e.g. module_reload,replica (actions: "
        + ", ".join(a for a, _ in Fuzzer.ACTIONS)
        + ")",
    )
    parser.add_argument(
        "--replay",
        metavar="FILE",
        help="replay a crash file (its minimal reproducer, else its steps) or a regression file "
        "on fresh servers, and nothing else",
    )
    parser.add_argument("--crash-dir", default=CRASH_DIR)
    parser.add_argument("--regression-dir", default=REGRESSION_DIR)
    args = parser.parse_args(argv)
    unknown = {a for a in args.skip.split(",") if a} - {a for a, _ in Fuzzer.ACTIONS}
    if unknown:
        parser.error(f"--skip: unknown actions {sorted(unknown)}")

    if not os.path.exists(processes.module_path()):
        print(f"wire-fuzz: {processes.module_path()} is missing (cargo build --release)")
        return 2
    if args.replay:
        return replay_file(args.replay, None if args.server == "both" else args.server)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    flavors = ["redis", "valkey"] if args.server == "both" else [args.server]
    print(f"wire-fuzz: seed {seed}, module {processes.module_path()}")
    bad = 0
    for flavor in flavors:
        if not args.no_regressions:
            print(f"{flavor}: regression corpus ({args.regression_dir})")
            failed, total = run_regressions(flavor, args.regression_dir)
            bad += len(failed)
            print(f"{flavor}: regressions: {total - len(failed)} of {total} pass")
        if args.regressions_only:
            continue
        fuzzer = Fuzzer(
            flavor,
            seed,
            avoid_known=args.avoid_known_crashers,
            crash_dir=args.crash_dir,
            idle_every=args.idle_check_every,
            skip=[a for a in args.skip.split(",") if a],
        )
        elapsed = fuzzer.run(args.commands, args.seconds)
        counts = fuzzer.stats.counts
        rate = counts["commands"] / elapsed if elapsed else 0
        summary = " ".join(f"{field}={counts[field]}" for field in Stats.FIELDS)
        if counts["harness_errors"]:
            summary += f" harness_errors={counts['harness_errors']}"
        print(f"{flavor}: {summary} seconds={elapsed:.1f} commands/s={rate:.0f}")
        for note, n in sorted(fuzzer.stats.notes.items()):
            print(f"{flavor}: note: {note} (x{n})")
        for signature, n in fuzzer.stats.signatures.most_common():
            print(f"{flavor}: failure x{n}: {signature}")
            minimal = fuzzer.stats.minimal.get(signature)
            if minimal:
                for entry in minimal:
                    print(f"{flavor}:     {readable_step(entry)}")
        bad += counts["failures"] + counts["harness_errors"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
