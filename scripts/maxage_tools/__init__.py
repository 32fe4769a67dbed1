"""Python tools for the redis-maxage scripts: servers (start redis-server / valkey-server with
the module on a free loopback port), resp (a raw RESP2/RESP3 client that sends any bytes) and
wire_fuzz (the wire-level fuzzer, run as scripts/wire-fuzz)."""
