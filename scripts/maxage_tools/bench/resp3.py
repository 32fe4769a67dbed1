"""Row 8: RESP3 clients falling due cost a wake-up what RESP2 clients do."""

import time

from maxage_tools.bench.clients import fill_all, rotated
from maxage_tools.bench.model import LONG_MAX_AGE_MS, log, paired_figure
from maxage_tools.bench.stall import DUE_AGE_MS, probe_window, wakeup_counters


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
