"""Row 9: kill time, wake-up cost and memory at several sizes, and the per-client slope."""

import statistics

from maxage_tools.bench.clients import fill_all, grow_fd_tables
from maxage_tools.bench.kill import time_kill
from maxage_tools.bench.model import LONG_MAX_AGE_MS, Figure, log
from maxage_tools.bench.resp3 import due_all_at_once
from maxage_tools.bench.steady import settled_used_memory


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
