"""The bench's load: idle clients held by a helper process per server (Holder), the latency
probe (PING every millisecond from its own process), and redis-benchmark."""

import contextlib
import csv
import select
import socket
import subprocess
import time

from maxage_tools import servers
from maxage_tools.bench.model import HOST
from maxage_tools.bench.server import start_helper

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
