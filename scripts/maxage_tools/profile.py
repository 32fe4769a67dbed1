"""Where the server's time goes when the module retires clients, and while nothing is due.

    scripts/profile            # 5,000 idle clients, 3 rounds of every window (about 4 minutes)
    scripts/profile --quick    # 500 clients, one round: that the script runs (figures unchecked)

`perf record -g` samples the server's main thread (the event loop, where the module runs) at
4,999 Hz over windows of the same length on one Redis server with the module loaded, max-age
one hour and n idle clients older than 200 ms (held by the bench's helper process, which
watches its sockets as an application's clients would):

- "nothing due": max-age is changed so that nobody falls due (the same CONFIG SET, which
  re-times every client), the baseline;
- "module retires": max-age is lowered so that all n fall due, default pacing (1,000/s);
- "clients leave": nothing due, the same n clients close their own connections at 1,000/s:
  the teardown alone (the server freeing each client, the kernel closing both ends of each
  loopback connection), with the module doing nothing;
- "idle" (first, on fresh servers): nothing happens at all, on the module server and on two
  stock servers beside it (an A/A pair), n idle clients each, taken in turn.

Every sample is counted by the object its instruction is in (the module, the server binary,
libc, the kernel) and kernel samples by the system call they are under (the nearest
`__x64_sys_*` frame of the call chain; "softirq" outside one). The report gives each window's
time on CPU and what "module retires" adds per retired client over "nothing due" and over
"clients leave", the module's own hottest functions, and the module's samples while idle
(expected: none). perf is Debian's `linux-perf` (scripts/setup --test installs it); recording
needs perf_event_paranoid <= 1 or root.
"""

import argparse
import collections
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from maxage_tools import processes, servers
from maxage_tools.bench.clients import fill_all, grow_fd_tables, rotated
from maxage_tools.bench.model import FULL, LONG_MAX_AGE_MS, QUICK
from maxage_tools.bench.run import Bench
from maxage_tools.bench.server import proc_runtime_seconds
from maxage_tools.bench.stall import DUE_AGE_MS, wakeup_counters

FREQUENCY_HZ = 4999
MODULE_DSO = "libredis_maxage.so"
SYSCALL_FRAME = re.compile(r"^(?:__x64_sys|__do_sys|__se_sys|__ia32_sys)_(\w+)$")
SOFTIRQ_FRAMES = ("do_softirq", "__do_softirq", "handle_softirqs", "net_rx_action", "run_ksoftirqd")
WINDOWS = ("nothing due", "module retires", "clients leave")


def log(message):
    print(f"[profile {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def dso_group(dso):
    if dso == MODULE_DSO:
        return "module"
    if dso.startswith("[kernel"):
        return "kernel"
    # Debian's redis-server is a link to redis-check-rdb, the name perf reports.
    if dso.startswith(("redis-server", "valkey-server", "redis-check-rdb")):
        return "server"
    if dso.startswith(("libc.so", "libc-", "ld-linux")):
        return "libc"
    return "other"


class Samples:
    """One window's samples: counts by object, by kernel system call and by function."""

    def __init__(self):
        self.total = 0
        self.by_group = collections.Counter()
        self.by_syscall = collections.Counter()
        self.other_objects = collections.Counter()
        # "group: function", so that one group's functions can be picked out (hottest()).
        self.functions = collections.Counter()

    def add(self, frames):
        """frames: (symbol, dso) from the sampled instruction outwards."""
        self.total += 1
        leaf_symbol, leaf_dso = frames[0]
        group = dso_group(os.path.basename(leaf_dso))
        self.by_group[group] += 1
        self.functions[f"{group}: {short_symbol(leaf_symbol)}"] += 1
        if group == "kernel":
            self.by_syscall[kernel_context(frames)] += 1
        if group == "other":
            self.other_objects[os.path.basename(leaf_dso)] += 1

    def merge(self, other):
        self.total += other.total
        self.by_group.update(other.by_group)
        self.by_syscall.update(other.by_syscall)
        self.other_objects.update(other.other_objects)
        self.functions.update(other.functions)

    def hottest(self, group, count):
        """The group's `count` functions with the most samples, as (samples, function)."""
        prefix = f"{group}: "
        picked = [
            (samples, function.removeprefix(prefix))
            for function, samples in self.functions.most_common()
            if function.startswith(prefix)
        ]
        return picked[:count]


def kernel_context(frames):
    for symbol, _ in frames:
        match = SYSCALL_FRAME.match(symbol)
        if match:
            return match.group(1)
    if any(symbol in SOFTIRQ_FRAMES for symbol, _ in frames):
        return "softirq"
    return "other"


def short_symbol(symbol):
    """A Rust symbol without its crate path and hash: redis_maxage::policy::Policy::run_pass::h0
    -> Policy::run_pass."""
    symbol = re.sub(r"::h[0-9a-f]{16}$", "", symbol)
    parts = [part for part in symbol.split("::") if part not in ("redis_maxage", "{{closure}}")]
    return "::".join(parts[-2:]) if len(parts) > 1 else symbol


def parse_perf_script(text):
    """Samples from `perf script -F ip,sym,dso` output of a -g recording: a blank line after each
    sample, one frame a line ("addr symbol (dso)")."""
    samples = Samples()
    frames = []
    for line in text.splitlines() + [""]:
        line = line.strip()
        if not line:
            if frames:
                samples.add(frames)
            frames = []
            continue
        match = re.match(r"^(?:[0-9a-f]+\s+)?(.*?)\s+\((.*)\)$", line)
        if match:
            symbol = re.sub(r"\+0x[0-9a-f]+$", "", match.group(1))
            frames.append((symbol, match.group(2)))
    return samples


class Recording:
    """perf record -g on one thread for window_s seconds."""

    def __init__(self, tid, window_s, workdir):
        descriptor, self.path = tempfile.mkstemp(suffix=".perf", dir=workdir)
        os.close(descriptor)  # perf writes the file itself
        self.process = subprocess.Popen(
            [
                "perf", "record", "-q", "-g", "-F", str(FREQUENCY_HZ), "-t", str(tid),
                "-o", self.path, "--", "sleep", str(window_s),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def samples(self):
        _, errors = self.process.communicate(timeout=120)
        if self.process.returncode != 0:
            raise RuntimeError(f"perf record failed: {errors.strip()}")
        script = subprocess.run(
            ["perf", "script", "-i", self.path, "-F", "ip,sym,dso"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.unlink(self.path)
        return parse_perf_script(script.stdout)


def record_window(server, holder, window, n, window_s, workdir):
    """One window on the module server (see the module docstring); returns its Samples and
    how many clients the module retired in it."""
    control = server.control
    control.config_set("maxage.max-age-ms", LONG_MAX_AGE_MS)
    fill_all([holder], n)
    time.sleep(DUE_AGE_MS * 1.5 / 1000)
    evicted_before = wakeup_counters(server)["evicted_connections"]
    recording = Recording(server.pid, window_s, workdir)
    time.sleep(0.3)  # perf is attached
    if window == "nothing due":
        control.config_set("maxage.max-age-ms", LONG_MAX_AGE_MS - 1000)
    elif window == "module retires":
        control.config_set("maxage.max-age-ms", DUE_AGE_MS)
    elif window == "clients leave":
        holder.start_close_paced(1000)
    samples = recording.samples()
    if window == "clients leave":
        holder.wait_closed_paced()
    evicted = wakeup_counters(server)["evicted_connections"] - evicted_before
    return samples, evicted


def record_idle(server, window_s, workdir):
    before = wakeup_counters(server)["wakeups"] if server.module else 0
    samples = Recording(server.pid, window_s, workdir).samples()
    after = wakeup_counters(server)["wakeups"] if server.module else 0
    return samples, after - before


def main_thread_wakeups(pid):
    """Voluntary context switches of the main thread: one per event-loop sleep."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split(":")[1])
    return 0


def idle_at_once(sides, window_s, rounds):
    """CPU (every thread, schedstat) and main-thread wake-ups of every server over the same
    windows, read from outside: all sides see the same host at the same time."""
    totals = {side: [0.0, 0] for side in sides}
    for _ in range(rounds):
        before = {
            side: (proc_runtime_seconds(s.pid), main_thread_wakeups(s.pid))
            for side, s in sides.items()
        }
        time.sleep(window_s)
        for side, s in sides.items():
            totals[side][0] += proc_runtime_seconds(s.pid) - before[side][0]
            totals[side][1] += main_thread_wakeups(s.pid) - before[side][1]
    return totals


def cpu_ms(count):
    return count * 1000 / FREQUENCY_HZ


def per_client_us(count, n):
    return count * 1e6 / FREQUENCY_HZ / n if n else 0.0


def report(windows, idle, idle_wakeups, n, rounds, window_s, idle_s):
    groups = ("module", "server", "libc", "kernel", "other")
    lines = [
        (
            f"server main thread, {FREQUENCY_HZ} Hz, {rounds} round(s) of {window_s:.1f} s a "
            f"window, {n:,} idle clients; samples summed over the rounds"
        ),
        "",
        f"{'window':<22}{'samples':>9}{'CPU ms':>9}" + "".join(f"{g:>9}" for g in groups),
    ]
    for name, samples in list(windows.items()) + list(idle.items()):
        lines.append(
            f"{name:<22}{samples.total:>9}{cpu_ms(samples.total):>9.1f}"
            + "".join(f"{samples.by_group[g]:>9}" for g in groups)
        )
    retires, leave, nothing = (
        windows[w] for w in ("module retires", "clients leave", "nothing due")
    )
    retired = n * rounds
    lines += [
        "",
        "per retired client (us of the main thread's CPU):",
        f"  module retires - nothing due:   {per_client_us(retires.total - nothing.total, retired):6.1f}",
        f"  clients leave  - nothing due:   {per_client_us(leave.total - nothing.total, retired):6.1f}",
        f"  module retires - clients leave: {per_client_us(retires.total - leave.total, retired):6.1f}",
        f"  of which in the module's code:  {per_client_us(retires.by_group['module'], retired):6.1f}",
        "",
        "kernel samples by system call (module retires / clients leave / nothing due):",
    ]
    syscalls = sorted(
        set(retires.by_syscall) | set(leave.by_syscall),
        key=lambda s: -(retires.by_syscall[s] + leave.by_syscall[s]),
    )
    for syscall in syscalls[:10]:
        lines.append(
            f"  {syscall:<20}{retires.by_syscall[syscall]:>7}{leave.by_syscall[syscall]:>7}"
            f"{nothing.by_syscall[syscall]:>7}"
        )
    others = ", ".join(f"{name} {count}" for name, count in retires.other_objects.most_common(4))
    lines += ["", f"other objects while retiring: {others or 'none'}"]
    for group in ("module", "server"):
        lines += ["", f"the {group}'s hottest functions while retiring (samples):"]
        lines += [f"  {count:>6}  {function}" for count, function in retires.hottest(group, 8)]
    module_idle, stock_idle, aa_idle = (
        idle[f"idle, {side}"] for side in ("module", "stock", "stock-aa")
    )
    lines += [
        "",
        (
            f"idle ({rounds} x {idle_s:.1f} s a server): "
            f"{module_idle.by_group['module']} samples in the module's code, "
            f"{idle_wakeups} module wake-ups; samples: module server {module_idle.total}, "
            f"stock servers {stock_idle.total} and {aa_idle.total} (A/A)"
        ),
        "  functions with the most samples more on the module server (module / stock / stock-aa):",
    ]
    # Twice the module server's count minus both stock servers': its excess over their mean.
    excess = collections.Counter(
        {
            function: 2 * samples - stock_idle.functions[function] - aa_idle.functions[function]
            for function, samples in module_idle.functions.items()
        }
    )
    for function, _ in excess.most_common(6):
        lines.append(
            f"  {module_idle.functions[function]:>6}{stock_idle.functions[function]:>6}"
            f"{aa_idle.functions[function]:>6}  {function}"
        )
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="500 clients, one round")
    return parser.parse_args()


def main():
    args = parse_args()
    if not shutil.which("perf"):
        sys.exit("profile: perf is not installed (scripts/setup --test installs linux-perf)")
    signal.signal(signal.SIGTERM, processes.exit_on_signal)
    signal.signal(signal.SIGHUP, processes.exit_on_signal)
    multiprocessing.set_start_method("fork")
    servers.raise_open_file_limit()
    n, rounds = (500, 1) if args.quick else (5000, 3)
    window_s = n / 1000 + 1.0
    idle_s = 2 * window_s
    with tempfile.TemporaryDirectory(prefix="maxage-profile-") as workdir:
        # A private copy named as perf reports it: a rebuild meanwhile changes nothing here.
        module = shutil.copy(processes.built_module_path(log), os.path.join(workdir, MODULE_DSO))
        env = Bench(QUICK if args.quick else FULL, module, False)
        try:
            server = env.start_redis(
                "profile-module",
                with_module=True,
                module_args=("max-age-ms", LONG_MAX_AGE_MS),
            )
            stock = {side: env.start_redis(f"profile-{side}") for side in ("stock", "stock-aa")}
            idle_sides = {"module": server, **stock}
            holders = {side: env.holder(s) for side, s in idle_sides.items()}
            grow_fd_tables(holders.values(), n)
            fill_all(holders.values(), n)
            for side in idle_sides.values():
                side.drop_control()
            log(f"idle: {rounds} window(s) of {idle_s:.1f} s on all 3 servers at once")
            at_once = idle_at_once(idle_sides, idle_s, rounds)
            log(f"idle: {rounds} round(s) of {idle_s:.1f} s on each of 3 servers, {n:,} clients")
            idle = {f"idle, {side}": Samples() for side in idle_sides}
            idle_wakeups = 0
            for round_number in range(rounds):
                for side in rotated(list(idle_sides), round_number):
                    samples, wakeups = record_idle(idle_sides[side], idle_s, workdir)
                    idle[f"idle, {side}"].merge(samples)
                    idle_wakeups += wakeups
            for side in stock:
                holders[side].close_all()
            windows = {window: Samples() for window in WINDOWS}
            log(f"{rounds} round(s) x {len(WINDOWS)} windows of {window_s:.1f} s, {n:,} clients")
            for round_number in range(rounds):
                for window in rotated(list(WINDOWS), round_number):
                    samples, evicted = record_window(
                        server, holders["module"], window, n, window_s, workdir
                    )
                    expected = n if window == "module retires" else 0
                    if evicted != expected:
                        log(f"note: {window}: the module retired {evicted}, expected {expected}")
                    windows[window].merge(samples)
        finally:
            env.release()
    print(report(windows, idle, idle_wakeups, n, rounds, window_s, idle_s))
    print(
        "idle, all 3 servers over the same windows (CPU of every thread, main-thread sleeps): "
        + ", ".join(
            f"{side} {cpu_s * 1000:.1f} ms, {sleeps:,}" for side, (cpu_s, sleeps) in at_once.items()
        )
    )
    return 0
