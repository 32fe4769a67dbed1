"""Row 3: a one-shot kill of the older half, MAXAGE.KILL on Redis 7.0 vs Valkey 9.1's CLIENT
KILL MAXAGE (with --redis-8-io-threads: on Redis 8.0.6 vs its own CLIENT KILL MAXAGE)."""

import time

from maxage_tools.bench.clients import (
    Probe,
    empty_all,
    fill_all,
    grow_fd_tables,
    rotated,
    worst_latency_ms,
)
from maxage_tools.bench.model import Figure, log, paired_figure

# The older half must be at least this old, the younger half well under it, even for Valkey and
# Redis, which count whole seconds from a wall-clock second boundary.
KILL_AGE_S = 2
KILL_AGE_WAIT_S = 2.3


def bench_one_shot_kill(plan, env):
    if env.setup.native_kill == "valkey" and not env.has_valkey:
        env.note("row 3 skipped: valkey-server not found (set MAXAGE_VALKEY_SERVER)")
        return [
            Figure(
                row=3, figure="kill time (no valkey-server)", unit="ms", module=None, failed=True
            )
        ]
    sides = {
        "module": env.start_redis("kill-module", with_module=True),
        "base": env.start_native_kill("kill"),
        "aa": env.start_native_kill("kill-aa"),
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
        # Valkey and Redis count age in whole wall-clock seconds, so a young client can look a
        # second older than it is: a round in which any side killed the wrong number compares
        # nothing.
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
            f"kill {half:,} of {2 * half:,}: time seen by the client "
            f"(vs {env.native_kill_product} native)",
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
