"""Python tools for the redis-maxage scripts (the scripts/* entry points are a few lines each).

Shared by the scripts:
- processes: children that die with the script, the module's path (built if missing), free
  ports, CannotRun / Terminated and the signal handlers.
- servers: finds redis-server / valkey-server and starts one with the module on a free loopback
  port (TLS files too).
- resp: a raw RESP2/RESP3 client that sends any bytes.
- report: aligned text tables, Markdown tables, the CPU model.
- stats: percentiles.

Behind each script:
- wire_fuzz: the wire fuzzer's grammar, what it sends (scripts/wire-fuzz).
- wire_fuzz_runner: the wire fuzzer's servers, checks, minimizing and replay (scripts/wire-fuzz).
- abuse: an application user's abuse, with probe, memory and on-time checks (scripts/abuse).
- matrix: builds the server matrix and runs the integration suite on each (scripts/matrix).
- client_impact: what retirement costs each client library (scripts/client-impact).
- bench: the module against the same server without it, one module per row (scripts/bench).
- bench_pacing: fixed against adaptive pacing under a busy workload (scripts/bench-pacing).
- profile: perf profile of the server while the module retires clients (scripts/profile).
- imports: the import-cycle and layering check of src/ (scripts/test).
"""
