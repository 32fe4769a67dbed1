"""A server of the bench (one control connection, sized for thousands of clients), helper
processes that die with the bench, and CPU read from /proc."""

import contextlib
import multiprocessing
import os
import signal
import time

import redis

from maxage_tools import processes, servers
from maxage_tools.bench.model import HOST, MAX_CLIENTS, TCP_BACKLOG

# --------------------------------------------------------------------------------------------
# Processes: servers are stopped by their own pid, never by name


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
    processes.die_with_parent(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the bench died before the kernel was asked
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench handles Ctrl-C and stops us
    target(*args)


class Server:
    """A redis-server or valkey-server (maxage_tools.servers.Server: a free loopback port, its
    own directory, gone with the bench) sized for thousands of clients, with one control
    connection."""

    def __init__(self, label, flavor, module=None, module_args=(), binary=None, config=()):
        self.label = label
        self.flavor = flavor
        self.module = module
        self.module_args = [str(arg) for arg in module_args]
        self.binary = binary  # None: servers.find_server(flavor)'s
        self.config = list(config)
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
            binary=self.binary,
            extra_config=[
                f"maxclients {MAX_CLIENTS}",
                # Thousands of clients connect in a burst: with the default backlog (511) the
                # kernel drops SYNs when the server falls behind, and those connects retry a
                # second later.
                f"tcp-backlog {TCP_BACKLOG}",
                *self.config,
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

    def description(self):
        """Its version and I/O threads as the server reports them: "Redis 8.0.6, io-threads 2"."""
        threads = self.control.config_get("io-threads").get("io-threads", "?")
        return f"{self.version()}, io-threads {threads}"


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
