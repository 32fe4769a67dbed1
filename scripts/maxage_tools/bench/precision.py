"""Row 5: how late after its deadline each client is closed."""

import select
import socket
import time

from maxage_tools.bench.clients import grow_fd_tables, rotated
from maxage_tools.bench.model import HOST, LONG_MAX_AGE_MS, Figure, log
from maxage_tools.stats import percentile

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
