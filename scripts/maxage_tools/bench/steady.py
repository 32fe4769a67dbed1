"""Rows 1, 2, 6, 7: throughput, connection churn, memory per client and idle cost, on one module
server and two stock servers holding the same idle clients."""

import itertools
import os
import time

from maxage_tools.bench.clients import empty_all, fill_all, redis_benchmark, rotated
from maxage_tools.bench.model import LONG_MAX_AGE_MS, Figure, log, median, paired_figure
from maxage_tools.bench.server import proc_cpu_seconds, proc_runtime_seconds


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
