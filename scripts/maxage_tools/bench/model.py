"""The bench's model: its sizes (Plan: FULL and QUICK), the rows' titles, and a Figure with
its verdict against a goal and the A/A noise floor."""

import dataclasses
import statistics
import sys
import time

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
# Server setups


@dataclasses.dataclass(frozen=True)
class Setup:
    """The servers of a run. Every redis-server a row starts (the module's, the stock baseline,
    the A/A pair) gets the same binary and config, so that a ratio compares the module alone."""

    name: str  # the command-line option that selects it (none for the default)
    description: str  # printed above the table
    rows: frozenset  # the rows it runs
    # A release scripts/matrix builds (servers.find_release_server), else Debian's redis-server.
    redis_release: str | None
    redis_config: tuple  # config lines of every redis-server
    # Row 3's baseline, a server's own CLIENT KILL MAXAGE: "valkey" (Valkey 9.1: Debian's Redis
    # 7.0 has none) or "redis" (the setup's own stock redis-server, Redis 7.4+).
    native_kill: str
    # Each row's line and JSON name the servers it ran on. The default run's table and JSON stay
    # as docs/performance.md shows them.
    names_servers: bool


DEFAULT_SETUP = Setup(
    name="",
    description="",
    rows=frozenset(ROW_TITLES),
    redis_release=None,
    redis_config=(),
    native_kill="valkey",
    names_servers=False,
)
# Issue 26: the rows a thread could change (throughput, the kill, many due at once) on Redis 8,
# whose I/O threads own their clients (the module's look-up of one pauses its thread).
REDIS_8_IO_THREADS = Setup(
    name="--redis-8-io-threads",
    description="Redis 8.0.6 (scripts/matrix's source build) with io-threads 2 on every server "
    "(module, stock baseline, A/A pair); row 3's baseline is Redis 8.0.6's own CLIENT KILL MAXAGE",
    rows=frozenset({1, 3, 4}),
    redis_release="redis-8.0.6",
    redis_config=("io-threads 2",),
    native_kill="redis",
    names_servers=True,
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
    # The servers the row ran on, as they report themselves (set when the setup names them).
    server: str | None = None

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
        named = {"server": self.server} if self.server is not None else {}
        return {
            "row": self.row,
            "row_title": ROW_TITLES[self.row],
            **named,
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
