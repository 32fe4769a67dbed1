#!/usr/bin/env python3
"""The Python clients of scripts/client-impact under its GET/SET/INCR load.

    python3 examples/impact_load.py --client redis-py|redis-py-asyncio|glide
        |redis-py+adapter|redis-py-asyncio+adapter --port N
        [--host H] [--tls-ca PEM] --seconds S --workers W --connections C --prefix P

Every worker loops until S seconds have passed: GET or SET on a random key `{P}key:{n}`, or INCR
on its own `{P}incr:{w}`, one third each. Every exception is one failed request (then the worker
pauses 1 ms, as an error path would). Prints one JSON object on stdout (the protocol of
scripts/maxage_tools/client_impact.py): requests ok/failed, per-worker INCR successes and
failures, latency percentiles (ms, all requests) and the error messages.

  redis-py          sync ConnectionPool (up to C connections) shared by W threads
  redis-py-asyncio  redis.asyncio ConnectionPool (up to C connections) shared by W tasks
  glide             valkey-glide (async): C GlideClients, each one multiplexed connection,
                    shared by W tasks (task w uses client w % C)
  redis-py+adapter, redis-py-asyncio+adapter
                    the same pools from clients/python's adapter (redis_maxage, imported from
                    this checkout): connections opt in to the module's notices and retire
                    themselves after their request in flight

Retries: redis-py (both) with Retry(NoBackoff(), 0) and retry_on_error=[] (redis-py 6+ retries
3-10 times by default); the pool still replaces a connection that was closed while idle, which
is not a retry of a request. valkey-glide has no request-retry setting for a standalone client
(glide-core itself only resends a request it knows never reached the server, valkey-glide
#2363 / #2479); its reconnect_strategy is left at the default (reconnects forever, with
backoff), request_timeout and connection_timeout are 5000 ms (the default 250 ms request timeout
would count a slow reconnect under load as a failure that is the timeout's, not retirement's).
"""

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
# The adapter of +adapter rows, from this checkout (ahead of an installed redis-maxage).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python"))
from maxage_tools.stats import percentile

KEYSPACE = 10_000
VALUE = b"v" * 100
TIMEOUT_S = 5.0
PAUSE_AFTER_FAILURE_S = 0.001
OPS = ("get", "set", "incr")


class Tally:
    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.incr_ok = 0
        self.incr_failed = 0
        self.latencies = []
        self.errors = Counter()

    def record(self, op, started, error):
        self.latencies.append(time.perf_counter() - started)
        if error is None:
            self.ok += 1
            self.incr_ok += op == "incr"
        else:
            self.failed += 1
            self.incr_failed += op == "incr"
            self.errors[f"{type(error).__module__}.{type(error).__qualname__}: {error}"] += 1


def percentile_ms(latencies, fraction):
    value = percentile(latencies, fraction)
    return 0.0 if value is None else round(value * 1000, 3)


def report(args, library, settings, elapsed, tallies):
    latencies = sorted(x for t in tallies for x in t.latencies)
    errors = Counter()
    for tally in tallies:
        errors.update(tally.errors)
    return {
        "client": args.client,
        "library": library,
        "settings": settings,
        "elapsed_s": round(elapsed, 3),
        "requests_ok": sum(t.ok for t in tallies),
        "requests_failed": sum(t.failed for t in tallies),
        "incr_ok": [t.incr_ok for t in tallies],
        "incr_failed": [t.incr_failed for t in tallies],
        "latency_ms": {
            "p50": percentile_ms(latencies, 0.50),
            "p99": percentile_ms(latencies, 0.99),
            "p999": percentile_ms(latencies, 0.999),
            "max": round(latencies[-1] * 1000, 3) if latencies else 0.0,
        },
        "errors": dict(errors.most_common(20)),
    }


def next_op(rng, prefix, index):
    op = OPS[rng.randrange(3)]
    key = f"{prefix}incr:{index}" if op == "incr" else f"{prefix}key:{rng.randrange(KEYSPACE)}"
    return op, key


# redis-py ----------------------------------------------------------------------------------


def redis_py_options(args, retry_module):
    import redis.backoff

    options = {
        "host": args.host,
        "port": args.port,
        "max_connections": args.connections,
        "retry": retry_module.Retry(redis.backoff.NoBackoff(), 0),
        "retry_on_error": [],
        "retry_on_timeout": False,
        "socket_timeout": TIMEOUT_S,
        "socket_connect_timeout": TIMEOUT_S,
    }
    if args.tls_ca:
        options.update(ssl_ca_certs=args.tls_ca, ssl_cert_reqs="required")
    return options


def adapter_label(pools):
    """The adapter's module in a row's library label (empty for plain redis-py)."""
    return f" of {pools.__name__}" if pools.__name__.startswith("redis_maxage") else ""


def check_no_retry(pool):
    connection = pool.connection_class(**pool.connection_kwargs)  # not connected
    if connection.retry.get_retries() != 0 or connection.retry_on_error:
        raise SystemExit("impact_load: redis-py pool connections still retry")


def run_redis_py(args):
    import redis
    import redis.retry

    pools = redis
    if args.client.endswith("+adapter"):
        import redis_maxage as pools  # its pools take redis-py's connection classes

    options = redis_py_options(args, redis.retry)
    if args.tls_ca:
        options["connection_class"] = redis.SSLConnection
    # A plain ConnectionPool refuses a checkout past max_connections; the blocking one waits.
    pool_class = pools.ConnectionPool
    if args.workers > args.connections:
        pool_class = pools.BlockingConnectionPool
        options["timeout"] = TIMEOUT_S
    pool = pool_class(**options)
    check_no_retry(pool)
    client = redis.Redis(connection_pool=pool)
    client.ping()
    deadline = time.monotonic() + args.seconds
    tallies = [Tally() for _ in range(args.workers)]

    def work(index, tally):
        rng = random.Random(index)
        calls = {"get": client.get, "incr": client.incr}
        while time.monotonic() < deadline:
            op, key = next_op(rng, args.prefix, index)
            started = time.perf_counter()
            try:
                if op == "set":
                    client.set(key, VALUE)
                else:
                    calls[op](key)
            except Exception as error:  # noqa: BLE001 -- every failure is counted
                tally.record(op, started, error)
                time.sleep(PAUSE_AFTER_FAILURE_S)
            else:
                tally.record(op, started, None)

    started = time.monotonic()
    threads = [
        threading.Thread(target=work, args=(i, t), daemon=True) for i, t in enumerate(tallies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    pool.disconnect()
    return report(
        args,
        f"redis-py {redis.__version__} (sync {pool_class.__name__}{adapter_label(pools)})",
        "Retry(NoBackoff(), 0), retry_on_error=[], socket timeouts 5 s",
        elapsed,
        tallies,
    )


async def run_async_workers(args, client_of, tallies):
    """The load for asyncio clients (redis-py asyncio, glide): one task per tally, each on the
    client `client_of(index)`, until the row's seconds are up. Returns the elapsed seconds."""
    deadline = time.monotonic() + args.seconds

    async def work(index, tally):
        client = client_of(index)
        rng = random.Random(index)
        while time.monotonic() < deadline:
            op, key = next_op(rng, args.prefix, index)
            started = time.perf_counter()
            try:
                if op == "set":
                    await client.set(key, VALUE)
                elif op == "get":
                    await client.get(key)
                else:
                    await client.incr(key)
            except Exception as error:  # noqa: BLE001 -- every failure is counted
                tally.record(op, started, error)
                await asyncio.sleep(PAUSE_AFTER_FAILURE_S)
            else:
                tally.record(op, started, None)

    started = time.monotonic()
    await asyncio.gather(*(work(i, t) for i, t in enumerate(tallies)))
    elapsed = time.monotonic() - started
    return elapsed


async def run_redis_py_asyncio(args):
    import redis
    import redis.asyncio
    import redis.asyncio.retry

    pools = redis.asyncio
    if args.client.endswith("+adapter"):
        import redis_maxage.asyncio

        pools = redis_maxage.asyncio

    options = redis_py_options(args, redis.asyncio.retry)
    if args.tls_ca:
        options["connection_class"] = redis.asyncio.SSLConnection
    pool_class = pools.ConnectionPool
    if args.workers > args.connections:
        pool_class = pools.BlockingConnectionPool
        options["timeout"] = TIMEOUT_S
    pool = pool_class(**options)
    check_no_retry(pool)
    client = redis.asyncio.Redis(connection_pool=pool)
    await client.ping()
    tallies = [Tally() for _ in range(args.workers)]
    elapsed = await run_async_workers(args, lambda index: client, tallies)
    await client.aclose()
    await pool.disconnect()
    return report(
        args,
        f"redis-py {redis.__version__} (redis.asyncio {pool_class.__name__}{adapter_label(pools)})",
        "Retry(NoBackoff(), 0), retry_on_error=[], socket timeouts 5 s",
        elapsed,
        tallies,
    )


# valkey-glide ------------------------------------------------------------------------------


async def run_glide(args, ca_pem):
    from importlib.metadata import version

    import glide

    advanced = {"connection_timeout": int(TIMEOUT_S * 1000)}
    if ca_pem:
        advanced["tls_config"] = glide.TlsAdvancedConfiguration(root_pem_cacerts=ca_pem)
    config = glide.GlideClientConfiguration(
        [glide.NodeAddress(args.host, args.port)],
        use_tls=bool(ca_pem),
        request_timeout=int(TIMEOUT_S * 1000),
        advanced_config=glide.AdvancedGlideClientConfiguration(**advanced),
    )
    clients = [await glide.GlideClient.create(config) for _ in range(args.connections)]
    tallies = [Tally() for _ in range(args.workers)]
    elapsed = await run_async_workers(args, lambda index: clients[index % len(clients)], tallies)
    for client in clients:
        await client.close()
    return report(
        args,
        f"valkey-glide {version('valkey-glide')} ({args.connections} GlideClients)",
        "no request-retry setting (standalone); reconnect_strategy default (forever, "
        "backoff); request_timeout and connection_timeout 5000 ms",
        elapsed,
        tallies,
    )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--client",
        required=True,
        choices=[
            "redis-py",
            "redis-py-asyncio",
            "glide",
            "redis-py+adapter",
            "redis-py-asyncio+adapter",
        ],
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-ca")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--prefix", default="impact:")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.client in ("redis-py", "redis-py+adapter"):
        result = run_redis_py(args)
    elif args.client in ("redis-py-asyncio", "redis-py-asyncio+adapter"):
        result = asyncio.run(run_redis_py_asyncio(args))
    else:
        ca_pem = None
        if args.tls_ca:
            with open(args.tls_ca, "rb") as pem:
                ca_pem = pem.read()
        result = asyncio.run(run_glide(args, ca_pem))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
