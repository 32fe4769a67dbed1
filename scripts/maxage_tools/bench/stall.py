"""Row 4: the event-loop stall while many clients fall due at once under enforcement (and the
windows rows 8 and 9 measure the same way)."""

import time

from maxage_tools.bench.clients import Probe, empty_all, fill_all, rotated, worst_latency_ms
from maxage_tools.bench.model import LONG_MAX_AGE_MS, Figure, log, median, paired_figure
from maxage_tools.bench.server import main_thread_cpu_wait_s

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
