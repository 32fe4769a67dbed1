"""Does adaptive pacing spare a busy server's latency when many clients fall due at once?

    scripts/bench-pacing               # 5,000 idle clients, 6 rounds per side (several minutes)
    scripts/bench-pacing --quick       # 1,000 idle clients, 2 rounds per side
    scripts/bench-pacing --markdown    # also print the table as Markdown
    scripts/bench-pacing --json PATH   # where the results go (default target/bench-pacing.json)

One round measures one side, `maxage.pacing fixed` or `maxage.pacing adaptive`, on a fresh
redis-server 7.0 with the module loaded (same settings on both sides apart from the pacing):

  1. open N idle connections (never used, so each is closed the moment it is retired);
  2. start a busy workload (two redis-benchmark processes, SET and GET, 25 connections each,
     -P 16) and a latency probe (one connection sending PING every millisecond, timing each
     round trip); both log in as an ACL user listed in `maxage.exempt-users`, so only the idle
     connections are ever retired;
  3. after a baseline stretch, `CONFIG SET maxage.max-age-ms` below the idle connections' age:
     all N fall due at once;
  4. the retirement window lasts until INFO maxage counts N retirements (or a timeout);
     the probe and workload keep running until the equal window (W seconds from the moment
     they fell due, W the same on both sides) is over as well.

Two windows, because fixed pacing retires everyone quickly and adaptive pacing slowly: the
retirement window shows what each side does while it retires, but a maximum taken over a
longer window is larger by chance alone; the equal window compares the worst latency (and the
requests served) over the same span of time on both sides: what the workload saw after a mass
expiry. The headline figure is the worst round trip of each 100 ms slice, as a median (and
90th percentile) over the retirement window: the worst latency the workload typically sees
while clients are being retired, comparable between windows of different lengths and not
decided by one stray stall of the machine. The `module wake-up` rows are the server's own
measure (INFO maxage) of the stalls the module caused: their mean and the longest.

With two or more CPUs, the server runs alone on the first and everything else (workload,
probe, this script) on the rest, and the probe runs at a higher priority than the workload
when the script may set one (root): the round trips then measure the server, not the
scheduling of the client processes.

The sides alternate (fixed, adaptive, adaptive, fixed, ...) so that a drift in the machine's
load hits both alike. Each side's figure is the median over its rounds; the ratio is
adaptive / fixed of those medians (below 1: adaptive is lower). The baseline rows (the same
probe and workload before anyone falls due, where pacing plays no part) are an A/A pair: how
far their ratio is from 1 shows the noise of this machine. The last column counts, over the
back-to-back pairs of rounds, how often adaptive was lower: a sign test that needs no model of
the noise (6 of 6 happens by chance 1 time in 64; on the A/A rows expect about half).

The script starts its own servers on free loopback ports (never 6379), without persistence, in a
temporary directory, and always stops them (also on SIGINT / SIGTERM).
Environment: MAXAGE_MODULE_PATH (default target/release/libredis_maxage.so, built if missing).
Exit status: 0 when it ran, whatever the numbers; 1 when it could not run; 130 / 143 when
interrupted.
"""

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import redis

from maxage_tools import processes, report, servers
from maxage_tools.processes import CannotRun, Terminated
from maxage_tools.servers import ServerError, find_server
from maxage_tools.stats import percentile

DEFAULT_JSON_PATH = os.path.join(processes.ROOT, "target", "bench-pacing.json")
HOST = "127.0.0.1"
MAX_CLIENTS = 15_000

# Module settings shared by both sides. The maximum rate is high enough that fixed pacing does
# measurable damage; the slack is far longer than any round, so only the pacing decides when a
# client goes; no jitter, so every idle client falls due at the same moment.
MAX_EVICTIONS_PER_SEC = 5000
MIN_EVICTIONS_PER_SEC = 100
MAX_OVERDUE_MS = 600_000
SIDES = ("fixed", "adaptive")

# The idle clients are older than this when it is set, so all of them fall due at once.
MAX_AGE_MS = 1000
WARMUP_S = 1.0  # workload and probe settle (connections made, keyspace filling)
BASELINE_S = 2.0  # then the probe's "before" figures are taken over this long
INFO_POLL_S = 0.02  # how often the end of the retirement window is looked for

BENCH_USER = "bench-pacing"
BENCH_PASSWORD = "bench-pacing-secret"
WORKLOAD_COMMANDS = ("set", "get")
WORKLOAD_CLIENTS_PER_COMMAND = 25
WORKLOAD_PIPELINE = 16
WORKLOAD_KEYSPACE = 100_000
# redis-benchmark stops after this many requests; the script stops it long before.
WORKLOAD_REQUESTS = 2_000_000_000

PROBE_INTERVAL_S = 0.001
# The worst round trip of each slice this long: its median over a window is "the worst latency
# the workload typically sees", comparable between windows of different lengths and not decided
# by one stray stall of the machine the way a single maximum is.
SLICE_S = 0.1
PROBE_START_TIMEOUT_S = 10.0
SERVER_START_TIMEOUT_S = 10.0
SERVER_STOP_TIMEOUT_S = 10.0


def log(message):
    print(f"[bench-pacing] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    idle_clients: int
    rounds_per_side: int
    # The equal window: long enough for adaptive pacing to retire everyone at a busy server's
    # typical rate (a few hundred a second); if it takes longer, the window still ends here.
    equal_window_s: float

    @property
    def retire_timeout_s(self):
        # Twice what the adaptive floor would take, so a round only times out if something
        # is wrong, not because the server was busy.
        return 30 + 2 * self.idle_clients / MIN_EVICTIONS_PER_SEC


FULL = Plan("full", idle_clients=5000, rounds_per_side=6, equal_window_s=20.0)
QUICK = Plan("quick", idle_clients=1000, rounds_per_side=2, equal_window_s=5.0)


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


def cpu_split():
    """(server CPUs, client CPUs): with two or more CPUs the server gets one to itself and
    everything else (workload, probe, this script) shares the rest, so that a client process
    being scheduled never preempts the server and its stalls are the server's own."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return set(allowed), set(allowed)
    return {allowed[0]}, set(allowed[1:])


SERVER_CPUS, CLIENT_CPUS = cpu_split()


def start_child(argv, cpus=None, **popen_args):
    """Starts a child (on `cpus` if given; else on this script's CPUs)."""

    def before_exec():
        processes.die_with_parent(signal.SIGTERM)
        if cpus:
            os.sched_setaffinity(0, cpus)

    # A new session keeps a terminal's Ctrl-C away from the child: the script stops it.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=before_exec,  # noqa: PLW1509 -- started before any thread
        **popen_args,
    )


def stop_child(process):
    """Stops a process this script started, by its own handle."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def control_client(port):
    return redis.Redis(
        host=HOST,
        port=port,
        single_connection_client=True,
        socket_timeout=10,
        decode_responses=True,
    )


def module_arguments(pacing):
    return [
        "jitter-pct",
        "0",
        "pacing",
        pacing,
        "max-evictions-per-sec",
        str(MAX_EVICTIONS_PER_SEC),
        "min-evictions-per-sec",
        str(MIN_EVICTIONS_PER_SEC),
        "max-overdue-ms",
        str(MAX_OVERDUE_MS),
        "exempt-users",
        BENCH_USER,
    ]


@contextlib.contextmanager
def running_server(module, pacing):
    """Starts redis-server with the module on a free loopback port, alone on the server CPUs;
    yields the port."""
    try:
        server = servers.Server(
            "redis",
            module=module,
            module_args=module_arguments(pacing),
            extra_config=[f"maxclients {MAX_CLIENTS}"],
            start_timeout=SERVER_START_TIMEOUT_S,
            prefix="maxage-bench-pacing-",
            cpus=SERVER_CPUS,
        )
    except ServerError as err:
        raise CannotRun(str(err)) from err
    try:
        yield server.port
    finally:
        server.stop()


def create_bench_user(client):
    client.execute_command(
        "ACL", "SETUSER", BENCH_USER, "on", f">{BENCH_PASSWORD}", "~*", "&*", "+@all"
    )
    # The control connection itself is older than the max age: it must be exempt too.
    client.execute_command("AUTH", BENCH_USER, BENCH_PASSWORD)


def maxage_info(client):
    return client.info("maxage")


def retired_for_age(info):
    """Idle clients are closed at once; one that had to wait out its grace counts too."""
    return info["maxage_evicted_max_age"] + info["maxage_evicted_max_age_after_grace"]


# ---------------------------------------------------------------------------------------------
# Idle clients
# ---------------------------------------------------------------------------------------------


def open_idle_clients(port, count):
    """Plain sockets that connect and never send anything."""
    sockets = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection((HOST, port), timeout=10))
    except BaseException:
        close_sockets(sockets)
        raise
    return sockets


def close_sockets(sockets):
    for sock in sockets:
        sock.close()


def wait_for_connected_clients(client, at_least, timeout_s=30):
    """The server accepts connections in its event loop, a little after connect() returned."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.info("clients")["connected_clients"] >= at_least:
            return
        time.sleep(0.05)
    raise CannotRun(f"the server never had {at_least} clients connected")


# ---------------------------------------------------------------------------------------------
# Latency probe: its own process, so nothing in this one (INFO polls, reading the benchmarks'
# output) ever delays a PING. It uses a raw socket because redis-py's per-call overhead would
# blur sub-millisecond figures.
# ---------------------------------------------------------------------------------------------


def resp_command(*words):
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def read_simple_reply(sock):
    """Reads one `+...` or `-...` reply line (the only kinds the probe gets)."""
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError("server closed the probe connection")
        reply += chunk
    if reply.startswith(b"-"):
        raise ConnectionError(f"probe: {reply.decode(errors='replace').strip()}")
    return reply


def probe_main(port, stop, results):
    """Sends PING every PROBE_INTERVAL_S; sends back (send times, round trips) when stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the probe
    # Ahead of the workload on the client CPU (when allowed: root), so that a slow round trip
    # is the server's doing rather than the probe waiting for its turn to run.
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(resp_command("AUTH", BENCH_USER, BENCH_PASSWORD))
    read_simple_reply(sock)
    results.send("ready")
    ping = resp_command("PING")
    sent_at, round_trips = [], []
    next_send = time.monotonic()
    while not stop.is_set():
        started = time.monotonic()
        sock.sendall(ping)
        read_simple_reply(sock)
        finished = time.monotonic()
        sent_at.append(started)
        round_trips.append(finished - started)
        # A slow reply is not followed by a burst of catch-up PINGs: skip the missed slots.
        next_send = max(next_send + PROBE_INTERVAL_S, finished)
        time.sleep(max(0.0, next_send - time.monotonic()))
    sock.close()
    results.send((sent_at, round_trips))


class Probe:
    """The probe process; `stop()` returns its samples as (send time, round trip) pairs."""

    def __init__(self, port):
        context = multiprocessing.get_context("spawn")  # inherits none of the idle sockets
        self._stop = context.Event()
        self._results, child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=probe_main, args=(port, self._stop, child_end), daemon=True
        )
        self._process.start()
        child_end.close()
        if not self._results.poll(PROBE_START_TIMEOUT_S) or self._results.recv() != "ready":
            self.kill()
            raise CannotRun("the latency probe did not start")

    def stop(self):
        self._stop.set()
        try:
            sent_at, round_trips = self._results.recv()
        except EOFError:
            raise CannotRun("the latency probe died (its traceback is above)") from None
        self._process.join(timeout=SERVER_STOP_TIMEOUT_S)
        return list(zip(sent_at, round_trips))

    def kill(self):
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()


# ---------------------------------------------------------------------------------------------
# Workload: redis-benchmark in -q mode prints "SET: rps=<last 250 ms> (overall: ...) ..." every
# 250 ms (with fflush, \r-terminated); each line is timestamped as it arrives.
# ---------------------------------------------------------------------------------------------

INSTANT_RPS = re.compile(rb"rps=([0-9.]+) \(overall")


def benchmark_argv(port, command):
    return [
        "redis-benchmark",
        "-h",
        HOST,
        "-p",
        str(port),
        "--user",
        BENCH_USER,
        "-a",
        BENCH_PASSWORD,
        "-c",
        str(WORKLOAD_CLIENTS_PER_COMMAND),
        "-P",
        str(WORKLOAD_PIPELINE),
        "-r",
        str(WORKLOAD_KEYSPACE),
        "-n",
        str(WORKLOAD_REQUESTS),
        "-t",
        command,
        "-q",
    ]


class BenchmarkProcess:
    """One redis-benchmark process and the (arrival time, requests/s) readings it printed."""

    def __init__(self, port, command):
        self.command = command
        self.readings = []
        self._process = start_child(
            benchmark_argv(port, command), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self):
        pending = b""
        while True:
            chunk = os.read(self._process.stdout.fileno(), 4096)
            if not chunk:
                return
            arrived = time.monotonic()
            pending += chunk
            *lines, pending = pending.split(b"\r")
            for line in lines:
                match = INSTANT_RPS.search(line)
                if match:
                    self.readings.append((arrived, float(match.group(1))))

    def check_alive(self):
        if self._process.poll() is not None:
            error = self._process.stderr.read().decode(errors="replace").strip()
            raise CannotRun(f"redis-benchmark -t {self.command} exited: {error}")

    def stop(self):
        stop_child(self._process)
        self._reader.join(timeout=5)
        self._process.stdout.close()
        self._process.stderr.close()


class Workload:
    """The busy workload: SET and GET benchmarks side by side."""

    def __init__(self, port):
        self.benchmarks = []
        try:
            for command in WORKLOAD_COMMANDS:
                self.benchmarks.append(BenchmarkProcess(port, command))
        except BaseException:
            self.stop()
            raise

    def check_alive(self):
        for benchmark in self.benchmarks:
            benchmark.check_alive()

    def stop(self):
        for benchmark in self.benchmarks:
            benchmark.stop()

    def requests_per_sec(self, start, end):
        """Both benchmarks' combined rate over [start, end]."""
        return sum(mean_rate(benchmark.readings, start, end) for benchmark in self.benchmarks)


def mean_rate(readings, start, end):
    """The time-weighted mean of readings that each cover the interval since the previous one
    (clipped to [start, end]); None when no reading overlaps the window."""
    weighted, covered = 0.0, 0.0
    for (previous_at, _), (at, rate) in itertools.pairwise(readings):
        overlap = min(at, end) - max(previous_at, start)
        if overlap > 0:
            weighted += rate * overlap
            covered += overlap
    return weighted / covered if covered > 0 else None


# ---------------------------------------------------------------------------------------------
# One round
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RoundResult:
    side: str
    round_index: int
    idle_clients: int
    retired: int
    timed_out: bool
    retire_s: float
    probe_samples_before: int
    probe_samples_during: int
    probe_samples_equal: int
    probe_p50_before_ms: float
    probe_p99_before_ms: float
    probe_max_before_ms: float
    probe_p50_ms: float
    probe_p99_ms: float
    probe_p999_ms: float
    probe_max_ms: float
    probe_p99_equal_ms: float
    probe_max_equal_ms: float
    # When the equal window's worst round trip was sent, in seconds after the expiry: tells an
    # after-effect of retiring everyone from a random stall.
    probe_max_equal_at_s: float
    throughput_before: float
    throughput_during: float
    throughput_equal: float
    # Worst round trip per SLICE_S slice: median and 90th percentile over the window.
    slice_max_median_before_ms: float
    slice_max_median_ms: float
    slice_max_p90_ms: float
    # INFO maxage at the end of the retirement window (a fresh server each round): the longest
    # and the mean time the module held the event loop in one wake-up.
    longest_wakeup_us: float
    mean_wakeup_us: float
    busy_pct: float  # INFO maxage event_loop_busy_pct, median over the window
    evictions_per_sec_now: float  # INFO maxage evictions_per_sec_now, median over the window


def round_trips_ms(samples, start, end):
    return sorted(rtt * 1000 for sent, rtt in samples if start <= sent <= end)


def slice_maxima_ms(samples, start, end):
    """The worst round trip of each SLICE_S slice of [start, end), sorted."""
    maxima = {}
    for sent, rtt in samples:
        if start <= sent < end:
            index = int((sent - start) / SLICE_S)
            maxima[index] = max(maxima.get(index, 0.0), rtt * 1000)
    return sorted(maxima.values())


def worst_sample_offset_s(samples, start, end):
    """Seconds from `start` to the sending of the slowest round trip in [start, end]."""
    sent, _ = max(
        ((sent, rtt) for sent, rtt in samples if start <= sent <= end), key=lambda sample: sample[1]
    )
    return sent - start


def wait_until_retired(client, workload, count, timeout_s):
    """Polls INFO maxage until `count` clients were retired for their age. Returns the
    (event-loop busy %, rate in force) readings seen on the way and whether it timed out."""
    readings = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = maxage_info(client)
        readings.append((info["maxage_event_loop_busy_pct"], info["maxage_evictions_per_sec_now"]))
        if retired_for_age(info) >= count:
            return readings, False
        workload.check_alive()
        time.sleep(INFO_POLL_S)
    return readings, True


def keep_running_until(deadline, workload):
    while time.monotonic() < deadline:
        workload.check_alive()
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def run_round(side, round_index, plan, module):
    with (
        running_server(module, side) as port,
        contextlib.closing(control_client(port)) as client,
    ):
        create_bench_user(client)
        idle = open_idle_clients(port, plan.idle_clients)
        workload = probe = None
        try:
            wait_for_connected_clients(client, plan.idle_clients + 1)
            workload = Workload(port)
            probe = Probe(port)
            time.sleep(WARMUP_S)
            baseline_start = time.monotonic()
            time.sleep(BASELINE_S)
            workload.check_alive()

            window_start = time.monotonic()
            client.config_set("maxage.max-age-ms", MAX_AGE_MS)
            readings, timed_out = wait_until_retired(
                client, workload, plan.idle_clients, plan.retire_timeout_s
            )
            window_end = time.monotonic()
            info_after = maxage_info(client)
            retired = retired_for_age(info_after)
            equal_window_end = window_start + plan.equal_window_s
            keep_running_until(equal_window_end, workload)
            samples = probe.stop()
            probe = None
        finally:
            if probe:
                probe.kill()
            if workload:
                workload.stop()
            close_sockets(idle)

    before = round_trips_ms(samples, baseline_start, window_start)
    during = round_trips_ms(samples, window_start, window_end)
    equal = round_trips_ms(samples, window_start, equal_window_end)
    slices_before = slice_maxima_ms(samples, baseline_start, window_start)
    slices_during = slice_maxima_ms(samples, window_start, window_end)
    if not before or not during or not equal:
        raise CannotRun(f"{side} round {round_index}: the probe took no samples")
    return RoundResult(
        side=side,
        round_index=round_index,
        idle_clients=plan.idle_clients,
        retired=retired,
        timed_out=timed_out,
        retire_s=window_end - window_start,
        probe_samples_before=len(before),
        probe_samples_during=len(during),
        probe_samples_equal=len(equal),
        probe_p50_before_ms=percentile(before, 0.50),
        probe_p99_before_ms=percentile(before, 0.99),
        probe_max_before_ms=before[-1],
        probe_p50_ms=percentile(during, 0.50),
        probe_p99_ms=percentile(during, 0.99),
        probe_p999_ms=percentile(during, 0.999),
        probe_max_ms=during[-1],
        probe_p99_equal_ms=percentile(equal, 0.99),
        probe_max_equal_ms=equal[-1],
        probe_max_equal_at_s=worst_sample_offset_s(samples, window_start, equal_window_end),
        throughput_before=workload.requests_per_sec(baseline_start, window_start),
        throughput_during=workload.requests_per_sec(window_start, window_end),
        throughput_equal=workload.requests_per_sec(window_start, equal_window_end),
        slice_max_median_before_ms=statistics.median(slices_before),
        slice_max_median_ms=statistics.median(slices_during),
        slice_max_p90_ms=percentile(slices_during, 0.90),
        longest_wakeup_us=info_after["maxage_longest_wakeup_us"],
        mean_wakeup_us=(
            info_after["maxage_wakeup_us_total"] / max(1, info_after["maxage_wakeups"])
        ),
        busy_pct=statistics.median(busy for busy, _ in readings),
        evictions_per_sec_now=statistics.median(rate for _, rate in readings),
    )


def round_order(rounds_per_side):
    """fixed, adaptive, adaptive, fixed, fixed, adaptive, ...: each side goes first as often
    as second, so a trend in the machine's load favours neither."""
    for index in range(rounds_per_side):
        yield from ((index, side) for side in (SIDES if index % 2 == 0 else SIDES[::-1]))


def describe_round(result):
    status = "TIMED OUT" if result.timed_out else "ok"
    return (
        f"{result.side:8} round {result.round_index + 1}: retired {result.retired}/"
        f"{result.idle_clients} in {result.retire_s:.2f} s ({status}); probe p99 "
        f"{result.probe_p99_before_ms:.2f} -> {result.probe_p99_ms:.2f} ms, max "
        f"{result.probe_max_before_ms:.2f} -> {result.probe_max_ms:.2f} ms, worst per 100 ms "
        f"{result.slice_max_median_before_ms:.2f} -> {result.slice_max_median_ms:.2f} ms, "
        f"wake-ups {result.mean_wakeup_us:.0f} us mean, {result.longest_wakeup_us:.0f} us "
        f"longest (equal window "
        f"{result.probe_max_equal_ms:.2f} ms at +{result.probe_max_equal_at_s:.2f} s); workload "
        f"{format_rate(result.throughput_before)} -> {format_rate(result.throughput_during)}"
        f" req/s; busy {result.busy_pct:.0f}%, rate {result.evictions_per_sec_now:.0f}/s"
    )


# ---------------------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------------------

# (RoundResult field, label, unit, format) in table order.
METRICS = [
    ("slice_max_median_ms", "worst latency per 100 ms, median, retirement window", "ms", "{:.2f}"),
    ("slice_max_p90_ms", "worst latency per 100 ms, p90, retirement window", "ms", "{:.2f}"),
    ("mean_wakeup_us", "mean module wake-up (INFO)", "us", "{:.0f}"),
    ("longest_wakeup_us", "longest module wake-up (INFO)", "us", "{:.0f}"),
    ("probe_p99_ms", "probe p99 latency, retirement window", "ms", "{:.2f}"),
    ("probe_max_ms", "probe max latency, retirement window", "ms", "{:.2f}"),
    ("probe_p999_ms", "probe p99.9 latency, retirement window", "ms", "{:.2f}"),
    ("probe_p50_ms", "probe p50 latency, retirement window", "ms", "{:.2f}"),
    ("throughput_during", "workload throughput, retirement window", "req/s", "rate"),
    ("probe_p99_equal_ms", "probe p99 latency, equal window", "ms", "{:.2f}"),
    ("probe_max_equal_ms", "probe max latency, equal window", "ms", "{:.2f}"),
    ("throughput_equal", "workload throughput, equal window", "req/s", "rate"),
    ("retire_s", "time to retire everyone", "s", "{:.2f}"),
    ("evictions_per_sec_now", "pacing rate in force (INFO)", "/s", "{:.0f}"),
    ("busy_pct", "event-loop busy share (INFO)", "%", "{:.0f}"),
    ("slice_max_median_before_ms", "A/A: worst latency per 100 ms, median, before", "ms", "{:.2f}"),
    ("probe_p99_before_ms", "A/A: probe p99 latency, before", "ms", "{:.2f}"),
    ("probe_max_before_ms", "A/A: probe max latency, before", "ms", "{:.2f}"),
    ("throughput_before", "A/A: workload throughput, before", "req/s", "rate"),
]


def format_rate(value):
    return "n/a" if value is None else f"{value / 1000:.0f}k"


def format_value(value, fmt):
    if value is None:
        return "n/a"
    return format_rate(value) if fmt == "rate" else fmt.format(value)


def summarize(results):
    """Per metric: each side's median, min and max over its rounds, and adaptive / fixed."""
    summary = {}
    for field, label, unit, _ in METRICS:
        entry = {"label": label, "unit": unit}
        for side in SIDES:
            values = [
                getattr(r, field)
                for r in results
                if r.side == side and getattr(r, field) is not None
            ]
            entry[side] = (
                {"median": statistics.median(values), "min": min(values), "max": max(values)}
                if values
                else None
            )
        fixed, adaptive = entry["fixed"], entry["adaptive"]
        entry["ratio"] = (
            adaptive["median"] / fixed["median"] if fixed and adaptive and fixed["median"] else None
        )
        entry["pairs"], entry["adaptive_lower_in"] = paired_wins(results, field)
        summary[field] = entry
    return summary


def paired_wins(results, field):
    """Rounds with the same index ran back to back (see round_order): in how many of those
    pairs adaptive was lower. A sign test on them needs no assumption about the noise: with
    6 pairs, 6 wins would happen by chance alone 1 time in 64."""
    by_pair = {}
    for result in results:
        value = getattr(result, field)
        if value is not None:
            by_pair.setdefault(result.round_index, {})[result.side] = value
    pairs = [pair for pair in by_pair.values() if len(pair) == 2]
    return len(pairs), sum(pair["adaptive"] < pair["fixed"] for pair in pairs)


def verdict(entry):
    """Whether adaptive is lower, and whether the rounds' ranges even overlap."""
    fixed, adaptive = entry["fixed"], entry["adaptive"]
    if not fixed or not adaptive:
        return "not measured"
    if adaptive["max"] < fixed["min"]:
        return "lower in every round (the ranges do not overlap)"
    if adaptive["min"] > fixed["max"]:
        return "higher in every round (the ranges do not overlap)"
    direction = "lower" if adaptive["median"] < fixed["median"] else "not lower"
    return (
        f"median {direction}; lower in {entry['adaptive_lower_in']} of {entry['pairs']} "
        f"back-to-back pairs (the rounds' ranges overlap)"
    )


def table_rows(summary):
    rows = []
    for field, label, unit, fmt in METRICS:
        entry = summary[field]
        cells = [f"{label} ({unit})"]
        for side in SIDES:
            stats = entry[side]
            cells.append(
                "n/a"
                if not stats
                else f"{format_value(stats['median'], fmt)} "
                f"({format_value(stats['min'], fmt)}-{format_value(stats['max'], fmt)})"
            )
        cells.append("n/a" if entry["ratio"] is None else f"{entry['ratio']:.2f}")
        cells.append(f"{entry['adaptive_lower_in']}/{entry['pairs']}")
        rows.append(cells)
    return rows


TABLE_HEADER = [
    "metric",
    "fixed: median (range)",
    "adaptive: median (range)",
    "adaptive/fixed",
    "adaptive lower (pairs)",
]


def text_table(summary):
    return report.text_table([TABLE_HEADER, *table_rows(summary)])


def markdown_table(summary):
    return report.markdown_table(TABLE_HEADER, table_rows(summary))


def machine_description():
    return {
        "nproc": os.cpu_count(),
        "server_cpus": sorted(SERVER_CPUS),
        "client_cpus": sorted(CLIENT_CPUS),
        "cpu_model": report.cpu_model(platform.processor() or "unknown"),
        "kernel": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def setup_description(plan, server_version):
    return (
        f"{plan.idle_clients} idle clients fall due at once, {plan.rounds_per_side} rounds "
        f"per side, equal window {plan.equal_window_s:.0f} s, {server_version}; "
        f"max-evictions-per-sec {MAX_EVICTIONS_PER_SEC}, "
        f"min-evictions-per-sec {MIN_EVICTIONS_PER_SEC}, max-overdue-ms {MAX_OVERDUE_MS}; "
        f"workload: redis-benchmark SET + GET, {WORKLOAD_CLIENTS_PER_COMMAND} clients each, "
        f"-P {WORKLOAD_PIPELINE}; probe: PING every {PROBE_INTERVAL_S * 1000:.0f} ms"
    )


def machine_line(machine):
    return (
        f"{machine['date']}, {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{machine['kernel']}, load average {machine['loadavg_at_start']:.2f} at start; "
        f"server on CPU {machine['server_cpus']}, clients on CPU {machine['client_cpus']}"
    )


def print_report(summary, results, plan, machine, server_version, markdown):
    timeouts = sum(r.timed_out for r in results)
    print()
    print(f"Pacing under load: {setup_description(plan, server_version)}")
    print(f"Machine: {machine_line(machine)}")
    print()
    print(text_table(summary))
    print()
    for field in (
        "slice_max_median_ms",
        "slice_max_p90_ms",
        "mean_wakeup_us",
        "probe_p99_ms",
        "probe_max_ms",
        "throughput_during",
        "probe_p99_equal_ms",
        "probe_max_equal_ms",
        "throughput_equal",
    ):
        entry = summary[field]
        ratio = "n/a" if entry["ratio"] is None else f"{entry['ratio']:.2f}x"
        print(f"{entry['label']}: adaptive/fixed {ratio}, {verdict(entry)}")
    if timeouts:
        print(f"WARNING: {timeouts} round(s) timed out before every idle client was retired")
    if markdown:
        print()
        print(f"_{machine_line(machine)}. {setup_description(plan, server_version)}._")
        print()
        print(markdown_table(summary))


def write_json(path, plan, machine, server_version, summary, results):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    document = {
        "plan": dataclasses.asdict(plan),
        "settings": {
            "max_evictions_per_sec": MAX_EVICTIONS_PER_SEC,
            "min_evictions_per_sec": MIN_EVICTIONS_PER_SEC,
            "max_overdue_ms": MAX_OVERDUE_MS,
            "max_age_ms": MAX_AGE_MS,
            "workload": {
                "commands": WORKLOAD_COMMANDS,
                "clients_per_command": WORKLOAD_CLIENTS_PER_COMMAND,
                "pipeline": WORKLOAD_PIPELINE,
            },
            "probe_interval_s": PROBE_INTERVAL_S,
        },
        "server": server_version,
        "machine": machine,
        "summary": summary,
        "rounds": [dataclasses.asdict(r) for r in results],
    }
    with open(path, "w") as out:
        json.dump(document, out, indent=2)
    log(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def required_binary(name):
    path = shutil.which(name)
    if not path:
        raise CannotRun(f"{name} is not on PATH (Debian: apt-get install redis-server)")
    return path


def server_version_of(server_binary):
    output = subprocess.run(
        [server_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"v=(\S+)", output)
    return f"redis-server {match.group(1) if match else '?'}"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK.idle_clients} idle clients, {QUICK.rounds_per_side} rounds "
        f"per side (default {FULL.idle_clients}, {FULL.rounds_per_side})",
    )
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.add_argument(
        "--json",
        default=DEFAULT_JSON_PATH,
        metavar="PATH",
        help="where to write the results (default target/bench-pacing.json)",
    )
    return parser.parse_args()


def run(args):
    plan = QUICK if args.quick else FULL
    try:
        server_binary = find_server("redis")
    except ServerError as err:
        raise CannotRun(str(err)) from err
    required_binary("redis-benchmark")
    module = processes.built_module_path(log)
    server_version = server_version_of(server_binary)
    servers.raise_open_file_limit()
    # The workload and the probe are this script's children and inherit its CPUs.
    os.sched_setaffinity(0, CLIENT_CPUS)
    machine = machine_description()
    log(f"{plan.name} run: {setup_description(plan, server_version)}")

    results = []
    for round_index, side in round_order(plan.rounds_per_side):
        result = run_round(side, round_index, plan, module)
        log(describe_round(result))
        results.append(result)

    machine["loadavg_at_end"] = os.getloadavg()[0]
    summary = summarize(results)
    print_report(summary, results, plan, machine, server_version, args.markdown)
    write_json(args.json, plan, machine, server_version, summary, results)


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, processes.raise_terminated)
    try:
        run(args)
    except CannotRun as error:
        log(f"cannot run: {error}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        return 128 + signal.SIGINT
    except Terminated:
        log("terminated; servers stopped")
        return 128 + signal.SIGTERM
    return 0
