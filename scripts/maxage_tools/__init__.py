"""Python tools for the redis-maxage scripts. Shared: servers (start redis-server /
valkey-server with the module on a free loopback port), resp (a raw RESP2/RESP3 client that sends
any bytes), stats (percentiles). Behind each script: wire_fuzz (scripts/wire-fuzz), abuse
(scripts/abuse), matrix (scripts/matrix), client_impact (scripts/client-impact), bench and
bench_pacing (scripts/bench, scripts/bench-pacing), profile (scripts/profile), and imports (the
import-cycle and layering check of src/, in scripts/test)."""
