"""Abuse harness at the wire: what an application user can do to the server through the module.

For each server (redis-server 7.0, valkey-server 9.1), with the module loaded as
`max-age-ms 2000 jitter-pct 0 rules "user:app=600000"` and the usual application user
`ACL SETUSER app on >p ~* &* +@all -@admin -@dangerous`, the application user (and only it)
sends what it may:

- pipeline: one connection pipelines `MAXAGE.SELF 315360000000` --pipeline times, then stays open
  (hold) while other app connections connect, AUTH, PING and close in a loop;
- then, all at once (mixed): MAXAGE.SELF in every form (no argument, 0, 1, 10 years, garbage,
  negative, too many arguments), MULTI/EXEC/DISCARD with MAXAGE.SELF queued, 32 connections
  that send `MAXAGE.SELF 1` then `MULTI` and wait (replaced when closed), 32 that send
  `MAXAGE.SELF 1500` and wait (parked at their deadline; replaced when closed), BLPOP with short
  timeouts, SUBSCRIBE on RESP3 while sending commands, CLIENT TRACKING ON and BCAST with writes
  and new RESP3 connections asking `MAXAGE.SELF 1`, CLIENT SETNAME / CLIENT SETINFO LIB-NAME of
  1-8 MB, 200 connections opening and closing, and --app-idle idle app connections.

The rule gives the app's own connections a 10-minute operator max age so that the pipeline
connection, the subscribers and the idle connections live through the run; everything the app
gets closed for early it asked for itself. The operator's 2 s applies to the default user.

Meanwhile, from separate processes (so that the abuse's Python work does not delay them; the
abuse runs at nice 10 for the same reason):
- a probe (default user, CLIENT NO-EVICT) sends PING in a loop (1 ms apart) from --baseline-s
  before the abuse to its end, and every 20th round also times a fresh connect + PING + close;
- the operator's idle connections: every 2.5 s a wave of --idle connections of the default user
  is opened and never used; each is watched for EOF and its age at close recorded;
- the harness reads INFO maxage / memory / clients every 250 ms (and around the pipeline).

Checks (exit status 1 when one fails, 2 on a harness error):
- pipeline-memory: maxage_registry_bytes grows by less than --max-pipeline-growth (1 KB) over the
  pipeline, read while its connection is still open (no other client connects or is retired
  meanwhile: the operator's waves and the probe's connects pause and the last wave is retired
  before the pipeline starts, so the module's per-client tables keep their size);
- memory-per-connection: maxage_registry_bytes, less what it was just after the server started,
  never exceeds --max-bytes-per-conn (512 B) times the most clients the module has tracked so
  far (its memory is bounded by the connections it has seen, whatever they sent);
- probe-latency: the probe's PING p99 from the start of the hold to the end of the mix is at
  most max(1.5 x, +1 ms) the same figure of a stock server (no module) that took the same
  traffic just before, in the same run (with --stock itself: of the baseline window). The floor: on a 2-core box the server,
  the abuse clients and the probe share two cores, and the probe's p99 moves by a fraction of a
  millisecond from scheduling alone (--stock, the same traffic without the module: 0.25-0.75 ms
  against 0.2-0.3 ms before it); a module stall of a millisecond or more still fails. The
  pipeline's own second is reported, not checked: a stock server answering one client's
  full-speed pipeline delays the others by about a millisecond by itself;
- operator-on-time: every operator idle connection, in the baseline and during the abuse, is
  closed by --on-time-s (2.2 s) of age (max-age 2000, jitter 0);
- parked-self-on-time: the app's connections that ask `MAXAGE.SELF 1500` and then stay silent
  (32 at a time, each replaced when closed: parked at their deadline, so the module gives each
  250 ms once) are closed no earlier than asked and by 2.15 s (asked + 250 ms + two looks
  100 ms apart while the multi-holders fill the app's closing slots + the 200 ms of
  --on-time-s);
- replies: the probe lost no connection and got every reply (PONG within 5 s), and no app
  command waited 5 s for its reply;
- alive: the server answers PING at the end (and did not exit).

    scripts/abuse [--quick] [--servers redis,valkey] [--json PATH] [--pipeline N]
                  [--baseline-s S] [--hold-s S] [--mixed-s S] [--idle N] [--app-idle N] [--stock]

--quick (CI): 200,000-call pipeline, 3 s baseline, 2 s hold, 8 s mixed, waves of 100: about
20 s a server. The default (figures): 2,000,000 calls, 10 s baseline, 10 s hold, 90 s mixed,
waves of 200, 2,000 idle app connections. --stock runs the same traffic on servers without the
module (the latency noise floor; memory and on-time checks are skipped there).
"""

import argparse
import collections
import json
import multiprocessing
import os
import random
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
import traceback
from array import array

from maxage_tools import processes, servers
from maxage_tools.resp import ConnClosed, Push, ReplyTimeout, RespConn, RespError, encode
from maxage_tools.stats import percentile

APP_USER = b"app"
APP_PASSWORD = b"p"
APP_ACL = [b"on", b">p", b"~*", b"&*", b"+@all", b"-@admin", b"-@dangerous"]
MAX_AGE_MS = 2000
# The app's own connections: a 10-minute operator max age (see the module docstring).
APP_RULE = "user:app=600000"
TEN_YEARS_MS = b"315360000000"
REPLY_TIMEOUT_S = 5.0
SAMPLE_EVERY_S = 0.25
WAVE_PERIOD_S = 2.5
# An operator idle connection not closed by then is counted as never closed.
WAVE_CLOSE_TIMEOUT_S = 15.0
PROBE_INTERVAL_S = 0.001
PROBE_CYCLE_EVERY = 20
# The probe waits this long for a reply; one that takes over REPLY_TIMEOUT_S is an error.
PROBE_GIVE_UP_S = 60.0
MULTI_HOLDERS = 32
# Connections that ask to be closed at this age and then stay silent (parked at their deadline).
PARKED_SELF_HOLDERS = 32
PARKED_SELF_MS = 1500
# The time the module gives a due connection parked in a pool, and how often due clients are
# looked at while 32 others hold their origin's closing slots (policy/closing.rs): the
# multi-holders hold the app's slots through the mix.
PARKED_RECHECK_MS = 250
FULL_LOOK_MS = 100
CHURN_CONNECTIONS = 200

SELF_FORMS = [
    [b"MAXAGE.SELF"],
    [b"MAXAGE.SELF", b"0"],
    [b"MAXAGE.SELF", TEN_YEARS_MS],
    [b"MAXAGE.SELF", b"315360000001"],
    [b"MAXAGE.SELF", b"-1"],
    [b"MAXAGE.SELF", b"-9223372036854775809"],
    [b"MAXAGE.SELF", b"99999999999999999999999999"],
    [b"MAXAGE.SELF", b"\xff\x00\r\nx"],
    [b"MAXAGE.SELF", b"1e3"],
    [b"MAXAGE.SELF", b""],
    [b"MAXAGE.SELF", b"1", b"2"],
    [b"MAXAGE.SELF", b"1000", b"1000", b"1000"],
    [b"MAXAGE.SELF", b"60000"],
    # Last: the server closes the connection after this one (at its next request or idle).
    [b"MAXAGE.SELF", b"1"],
]


def info_fields(text):
    fields = {}
    for line in text.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep and not key.startswith(b"#"):
            fields[key.decode()] = value.decode("utf-8", "replace")
    return fields


def int_field(fields, name):
    try:
        return int(fields[name])
    except (KeyError, ValueError):
        return None


def admin_conn(port, timeout=REPLY_TIMEOUT_S):
    """A default-user connection the module never retires (CLIENT NO-EVICT is exempt by
    default), so the harness's own measurements are not cut off by the 2 s max age."""
    conn = RespConn(port, timeout=timeout)
    try:
        conn.call([b"CLIENT", b"NO-EVICT", b"on"], timeout)
    except (ConnClosed, ReplyTimeout):
        conn.close()
        raise
    return conn


def read_memory(conn, timeout=REPLY_TIMEOUT_S):
    """registry_bytes, tracked_clients, used_memory, connected_clients (None where missing)."""
    reply = conn.call([b"INFO", b"maxage", b"memory", b"clients"], timeout)
    if not isinstance(reply, bytes):
        raise ConnClosed(f"INFO: {reply!r}")
    fields = info_fields(reply)
    return {
        "registry_bytes": int_field(fields, "maxage_registry_bytes"),
        "tracked_clients": int_field(fields, "maxage_tracked_clients"),
        "used_memory": int_field(fields, "used_memory"),
        "connected_clients": int_field(fields, "connected_clients"),
    }


class Admin:
    """The harness's own INFO reader. A server the abuse has slowed down may take longer than
    REPLY_TIMEOUT_S to answer: that read is missed (counted) and the next one uses a fresh
    connection (a late reply would otherwise be taken for the next one's)."""

    def __init__(self, port):
        self.port = port
        self.conn = None
        self.missed = 0

    def memory(self, timeout=REPLY_TIMEOUT_S):
        try:
            if self.conn is None:
                self.conn = admin_conn(self.port, timeout)
            return read_memory(self.conn, timeout)
        except (ConnClosed, ReplyTimeout):
            self.missed += 1
            self.close()
            return None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# The probe and the operator's idle connections (separate processes) --------------------------


def probe_main(port, stop, quiet, out):
    """PING on one connection in a loop; every PROBE_CYCLE_EVERY rounds also a fresh
    connect + PING + close. Sends {"pings": [(t, latency)...], "cycles": ..., "errors": [...]}."""
    processes.die_with_parent()
    pings = array("d")
    cycles = array("d")
    errors = []
    conn = None
    rounds = 0
    while not stop.is_set():
        if conn is None:
            start = time.monotonic()
            try:
                conn = admin_conn(port, PROBE_GIVE_UP_S)
                conn.call([b"CLIENT", b"SETNAME", b"abuse-probe"], PROBE_GIVE_UP_S)
            except (ConnClosed, ReplyTimeout) as err:
                errors.append((start, f"probe connect: {err!r}"))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.1)
                continue
            if time.monotonic() - start > REPLY_TIMEOUT_S:
                errors.append((start, f"probe connect took {time.monotonic() - start:.1f} s"))
        start = time.monotonic()
        try:
            conn.send(b"*1\r\n$4\r\nPING\r\n")
            # A stalled server's PING is waited for and counted at its real latency (a
            # timeout would leave the worst stalls out of the p99).
            reply = conn.read(PROBE_GIVE_UP_S)
        except (ConnClosed, ReplyTimeout) as err:
            errors.append((start, f"probe PING: {err!r}"))
            pings.append(start)
            pings.append(time.monotonic() - start)
            conn.close()
            conn = None
            continue
        end = time.monotonic()
        if reply != b"PONG":
            errors.append((start, f"probe PING replied {reply!r}"))
        if end - start > REPLY_TIMEOUT_S:
            errors.append((start, f"probe PING answered after {end - start:.1f} s"))
        pings.append(start)
        pings.append(end - start)
        rounds += 1
        if rounds % PROBE_CYCLE_EVERY == 0 and not quiet.is_set():
            start = time.monotonic()
            ok = servers.ping(port, timeout=PROBE_GIVE_UP_S)
            cycles.append(start)
            cycles.append(time.monotonic() - start)
            if not ok or cycles[-1] > REPLY_TIMEOUT_S:
                errors.append((start, f"probe connect+PING+close: ok={ok} {cycles[-1]:.1f} s"))
        time.sleep(PROBE_INTERVAL_S)
    if conn is not None:
        conn.close()
    out.send({"pings": pings.tobytes(), "cycles": cycles.tobytes(), "errors": errors})
    out.close()


def watcher_main(port, wave_size, stop, quiet, settled, out):
    """Opens a wave of wave_size idle default-user connections every WAVE_PERIOD_S until stop,
    then waits for the last ones. Sends {"closes": [(wave, opened_at, age or None)], ...}.
    Sets settled while quiet holds and none of its connections is open: the module then has
    no operator connection to retire (a wave retired during the pipeline churns its tables)."""
    processes.die_with_parent()
    servers.raise_open_file_limit()
    selector = selectors.DefaultSelector()
    closes = []
    errors = []
    wave = 0
    next_wave = time.monotonic()
    while True:
        now = time.monotonic()
        if not stop.is_set() and not quiet.is_set() and now >= next_wave:
            for _ in range(wave_size):
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S)
                except OSError as err:
                    errors.append((now, f"operator connect: {err!r}"))
                    break
                opened = time.monotonic()
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, (wave, opened))
            wave += 1
            next_wave = max(next_wave + WAVE_PERIOD_S, time.monotonic())
        registered = list(selector.get_map().values())
        if quiet.is_set() and not registered:
            settled.set()
        if stop.is_set() and not registered:
            break
        for key in registered:
            wave_of, opened = key.data
            if now - opened > WAVE_CLOSE_TIMEOUT_S:
                closes.append((wave_of, opened, None))
                selector.unregister(key.fileobj)
                key.fileobj.close()
        wait = 0.05 if stop.is_set() else max(0.0, min(0.05, next_wave - time.monotonic()))
        for key, _ in selector.select(timeout=wait):
            try:
                data = key.fileobj.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                continue
            wave_of, opened = key.data
            closes.append((wave_of, opened, time.monotonic() - opened))
            selector.unregister(key.fileobj)
            key.fileobj.close()
    out.send({"closes": closes, "errors": errors})
    out.close()


# The application user -------------------------------------------------------------------------

CLOSED = object()
TIMEOUT = object()


class Counts:
    """Event counts by scenario, shared by the abuse threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.defaultdict(collections.Counter)

    def add(self, scenario, event, n=1):
        with self.lock:
            self.counts[scenario][event] += n

    def as_dict(self):
        with self.lock:
            return {name: dict(counter) for name, counter in self.counts.items()}


def peer_closed(conn):
    """True when the server has already closed the socket (EOF waiting, nothing buffered): the
    next command would be lost on the way, so a new connection is opened instead."""
    if conn.pos < len(conn.buf):
        return False
    try:
        # A socket with a timeout waits in recv even with MSG_DONTWAIT: ask poll first (select
        # refuses descriptors above 1023, and the harness holds thousands).
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return conn.sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class App:
    """One application-user connection; reopened when the server closed it (the module retires
    app connections at the age they ask for, which is most of what this harness asks)."""

    def __init__(self, run, scenario, resp3=False):
        self.run = run
        self.scenario = scenario
        self.resp3 = resp3
        self.conn = None

    def count(self, event, n=1):
        self.run.counts.add(self.scenario, event, n)

    def open(self):
        self.close()
        conn = RespConn(self.run.port, timeout=REPLY_TIMEOUT_S)
        try:
            if self.resp3:
                argv = [b"HELLO", b"3", b"AUTH", APP_USER, APP_PASSWORD]
                reply = conn.call(argv, REPLY_TIMEOUT_S)
                ok = isinstance(reply, dict)
            else:
                reply = conn.call([b"AUTH", APP_USER, APP_PASSWORD], REPLY_TIMEOUT_S)
                ok = reply == b"OK"
        except (ConnClosed, ReplyTimeout):
            conn.close()
            raise
        if not ok:
            conn.close()
            raise HarnessError(f"app AUTH refused: {reply!r}")
        self.conn = conn
        self.count("connects")
        return conn

    def ensure(self):
        if self.conn is None or self.conn.closed:
            if self.conn is not None:
                self.count("closed_by_server")
            return self.open()
        if peer_closed(self.conn):
            self.count("closed_by_server")
            return self.open()
        return self.conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, argv):
        """Sends one command; False when the connection turned out closed, or no new one could
        be opened (refused, or AUTH not answered in time: counted with the missing replies)."""
        try:
            conn = self.ensure()
        except ConnClosed:
            self.count("connect_failures")
            self.close()
            self.run.sleep(0.05)
            return False
        except ReplyTimeout:
            self.count("reply_timeouts")
            self.close()
            return False
        try:
            conn.send_command(argv)
        except ConnClosed:
            self.count("closed_by_server")
            self.conn = None
            return False
        self.count("sent")
        return True

    def reply(self, timeout=REPLY_TIMEOUT_S):
        """The next reply (RESP3 pushes skipped); CLOSED when the server closed the connection
        before it, TIMEOUT when none came in time (counted: the replies check)."""
        try:
            reply = self.conn.read_reply(timeout)
        except ConnClosed:
            self.count("closed_awaiting_reply")
            self.conn = None
            return CLOSED
        except ReplyTimeout:
            self.count("reply_timeouts")
            self.close()
            return TIMEOUT
        self.count("replies")
        if isinstance(reply, RespError):
            self.count("error_replies")
        return reply

    def call(self, argv, timeout=REPLY_TIMEOUT_S):
        if not self.send(argv):
            return CLOSED
        return self.reply(timeout)


class HarnessError(Exception):
    """Something the harness itself did wrong (not a finding about the server)."""


class AbuseRun:
    """State shared by the abuse threads of one server."""

    def __init__(self, port, flavor, seed):
        self.port = port
        self.flavor = flavor
        self.counts = Counts()
        self.stop = threading.Event()
        self.errors = []
        self.rng = random.Random(seed)
        self.parked_self_ages = []

    def thread(self, name, body):
        def wrapped():
            rng = random.Random(self.rng.random())
            try:
                body(rng)
            except (ConnClosed, ReplyTimeout, OSError) as err:
                # The server went away or stalled: the alive and replies checks report it.
                self.counts.add(name, f"stopped: {type(err).__name__}")
            except Exception:  # noqa: BLE001 (reported as a harness error)
                self.errors.append(f"{name}: {traceback.format_exc()}")

        thread = threading.Thread(target=wrapped, name=name, daemon=True)
        thread.start()
        return thread

    def sleep(self, seconds):
        return self.stop.wait(seconds)

    # Scenarios ----------------------------------------------------------------------------

    def forms(self, rng):
        """MAXAGE.SELF in every form, one at a time and pipelined."""
        app = App(self, "self-forms")
        while not self.stop.is_set():
            for argv in SELF_FORMS:
                if self.stop.is_set():
                    break
                app.call(argv)
            conn = app.ensure()
            try:
                conn.send(b"".join(encode(argv) for argv in SELF_FORMS))
            except ConnClosed:
                continue
            app.count("sent", len(SELF_FORMS))
            for _ in SELF_FORMS:
                if app.reply() in (CLOSED, TIMEOUT):
                    break
        app.close()

    def multi(self, rng):
        """Transactions with MAXAGE.SELF queued: executed, discarded, aborted."""
        app = App(self, "multi")
        sequences = [
            [[b"MULTI"], [b"MAXAGE.SELF", b"1000"], [b"PING"], [b"EXEC"]],
            [[b"MULTI"], [b"MAXAGE.SELF", b"1"], [b"DISCARD"]],
            [[b"MULTI"], [b"MAXAGE.SELF", b"junk"], [b"MAXAGE.SELF"], [b"EXEC"]],
            [[b"MULTI"], [b"MAXAGE.SELF", b"1", b"2"], [b"EXEC"]],
            [[b"MULTI"], [b"MAXAGE.SELF", TEN_YEARS_MS], [b"MAXAGE.SELF", b"0"], [b"EXEC"]],
            [[b"MULTI"], [b"MAXAGE.SELF", b"1"], [b"PING"], [b"EXEC"]],
        ]
        while not self.stop.is_set():
            for sequence in sequences:
                for argv in sequence:
                    if app.call(argv) in (CLOSED, TIMEOUT):
                        break
        app.close()

    def multi_holders(self, rng):
        """The issue's item 3: connections that fall due at once (MAXAGE.SELF 1) and then sit in
        MULTI, where the module cannot close them safely; each closed one is replaced."""
        self.holders("multi-holders", MULTI_HOLDERS, [[b"MAXAGE.SELF", b"1"], [b"MULTI"]])

    def parked_self(self, rng):
        """Connections that ask MAXAGE.SELF PARKED_SELF_MS and then say nothing: at their
        deadline they look parked in a pool (a command run, idle a second), so the module gives
        each PARKED_RECHECK_MS once before closing it (policy/pass.rs); each closed one is
        replaced. Their ages at close (from the request's reply) are checked."""
        self.holders(
            "parked-self",
            PARKED_SELF_HOLDERS,
            [[b"MAXAGE.SELF", str(PARKED_SELF_MS).encode()]],
            self.parked_self_ages,
        )

    def holders(self, scenario, count, commands, close_ages=None):
        """count connections that each send AUTH and commands in one write, read the replies
        and then wait without a word; each one the server closes is replaced (its age from the
        last reply goes to close_ages)."""
        selector = selectors.DefaultSelector()
        counts = self.counts

        def hold():
            conn = RespConn(self.port, timeout=REPLY_TIMEOUT_S)
            try:
                conn.send(
                    encode([b"AUTH", APP_USER, APP_PASSWORD])
                    + b"".join(encode(argv) for argv in commands)
                )
                for _ in range(1 + len(commands)):
                    if isinstance(conn.read_reply(REPLY_TIMEOUT_S), RespError):
                        counts.add(scenario, "error_replies")
            except ConnClosed:
                counts.add(scenario, "closed_awaiting_reply")
                conn.close()
                return
            except ReplyTimeout:
                counts.add(scenario, "reply_timeouts")
                conn.close()
                return
            counts.add(scenario, "connects")
            conn.sock.setblocking(False)
            selector.register(conn.sock, selectors.EVENT_READ, (conn, time.monotonic()))

        while not self.stop.is_set():
            missing = count - len(selector.get_map())
            for _ in range(missing):
                if self.stop.is_set():
                    break
                hold()
            for key, _ in selector.select(timeout=0.05):
                try:
                    data = key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    continue
                conn, replied_at = key.data
                if close_ages is not None:
                    close_ages.append(time.monotonic() - replied_at)
                selector.unregister(key.fileobj)
                conn.close()
                counts.add(scenario, "closed_by_server")
        for key in list(selector.get_map().values()):
            key.data[0].close()

    def blpop(self, rng, index):
        """BLPOP with short timeouts, some after MAXAGE.SELF 1 (blocked when due), some served
        by a push from another app connection."""
        app = App(self, "blpop")
        pusher = App(self, "blpop")
        key = b"abuse:list:%d" % index
        while not self.stop.is_set():
            if rng.random() < 0.2:
                app.call([b"MAXAGE.SELF", rng.choice([b"1", b"50", b"1000"])])
            if rng.random() < 0.3:
                pusher.call([b"LPUSH", key, b"v"])
            timeout = rng.choice([b"0.01", b"0.05", b"0.1"])
            app.call([b"BLPOP", key, timeout], timeout=REPLY_TIMEOUT_S + 1)
        app.close()
        pusher.close()

    def pubsub(self, rng):
        """A RESP3 subscriber that keeps sending commands (MAXAGE.SELF among them) while
        messages are published to it."""
        app = App(self, "pubsub-resp3", resp3=True)
        publisher = App(self, "pubsub-resp3")
        subscribed = None
        while not self.stop.is_set():
            conn = app.ensure()
            if subscribed is not conn:
                try:
                    conn.send_command([b"SUBSCRIBE", b"abuse:ch", b"abuse:other"])
                    app.count("sent")
                    confirmations = 0
                    while confirmations < 2:
                        frame = conn.read(REPLY_TIMEOUT_S)
                        if isinstance(frame, Push) and frame and frame[0] == b"subscribe":
                            confirmations += 1
                except ConnClosed:
                    app.count("closed_awaiting_reply")
                    app.conn = None
                    continue
                except ReplyTimeout:
                    app.count("reply_timeouts")
                    app.close()
                    continue
                app.count("replies")
                subscribed = conn
            publisher.call([b"PUBLISH", b"abuse:ch", b"m" * rng.choice([1, 100, 10000])])
            app.call(
                rng.choice(
                    [
                        [b"MAXAGE.SELF"],
                        [b"MAXAGE.SELF", b"60000"],
                        [b"MAXAGE.SELF", b"0"],
                        [b"PING"],
                        [b"GET", b"abuse:k"],
                        [b"MAXAGE.SELF", b"1"] if rng.random() < 0.05 else [b"PING", b"x"],
                    ]
                )
            )
        app.close()
        publisher.close()

    def tracking(self, rng):
        """CLIENT TRACKING ON and BCAST connections receiving invalidations from writes, while
        new RESP3 connections ask MAXAGE.SELF 1 (the issue's item 4)."""
        default = App(self, "tracking", resp3=True)
        bcast = App(self, "tracking", resp3=True)
        writer = App(self, "tracking")
        newcomer = App(self, "tracking", resp3=True)
        tracked_on = {}
        keys = [b"abuse:t:%d" % i for i in range(16)]
        while not self.stop.is_set():
            for app, argv in (
                (default, [b"CLIENT", b"TRACKING", b"ON"]),
                (bcast, [b"CLIENT", b"TRACKING", b"ON", b"BCAST", b"PREFIX", b"abuse:"]),
            ):
                conn = app.ensure()
                if tracked_on.get(id(app)) is not conn and app.call(argv) == b"OK":
                    tracked_on[id(app)] = app.conn
            for key in rng.sample(keys, 4):
                default.call([b"GET", key])
                writer.call([b"SET", key, b"%d" % rng.randrange(1000)])
            default.call([b"MAXAGE.SELF", rng.choice([b"60000", b"0", TEN_YEARS_MS])])
            bcast.call([b"MAXAGE.SELF"])
            newcomer.close()
            newcomer.call([b"MAXAGE.SELF", b"1"])
            newcomer.call([b"PING"])
        for app in (default, bcast, writer, newcomer):
            app.close()

    def names(self, rng, every_s):
        """CLIENT SETNAME and CLIENT SETINFO LIB-NAME of 1-8 MB (no spaces: SETNAME refuses
        them), then MAXAGE.SELF on that connection. Paced: the server's own handling of an 8 MB
        argument (reading it, checking every byte) stalls it for milliseconds without the
        module, and this harness measures the module."""
        app = App(self, "huge-names")
        while not self.stop.is_set():
            size = rng.randint(1 << 20, 8 << 20)
            value = bytes([rng.choice(b"abcdefghijklmnopqrstuvwxyz")]) * size
            app.call([b"CLIENT", b"SETNAME", value], timeout=30)
            if self.sleep(every_s / 2):
                break
            app.call([b"CLIENT", b"SETINFO", b"LIB-NAME", value], timeout=30)
            app.call([b"MAXAGE.SELF"])
            app.call([b"MAXAGE.SELF", rng.choice([b"1", b"60000"])])
            app.call([b"PING"])
            if self.sleep(every_s / 2):
                break
        app.close()

    def churn(self, rng):
        """CHURN_CONNECTIONS app connections, replaced one at a time: connect, AUTH, a
        MAXAGE.SELF form, close."""
        pool = [App(self, "churn") for _ in range(CHURN_CONNECTIONS)]
        while not self.stop.is_set():
            app = rng.choice(pool)
            app.close()
            app.call(rng.choice(SELF_FORMS))
        for app in pool:
            app.close()

    def connect_ping_close(self, rng, times):
        """The issue's item 1 load: app connections that connect, AUTH, PING and close."""
        while not self.stop.is_set():
            start = time.monotonic()
            app = App(self, "connect-ping-close")
            app.call([b"PING"])
            app.close()
            times.append(time.monotonic() - start)

    # The pipeline, then the mixed abuse -----------------------------------------------------

    def pipeline(self, calls, admin, stock, max_s):
        """calls x MAXAGE.SELF 315360000000 on one connection, for at most max_s (a module that
        slows down with every call would otherwise hold the run for minutes); returns the
        figures and the connection (left open: the hold phase needs it)."""
        app = App(self, "pipeline")
        conn = app.open()
        command = encode([b"MAXAGE.SELF", TEN_YEARS_MS])
        # Every reply must be the first one byte for byte (a stock server's error, with --stock).
        conn.send(command)
        expected = b""
        while not expected.endswith(b"\r\n"):
            data = conn.sock.recv(4096)
            if not data:
                raise ConnClosed("pipeline: closed after the first MAXAGE.SELF")
            expected += data
        if not stock and expected != b"+OK\r\n":
            raise HarnessError(f"pipeline: the first MAXAGE.SELF replied {expected!r}")
        before = admin.memory()
        chunk_calls = 20000
        chunk = command * chunk_calls
        send_error = []
        sent = [0]
        cut_off = threading.Event()

        def sender():
            try:
                while sent[0] < calls and not cut_off.is_set():
                    n = min(calls - sent[0], chunk_calls)
                    conn.sock.sendall(chunk[: n * len(command)])
                    sent[0] += n
            except OSError as err:
                send_error.append(repr(err))

        start = time.monotonic()
        deadline = start + max_s
        thread = threading.Thread(target=sender, name="pipeline-sender", daemon=True)
        thread.start()
        got = 0
        problem = None
        tail = b""
        while got < calls:
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"cut off after {max_s:.0f} s"
                break
            conn.sock.settimeout(min(left, 1.0))
            try:
                data = conn.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as err:
                problem = f"recv after {got} replies: {err!r}"
                break
            if not data:
                problem = f"closed by the server after {got} of {calls} replies"
                break
            data = tail + data
            whole = len(data) // len(expected)
            if data[: whole * len(expected)].count(expected) != whole:
                problem = f"unexpected reply after {got}: {data[:80]!r}"
                break
            got += whole
            tail = data[whole * len(expected) :]
        elapsed = time.monotonic() - start
        # Waited for: the pipeline's figure needs this read even from a crawling server.
        after = admin.memory(timeout=60.0)
        cut_off.set()
        thread.join(timeout=5)
        self.counts.add("pipeline", "sent", sent[0])
        self.counts.add("pipeline", "replies", got)
        return conn, {
            "calls": calls,
            "sent": sent[0],
            "replies": got,
            "seconds": elapsed,
            "calls_per_s": got / elapsed if elapsed else 0,
            "problem": problem or (send_error[0] if send_error else None),
            "before": before,
            "after": after,
        }


def abuser_main(port, flavor, options, quiet, settled, out):
    """The application user's abuse, in a child process at nice 10 (so that the measuring
    processes get a core first on a small box). Sends its figures and phase times."""
    processes.die_with_parent()
    os.nice(10)
    servers.raise_open_file_limit()
    run = AbuseRun(port, flavor, options["seed"])
    result = {"phases": {}, "errors": run.errors}
    admin = Admin(port)
    try:
        # No client connects or is retired while the pipeline's memory is measured (quiet is
        # set by the harness before this process starts): a wave of operator connections
        # opened or retired meanwhile grows or reshapes the module's per-client tables by more
        # than the 1 KB the pipeline may (CI saw +2,040 B, a registry doubling, when the last
        # wave was retired during the pipeline). So the last wave's connections are closed
        # first (2 s after they opened), and the server is given time to register it.
        settled.wait(timeout=WAVE_CLOSE_TIMEOUT_S)
        time.sleep(0.5)
        start = time.monotonic()
        conn, figures = run.pipeline(
            options["pipeline"], admin, options["stock"], options["pipeline_max_s"]
        )
        quiet.clear()
        result["phases"]["pipeline"] = (start, time.monotonic())
        result["pipeline"] = figures

        # Hold: the pipeline's connection stays open while others connect, PING and close.
        start = time.monotonic()
        times = []
        thread = run.thread("connect-ping-close", lambda rng: run.connect_ping_close(rng, times))
        run.sleep(options["hold_s"])
        run.stop.set()
        thread.join(timeout=30)
        result["phases"]["hold"] = (start, time.monotonic())
        result["hold_cycles"] = times
        result["hold_memory"] = admin.memory()
        conn.close()
        run.stop.clear()
        time.sleep(0.5)
        result["after_pipeline_close"] = admin.memory()

        # Mixed: everything else at once.
        start = time.monotonic()
        end = start + options["mixed_s"]
        scenarios = {
            "self-forms": run.forms,
            "multi": run.multi,
            "multi-holders": run.multi_holders,
            "parked-self": run.parked_self,
            "blpop-0": lambda rng: run.blpop(rng, 0),
            "blpop-1": lambda rng: run.blpop(rng, 1),
            "pubsub-resp3": run.pubsub,
            "tracking": run.tracking,
            "huge-names": lambda rng: run.names(rng, options["name_every_s"]),
            "churn": run.churn,
        }
        threads = [
            run.thread(name, body)
            for name, body in scenarios.items()
            if name.split("-")[0] not in options["skip"] and name not in options["skip"]
        ]
        idle = []
        while len(idle) < options["app_idle"] and time.monotonic() < end:
            app = App(run, "app-idle")
            # Opened by its first command; a refused or unanswered one is counted and retried.
            if app.call([b"PING"]) not in (CLOSED, TIMEOUT):
                idle.append(app)
        run.sleep(max(0.0, end - time.monotonic()))
        run.stop.set()
        join_deadline = time.monotonic() + 60
        for thread in threads:
            thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
            if thread.is_alive():
                run.errors.append(f"{thread.name}: did not stop within 60 s")
        for app in idle:
            app.close()
        result["phases"]["mixed"] = (start, time.monotonic())
    except (ConnClosed, ReplyTimeout, OSError) as err:
        result["server_gone"] = repr(err)
    except Exception:  # noqa: BLE001 (reported as a harness error)
        run.errors.append(traceback.format_exc())
    quiet.clear()
    admin.close()
    result["admin_missed_reads"] = admin.missed
    result["counts"] = run.counts.as_dict()
    result["parked_self_ages"] = run.parked_self_ages
    out.send(result)
    out.close()


# The harness ----------------------------------------------------------------------------------


def pairs(raw):
    values = array("d")
    values.frombytes(raw)
    return list(zip(values[0::2], values[1::2], strict=True))


def summary(values):
    """p50/p99/max in ms of latencies in seconds."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": len(values),
        "p50_ms": percentile(values, 0.50) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
        "max_ms": max(values) * 1000,
    }


def within(samples, window):
    start, end = window
    return [latency for t, latency in samples if start <= t < end]


class Harness:
    def __init__(self, flavor, options):
        self.flavor = flavor
        self.options = options
        self.samples = []  # (t, read_memory dict) every SAMPLE_EVERY_S
        self.missed_reads = 0
        self.start_memory = None
        self.context = multiprocessing.get_context("spawn")

    def sample_until(self, admin, end_at, process=None, result=None):
        """INFO samples every SAMPLE_EVERY_S until end_at, or until the process has sent its
        result (which it cannot finish sending before it is read) or died."""
        while time.monotonic() < end_at:
            if process is not None and (result.poll() or not process.is_alive()):
                return
            at = time.monotonic()
            memory = admin.memory()
            if memory is not None:
                self.samples.append((at, memory))
            pause = min(SAMPLE_EVERY_S, max(0.0, end_at - time.monotonic()))
            if process is not None:
                result.poll(pause)
            else:
                time.sleep(pause)

    def start(self, target, *args):
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=target, args=(*args, send), daemon=True)
        process.start()
        send.close()
        return process, receive

    def run(self):
        options = self.options
        module_args = [] if options["stock"] else ["max-age-ms", MAX_AGE_MS, "jitter-pct", 0]
        if not options["stock"]:
            module_args += ["rules", APP_RULE]
        children = []
        figures = {"server": self.flavor}
        with servers.Server(
            self.flavor,
            module_args=module_args,
            load_module=not options["stock"],
            extra_config=["maxclients 10000"],
            prefix="maxage-abuse-",
        ) as server:
            try:
                figures.update(self._run(server, children))
            finally:
                for process in children:
                    if process.is_alive():
                        process.terminate()
                        process.join(5)
            figures["alive"] = self.answers_ping(server)
            if not figures["alive"]:
                figures["server_log_tail"] = server.log()[-3000:]
        return figures

    @staticmethod
    def answers_ping(server, within_s=30.0):
        """The process runs and answers PING on a new connection within within_s (the abuse's
        last connections may still be closing)."""
        deadline = time.monotonic() + within_s
        while server.alive():
            if servers.ping(server.port, timeout=REPLY_TIMEOUT_S):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return False

    def _run(self, server, children):
        options = self.options
        port = server.port
        conn = admin_conn(port)
        reply = conn.call([b"ACL", b"SETUSER", APP_USER, *APP_ACL], REPLY_TIMEOUT_S)
        conn.close()
        if reply != b"OK":
            raise HarnessError(f"ACL SETUSER: {reply!r}")
        admin = Admin(port)
        # The module's own memory with next to no client: what it allocates up front is not
        # per-connection memory.
        self.start_memory = admin.memory()
        stop = self.context.Event()
        # Set from the end of the baseline to the end of the pipeline: no operator wave, no
        # probe connect + PING + close then.
        quiet = self.context.Event()
        settled = self.context.Event()
        probe, probe_out = self.start(probe_main, port, stop, quiet)
        children.append(probe)
        # Without the module nothing closes the operator's connections: no waves then.
        watcher = watcher_out = None
        if not options["stock"]:
            watcher, watcher_out = self.start(
                watcher_main, port, options["idle"], stop, quiet, settled
            )
            children.append(watcher)
        else:
            settled.set()
        # The first half second is the probe's and the watcher's own start.
        baseline_start = time.monotonic() + 0.5
        self.sample_until(admin, baseline_start + options["baseline_s"])
        baseline = (baseline_start, time.monotonic())
        abuser_options = {
            key: options[key]
            for key in (
                "pipeline",
                "pipeline_max_s",
                "hold_s",
                "mixed_s",
                "app_idle",
                "name_every_s",
                "seed",
                "stock",
                "skip",
            )
        }
        quiet.set()
        abuser, abuser_out = self.start(
            abuser_main, port, self.flavor, abuser_options, quiet, settled
        )
        children.append(abuser)
        # Every phase is bounded (the pipeline, the hold, the mix, 60 s to stop its threads):
        # beyond that the abuse process is stuck, which is the harness's fault.
        limit = (
            time.monotonic()
            + options["pipeline_max_s"]
            + options["hold_s"]
            + options["mixed_s"]
            + 180
        )
        self.sample_until(admin, limit, abuser, abuser_out)
        abuse = (baseline[1], time.monotonic())
        abuse_result = abuser_out.recv() if abuser_out.poll(30) else None
        abuser.join(30)
        # The operator waves opened during the abuse close within a few seconds after it.
        stop.set()
        self.sample_until(admin, time.monotonic() + 1.0)
        probe_result = probe_out.recv() if probe_out.poll(PROBE_GIVE_UP_S + 30) else None
        watcher_result = {"closes": [], "errors": []}
        if watcher is not None:
            watcher_result = (
                watcher_out.recv() if watcher_out.poll(WAVE_CLOSE_TIMEOUT_S + 30) else None
            )
            watcher.join(10)
        probe.join(10)
        final = admin.memory()
        admin.close()
        self.missed_reads = admin.missed
        return self.figures(baseline, abuse, abuse_result, probe_result, watcher_result, final)

    def figures(self, baseline, abuse, abuse_result, probe_result, watcher_result, final):
        options = self.options
        out = {
            "baseline_window_s": baseline[1] - baseline[0],
            "abuse_window_s": abuse[1] - abuse[0],
        }
        harness_errors = []
        if abuse_result is None:
            harness_errors.append("the abuse process sent no result")
            abuse_result = {"phases": {}, "errors": [], "counts": {}}
        harness_errors += abuse_result.get("errors", [])
        if probe_result is None or watcher_result is None:
            harness_errors.append("the probe or the watcher sent no result")
        out["harness_errors"] = harness_errors
        out["server_gone_during_abuse"] = abuse_result.get("server_gone")
        # INFO reads not answered within REPLY_TIMEOUT_S (the harness's and the abuse's own).
        out["info_reads_missed"] = self.missed_reads + abuse_result.get("admin_missed_reads", 0)
        # Latency.
        pings = pairs(probe_result["pings"]) if probe_result else []
        cycles = pairs(probe_result["cycles"]) if probe_result else []
        out["probe_errors"] = [text for _, text in probe_result["errors"]] if probe_result else []
        windows = {"baseline": baseline}
        for name, window in abuse_result["phases"].items():
            windows[name] = tuple(window)
        # The check's window: from the hold to the end of the mix, the pipeline's own second
        # left out. A stock server answering one client's full-speed pipeline delays the others
        # by about a millisecond by itself (--stock shows it), the same with or without the
        # module; what the module adds shows in the hold (its state after the pipeline) and in
        # the pipeline's calls/s.
        if "hold" in windows and "mixed" in windows:
            windows["abuse"] = (windows["hold"][0], windows["mixed"][1])
        else:
            windows["abuse"] = abuse
        out["ping"] = {name: summary(within(pings, window)) for name, window in windows.items()}
        out["connect_ping_close"] = {
            name: summary(within(cycles, window)) for name, window in windows.items()
        }
        out["app_connect_ping_close_during_hold"] = summary(abuse_result.get("hold_cycles", []))
        # Memory.
        pipeline = abuse_result.get("pipeline")
        out["pipeline"] = pipeline
        if pipeline:
            out["pipeline_registry_growth"] = _delta(pipeline, "registry_bytes")
            out["pipeline_used_memory_growth"] = _delta(pipeline, "used_memory")
        out["after_pipeline_close"] = abuse_result.get("after_pipeline_close")
        samples = [memory for _, memory in self.samples]
        for key in ("hold_memory", "after_pipeline_close"):
            if abuse_result.get(key):
                samples.append(abuse_result[key])
        if pipeline:
            samples += [m for m in (pipeline["before"], pipeline["after"]) if m]
        out["memory"] = memory_figures(
            self.samples, samples, baseline, final, windows.get("mixed"), self.start_memory
        )
        # The operator's idle connections.
        closes = watcher_result["closes"] if watcher_result else []
        out["operator_errors"] = watcher_result["errors"] if watcher_result else []
        out["operator"] = {
            # Opened by the watcher's start (before the probe's baseline window), closed before
            # the abuse began.
            "baseline": close_summary(closes, (0.0, baseline[1]), True, options["on_time_s"]),
            "abuse": close_summary(closes, abuse, False, options["on_time_s"]),
        }
        # The app's own parked connections (MAXAGE.SELF, then silent).
        ages = sorted(abuse_result.get("parked_self_ages", []))
        out["parked_self"] = {
            "n": len(ages),
            "min_s": ages[0] if ages else None,
            "p50_s": ages[len(ages) // 2] if ages else None,
            "p99_s": ages[min(len(ages) - 1, len(ages) * 99 // 100)] if ages else None,
            "max_s": ages[-1] if ages else None,
        }
        out["app_counts"] = abuse_result.get("counts", {})
        out["checks"] = self.checks(out)
        return out

    def checks(self, out):
        options = self.options
        checks = []

        def check(name, ok, measured, bound):
            checks.append({"check": name, "ok": bool(ok), "measured": measured, "bound": bound})

        if not options["stock"]:
            growth = out.get("pipeline_registry_growth")
            pipeline = out.get("pipeline") or {}
            check(
                "pipeline-memory",
                growth is not None
                and growth < options["max_pipeline_growth"]
                and pipeline.get("problem") is None,
                f"{_num(growth)} B over {pipeline.get('replies', 0):,} calls"
                + (f" ({pipeline['problem']})" if pipeline.get("problem") else ""),
                f"< {options['max_pipeline_growth']} B",
            )
            per_conn = out["memory"]["max_registry_bytes_per_peak_client"]
            check(
                "memory-per-connection",
                per_conn is not None and per_conn <= options["max_bytes_per_conn"],
                f"{_num(per_conn)} B",
                f"<= {options['max_bytes_per_conn']} B",
            )
        base = out["ping"]["baseline"]["p99_ms"]
        during = out["ping"]["abuse"]["p99_ms"]
        # Against the same traffic on a stock server in the same run where there is one: on two
        # cores the abuse clients' own CPU moves the probe's p99 by more than the floor.
        stock = options.get("stock_reference_p99_ms")
        reference, named = (stock, "stock server, same traffic") if stock else (base, "baseline")
        if reference is not None and during is not None:
            bound = max(
                reference * options["latency_ratio"], reference + options["latency_floor_ms"]
            )
            check(
                "probe-latency",
                during <= bound,
                f"p99 {during:.3f} ms ({named} {reference:.3f} ms, alone {base:.3f} ms)",
                f"<= {bound:.3f} ms",
            )
        else:
            check("probe-latency", False, "no samples", "-")
        if not options["stock"]:
            late = []
            for window in ("baseline", "abuse"):
                figures = out["operator"][window]
                late.append(figures["late"] + figures["never_closed"])
            ages = [out["operator"][w]["max_s"] for w in ("baseline", "abuse")]
            counted = sum(out["operator"][w]["n"] for w in ("baseline", "abuse"))
            check(
                "operator-on-time",
                counted > 0 and sum(late) == 0,
                "max age "
                + " / ".join(_num(a, "{:.3f}") + " s" for a in ages)
                + f" (baseline / abuse), {sum(late)} of {counted} late",
                f"<= {options['on_time_s']} s",
            )
            # Closed no earlier than asked, and no later than asked plus the time a parked
            # connection is given, two looks while the slots are full (at the deadline and
            # after the time given) and the operator's on-time allowance.
            parked = out["parked_self"]
            asked_s = PARKED_SELF_MS / 1000
            latest_s = (
                asked_s
                + (PARKED_RECHECK_MS + 2 * FULL_LOOK_MS) / 1000
                + options["on_time_s"]
                - MAX_AGE_MS / 1000
            )
            check(
                "parked-self-on-time",
                parked["n"] > 0
                and parked["min_s"] >= asked_s - 0.005
                and parked["max_s"] <= latest_s,
                f"{parked['n']} closed at {_num(parked['min_s'], '{:.3f}')}-"
                f"{_num(parked['max_s'], '{:.3f}')} s (p50 {_num(parked['p50_s'], '{:.3f}')})"
                f" after asking {asked_s:.1f} s",
                f"{asked_s:.1f}-{latest_s:.2f} s",
            )
        app_timeouts = sum(c.get("reply_timeouts", 0) for c in out["app_counts"].values())
        probe_errors = len(out["probe_errors"])
        check(
            "replies",
            probe_errors == 0 and app_timeouts == 0,
            f"probe errors {probe_errors}, app replies missing {app_timeouts}",
            "0, 0",
        )
        return checks


def _delta(pipeline, field):
    before = (pipeline["before"] or {}).get(field)
    after = (pipeline["after"] or {}).get(field)
    return None if before is None or after is None else after - before


def memory_figures(timed_samples, samples, baseline, final, mixed=None, start=None):
    """The module's bytes beyond those it had at the start, against the most clients it has
    tracked so far (in time order for the periodic samples; the abuse process's reads count
    against the overall peak). Also the worst of the periodic samples taken during the mixed
    window alone."""
    base = (start or {}).get("registry_bytes") or 0
    peak_tracked = 0
    worst = worst_mixed = None
    for at, memory in timed_samples:
        tracked, registry = memory["tracked_clients"], memory["registry_bytes"]
        if tracked is None or registry is None:
            continue
        peak_tracked = max(peak_tracked, tracked)
        ratio = (registry - base) / max(1, peak_tracked)
        worst = ratio if worst is None else max(worst, ratio)
        if mixed and mixed[0] <= at <= mixed[1]:
            worst_mixed = ratio if worst_mixed is None else max(worst_mixed, ratio)
    overall_peak = max([peak_tracked] + [m["tracked_clients"] or 0 for m in samples])
    for memory in samples:
        if memory.get("registry_bytes") is not None:
            ratio = (memory["registry_bytes"] - base) / max(1, overall_peak)
            worst = ratio if worst is None else max(worst, ratio)
    before = [m for t, m in timed_samples if t < baseline[1]]
    first = before[-1] if before else (timed_samples[0][1] if timed_samples else None)

    def peak(field):
        values = [m[field] for m in samples if m.get(field) is not None]
        return max(values) if values else None

    figures = {
        "registry_bytes_at_start": base,
        "registry_bytes_before": first and first["registry_bytes"],
        "registry_bytes_peak": peak("registry_bytes"),
        "registry_bytes_end": final and final["registry_bytes"],
        "tracked_clients_peak": overall_peak,
        "connected_clients_peak": peak("connected_clients"),
        "used_memory_before": first and first["used_memory"],
        "used_memory_peak": peak("used_memory"),
        "used_memory_end": final and final["used_memory"],
        "max_registry_bytes_per_peak_client": worst,
        "max_registry_bytes_per_peak_client_mixed": worst_mixed,
    }
    if first and figures["used_memory_peak"] is not None and figures["connected_clients_peak"]:
        extra = max(1, figures["connected_clients_peak"] - (first["connected_clients"] or 0))
        figures["used_memory_growth_per_connection"] = (
            figures["used_memory_peak"] - first["used_memory"]
        ) / extra
    return figures


def close_summary(closes, window, whole_life, on_time_s):
    """Ages at close of the operator's idle connections whose whole life lies in the window
    (whole_life) or that were open at any time during it."""
    start, end = window
    ages = []
    never = 0
    for _, opened, age in closes:
        closed_at = opened + (age if age is not None else WAVE_CLOSE_TIMEOUT_S)
        if whole_life:
            inside = start <= opened and closed_at <= end
        else:
            inside = opened < end and closed_at > start
        if not inside:
            continue
        if age is None:
            never += 1
        else:
            ages.append(age)
    return {
        "n": len(ages) + never,
        "never_closed": never,
        "late": sum(1 for age in ages if age > on_time_s),
        "min_s": min(ages) if ages else None,
        "p50_s": percentile(ages, 0.5),
        "max_s": max(ages) if ages else None,
    }


def _num(value, fmt="{:,.0f}"):
    return "-" if value is None else fmt.format(value)


WINDOW_LABELS = {
    "baseline": "baseline",
    "pipeline": "pipeline",
    "hold": "hold",
    "mixed": "mixed",
    "abuse": "hold+mixed (checked)",
}


def print_figures(flavor, figures, options):
    print(f"\n{flavor}: figures")
    ping, cycle = figures["ping"], figures["connect_ping_close"]
    print(f"  {'probe (ms)':<44}{'n':>7}{'p50':>9}{'p99':>9}{'max':>9}")
    rows = [("PING " + WINDOW_LABELS[name], ping[name]) for name in WINDOW_LABELS if name in ping]
    rows += [
        ("connect+PING+close " + WINDOW_LABELS[name], cycle[name])
        for name in WINDOW_LABELS
        if name in cycle
    ]
    rows.append(
        ("app connect+AUTH+PING+close (hold)", figures["app_connect_ping_close_during_hold"])
    )
    for label, row in rows:
        print(
            f"  {label:<44}{row['n']:>7}{_num(row['p50_ms'], '{:.3f}'):>9}"
            f"{_num(row['p99_ms'], '{:.3f}'):>9}{_num(row['max_ms'], '{:.3f}'):>9}"
        )
    if not options["stock"]:
        pipeline = figures.get("pipeline") or {}
        print(
            f"  pipeline: {pipeline.get('replies', 0):,} of {pipeline.get('calls', 0):,} replies "
            f"in {pipeline.get('seconds', 0):.2f} s; registry_bytes "
            f"{_num((pipeline.get('before') or {}).get('registry_bytes'))} -> "
            f"{_num((pipeline.get('after') or {}).get('registry_bytes'))} "
            f"(+{_num(figures.get('pipeline_registry_growth'))} B), used_memory "
            f"+{_num(figures.get('pipeline_used_memory_growth'))} B; tracked clients "
            f"{_num((pipeline.get('before') or {}).get('tracked_clients'))} -> "
            f"{_num((pipeline.get('after') or {}).get('tracked_clients'))}; after its close: "
            f"{_num((figures.get('after_pipeline_close') or {}).get('registry_bytes'))} B"
        )
        memory = figures["memory"]
        print(
            f"  module memory: registry_bytes {_num(memory['registry_bytes_before'])} before, "
            f"peak {_num(memory['registry_bytes_peak'])}, end {_num(memory['registry_bytes_end'])};"
            f" peak tracked clients {_num(memory['tracked_clients_peak'])}; worst bytes per peak "
            f"client {_num(memory['max_registry_bytes_per_peak_client'])} (in the mix alone "
            f"{_num(memory['max_registry_bytes_per_peak_client_mixed'])})"
        )
        for window in ("baseline", "abuse"):
            row = figures["operator"][window]
            print(
                f"  operator idle connections ({window}): {row['n']} closed at age "
                f"{_num(row['min_s'], '{:.3f}')}-{_num(row['max_s'], '{:.3f}')} s, p50 "
                f"{_num(row['p50_s'], '{:.3f}')} s; late {row['late']}, never closed "
                f"{row['never_closed']}"
            )
    memory = figures["memory"]
    print(
        f"  used_memory: {_num(memory['used_memory_before'])} before, peak "
        f"{_num(memory['used_memory_peak'])}, end {_num(memory['used_memory_end'])}; peak "
        f"connected clients {_num(memory['connected_clients_peak'])}; growth per connection "
        f"{_num(memory.get('used_memory_growth_per_connection'))} B"
    )
    counts = figures["app_counts"]
    for scenario in sorted(counts):
        text = " ".join(f"{k}={v}" for k, v in sorted(counts[scenario].items()))
        print(f"  app {scenario}: {text}")
    for error in figures["probe_errors"][:5]:
        print(f"  probe error: {error}")
    for error in figures.get("operator_errors", [])[:5]:
        print(f"  operator connection error: {error}")
    if figures.get("info_reads_missed"):
        missed = figures["info_reads_missed"]
        print(f"  INFO reads not answered within {REPLY_TIMEOUT_S:.0f} s: {missed}")
    if figures.get("server_gone_during_abuse"):
        print(f"  server connection lost during the abuse: {figures['server_gone_during_abuse']}")
    print(f"  {'check':<23}{'ok':<5}{'measured':<68}bound")
    for check in figures["checks"]:
        verdict = "ok" if check["ok"] else "FAIL"
        print(f"  {check['check']:<23}{verdict:<5}{check['measured']:<68}{check['bound']}")
    for error in figures["harness_errors"]:
        print(f"  harness error: {error}")
    if not figures.get("alive", True):
        print(f"  server log tail:\n{figures.get('server_log_tail', '')}")


def git_commit():
    done = subprocess.run(
        ["git", "-C", processes.ROOT, "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or None


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="abuse", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the short run (CI)")
    parser.add_argument("--servers", default="redis,valkey", help="comma-separated: redis,valkey")
    parser.add_argument("--json", metavar="PATH", help="write the figures and checks here")
    parser.add_argument("--pipeline", type=int, help="MAXAGE.SELF calls on one connection")
    parser.add_argument(
        "--pipeline-max-s", type=float, help="cut the pipeline off after this (slow module)"
    )
    parser.add_argument("--baseline-s", type=float, help="the probe alone before the abuse")
    parser.add_argument("--hold-s", type=float, help="the pipeline's connection kept open")
    parser.add_argument("--mixed-s", type=float, help="every other kind of abuse at once")
    parser.add_argument("--idle", type=int, help="operator idle connections per wave")
    parser.add_argument("--app-idle", type=int, help="idle app connections during the mix")
    parser.add_argument("--name-every-s", type=float, default=2.0, help="huge-name pace")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated mixed scenarios not to run: self-forms, multi, multi-holders, "
        "blpop, pubsub-resp3, tracking, huge-names, churn",
    )
    parser.add_argument("--max-pipeline-growth", type=int, default=1024, help="bytes")
    parser.add_argument("--max-bytes-per-conn", type=int, default=512)
    parser.add_argument("--latency-ratio", type=float, default=1.5)
    parser.add_argument(
        "--latency-floor-ms",
        type=float,
        help="the probe's p99 may exceed the reference by this much (default 1, --quick 2: its "
        "8 s windows on two shared cores are noisier)",
    )
    parser.add_argument("--on-time-s", type=float, default=2.2)
    parser.add_argument(
        "--stock",
        action="store_true",
        help="servers without the module: the latency noise of the same traffic (no memory or "
        "on-time checks)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "pipeline": 200_000 if quick else 2_000_000,
        "pipeline_max_s": 20.0 if quick else 60.0,
        "baseline_s": 3.0 if quick else 10.0,
        "hold_s": 2.0 if quick else 10.0,
        "mixed_s": 8.0 if quick else 90.0,
        "idle": 100 if quick else 200,
        "app_idle": 200 if quick else 2000,
    }
    options = {
        key: getattr(args, key) if getattr(args, key) is not None else value
        for key, value in defaults.items()
    }
    options.update(
        name_every_s=args.name_every_s,
        seed=args.seed,
        max_pipeline_growth=args.max_pipeline_growth,
        max_bytes_per_conn=args.max_bytes_per_conn,
        latency_ratio=args.latency_ratio,
        latency_floor_ms=args.latency_floor_ms
        if args.latency_floor_ms is not None
        else (2.0 if quick else 1.0),
        on_time_s=args.on_time_s,
        stock=args.stock,
        skip=[name for name in args.skip.split(",") if name],
    )
    flavors = [f.strip() for f in args.servers.split(",") if f.strip()]
    unknown = set(flavors) - set(servers.FLAVORS)
    if unknown or not flavors:
        parser.error(f"--servers: expected some of {','.join(servers.FLAVORS)}")
    if not args.stock and not os.path.exists(processes.module_path()):
        print(f"abuse: {processes.module_path()} is missing (cargo build --release)")
        return 2
    mode = "quick" if quick else "long"
    print(f"abuse: {mode} run, module {processes.module_path()}, options {options}")
    report = {"mode": mode, "commit": git_commit(), "options": options, "servers": {}}
    status = 0
    for flavor in flavors:
        started = time.monotonic()
        try:
            run_options = options
            if not args.stock:
                # The same traffic on a stock server first: the latency reference.
                stock = Harness(flavor, dict(options, stock=True)).run()
                run_options = dict(options, stock_reference_p99_ms=stock["ping"]["abuse"]["p99_ms"])
            figures = Harness(flavor, run_options).run()
        except (servers.ServerError, HarnessError, ConnClosed, ReplyTimeout) as err:
            print(f"{flavor}: harness error: {err}")
            report["servers"][flavor] = {"harness_errors": [str(err)]}
            status = 2
            continue
        figures["seconds"] = time.monotonic() - started
        report["servers"][flavor] = figures
        figures["checks"].append(
            {
                "check": "alive",
                "ok": figures["alive"],
                "measured": "PONG" if figures["alive"] else "no PONG",
                "bound": "PONG",
            }
        )
        print_figures(flavor, figures, options)
        failed = [c["check"] for c in figures["checks"] if not c["ok"]]
        print(
            f"{flavor}: {'FAILED: ' + ', '.join(failed) if failed else 'all checks pass'} "
            f"({figures['seconds']:.0f} s)"
        )
        if figures["harness_errors"]:
            status = 2
        elif failed and status == 0:
            status = 1
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return status


if __name__ == "__main__":
    sys.exit(main())
