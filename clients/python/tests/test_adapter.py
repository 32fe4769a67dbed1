"""The redis-py adapter against real servers: Debian's redis-server 7.0 and valkey-server 9.1
(scripts/maxage_tools/servers.py finds them and the module), each with the module loaded
(`max-age-ms 1000 notice-lead-ms 300`) on a free loopback port, and a redis-server without it.

    clients/python/run-tests        # or: python3 -m unittest discover -s clients/python/tests

Every load runs with retries off (Retry(NoBackoff(), 0), retry_on_error=[]): a request the
adapter let fail would be counted, not resent.
"""

import asyncio
import os
import sys
import threading
import time
import unittest

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(HERE))  # the package from this tree, before any installed

import redis_maxage
import redis_maxage.asyncio
from maxage_tools import servers

MAX_AGE_MS = 1000
LEAD_MS = 300
MODULE_ARGS = ["max-age-ms", MAX_AGE_MS, "notice-lead-ms", LEAD_MS]
LOAD_S = 3.0
THREADS = 6
TASKS = 8
NO_RETRY = {"retry": Retry(NoBackoff(), 0), "retry_on_error": [], "socket_timeout": 5}
ASYNC_NO_RETRY = {**NO_RETRY, "retry": AsyncRetry(NoBackoff(), 0)}

SERVERS = {}


def setUpModule():
    if not os.path.isfile(servers.module_path()):
        raise unittest.SkipTest(f"{servers.module_path()} is missing: cargo build --release")
    try:
        for flavor in servers.FLAVORS:
            SERVERS[flavor] = servers.Server(flavor, module_args=MODULE_ARGS, prefix="py-adapter-")
        SERVERS["plain"] = servers.Server("redis", load_module=False, prefix="py-adapter-")
    except BaseException:
        tearDownModule()
        raise


def tearDownModule():
    while SERVERS:
        SERVERS.popitem()[1].stop()


def control(port):
    return redis.Redis(port=port, protocol=3, **NO_RETRY)


def maxage_info(port):
    with control(port) as client:
        info = client.info("maxage")
        info.update(client.info("stats"))
        return info


def deltas(before, after, *names):
    return {name: int(after[name]) - int(before[name]) for name in names}


COUNTERS = (
    "maxage_notices_sent",
    "maxage_noticed_left_themselves",
    "maxage_noticed_closed_by_module",
    "maxage_evicted_connections",
    "total_connections_received",
)


def sync_load(client, seconds=LOAD_S, threads=THREADS):
    """GET / SET / INCR from `threads` threads for `seconds`: (ok, [failures])."""
    deadline = time.monotonic() + seconds
    ok = [0] * threads
    failures = []

    def work(index):
        n = 0
        while time.monotonic() < deadline:
            try:
                key = f"load:{index}:{n % 50}"
                if n % 3 == 0:
                    client.set(key, "v" * 100)
                elif n % 3 == 1:
                    client.get(key)
                else:
                    client.incr(f"load:incr:{index}")
                ok[index] += 1
            except Exception as error:  # noqa: BLE001 -- every failure counts
                failures.append(repr(error))
            n += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(ok), failures


async def async_load(client, seconds=LOAD_S, tasks=TASKS):
    deadline = time.monotonic() + seconds
    ok = [0] * tasks
    failures = []

    async def work(index):
        n = 0
        while time.monotonic() < deadline:
            try:
                key = f"aload:{index}:{n % 50}"
                if n % 3 == 0:
                    await client.set(key, "v" * 100)
                elif n % 3 == 1:
                    await client.get(key)
                else:
                    await client.incr(f"aload:incr:{index}")
                ok[index] += 1
            except Exception as error:  # noqa: BLE001 -- every failure counts
                failures.append(repr(error))
            n += 1

    await asyncio.gather(*(work(i) for i in range(tasks)))
    return sum(ok), failures


class WithModule:
    """The tests for one server flavor (the subclasses below set it)."""

    flavor = None

    @property
    def port(self):
        return SERVERS[self.flavor].port

    def test_opts_in(self):
        client = redis_maxage.Redis(port=self.port, **NO_RETRY)
        pool = client.connection_pool
        self.assertIsInstance(pool, redis_maxage.ConnectionPool)
        connection = pool.get_connection()
        try:
            self.assertIsInstance(connection, redis_maxage.Connection)
            self.assertEqual(connection.retry.get_retries(), 0)
            reply = connection.maxage
            self.assertIsNotNone(reply)
            self.assertEqual(reply["push"], 1)
            self.assertEqual(reply["notice-lead-ms"], LEAD_MS)
            self.assertTrue(reply["key"].startswith(redis_maxage.NOTICE_PREFIX))
            # Redis 7.0 tracks a module's reads only for scripts' callers: the client reads
            # the key itself (MAXAGE.NOTICEKEY); Valkey 9.1 tracks it for the caller.
            self.assertEqual(reply["key-tracked"], 0 if self.flavor == "redis" else 1)
            self.assertLessEqual(reply["deadline-in-ms"], MAX_AGE_MS)
            connection.send_command("CLIENT", "TRACKINGINFO")
            flags = {redis_maxage._notice._text(f) for f in connection.read_response()[b"flags"]}
            self.assertIn("on", flags)
            self.assertIn("optin", flags)
            self.assertGreaterEqual(
                int(maxage_info(self.port)["maxage_clients_opted_in_to_notices"]), 1
            )
        finally:
            pool.release(connection)
        # The notice comes and the connection retires at its release, not before.
        connection = pool.get_connection()
        try:
            time.sleep((connection.maxage["notice-in-ms"] + 100) / 1000)
            self.assertFalse(connection.maxage_noticed)
            self.assertEqual(connection.send_command("PING"), None)
            self.assertEqual(connection.read_response(), b"PONG")  # the push came first
            self.assertTrue(connection.maxage_noticed)
            self.assertTrue(connection.should_reconnect())
            self.assertTrue(connection.is_connected)
        finally:
            pool.release(connection)
        self.assertFalse(connection.is_connected)
        self.assertTrue(client.ping())
        client.close()

    def test_sync_pool_under_load(self):
        before = maxage_info(self.port)
        client = redis_maxage.Redis(port=self.port, **NO_RETRY)
        ok, failures = sync_load(client)
        client.close()
        after = maxage_info(self.port)
        counts = deltas(before, after, *COUNTERS)
        self.assertEqual(failures, [], counts)
        self.assertGreater(ok, 1000)
        # Several retirements of each of the pool's connections, all by the client itself.
        self.assertGreaterEqual(counts["maxage_noticed_left_themselves"], 2 * THREADS, counts)
        self.assertEqual(counts["maxage_evicted_connections"], 0, counts)

    def test_blocking_pool_under_load(self):
        before = maxage_info(self.port)
        pool = redis_maxage.BlockingConnectionPool(
            port=self.port, max_connections=3, timeout=5, **NO_RETRY
        )
        client = redis.Redis(connection_pool=pool)
        _ok, failures = sync_load(client, seconds=2.0)
        pool.disconnect()
        counts = deltas(before, maxage_info(self.port), *COUNTERS)
        self.assertEqual(failures, [], counts)
        self.assertGreater(counts["maxage_noticed_left_themselves"], 0, counts)

    def test_asyncio_pool_under_load(self):
        before = maxage_info(self.port)

        async def run():
            client = redis_maxage.asyncio.Redis(port=self.port, **ASYNC_NO_RETRY)
            self.assertIsInstance(client.connection_pool, redis_maxage.asyncio.ConnectionPool)
            connection = await client.connection_pool.get_connection()
            self.assertEqual(connection.maxage["push"], 1)
            self.assertEqual(connection.retry.get_retries(), 0)
            await client.connection_pool.release(connection)
            result = await async_load(client)
            await client.aclose()
            return result

        ok, failures = asyncio.run(run())
        counts = deltas(before, maxage_info(self.port), *COUNTERS)
        self.assertEqual(failures, [], counts)
        self.assertGreater(ok, 1000)
        self.assertGreaterEqual(counts["maxage_noticed_left_themselves"], 2 * TASKS, counts)
        self.assertEqual(counts["maxage_evicted_connections"], 0, counts)

    def test_other_invalidation_is_passed_on(self):
        """The application's own client-side caching: its invalidation goes to its handler,
        the connection stays."""
        client = redis_maxage.Redis(port=self.port, **NO_RETRY)
        pool = client.connection_pool
        seen = []
        connection = pool.get_connection()
        try:
            connection._parser.set_invalidation_push_handler(seen.append)
            # OPTIN tracking: the application tracks what it reads after CLIENT CACHING YES.
            connection.send_command("CLIENT", "CACHING", "YES")
            self.assertEqual(connection.read_response(), b"OK")
            connection.send_command("GET", "app:cached")
            connection.read_response()
            with control(self.port) as other:
                other.set("app:cached", "changed")
            deadline = time.monotonic() + 2
            while not seen and time.monotonic() < deadline:
                connection.send_command("PING")
                self.assertEqual(connection.read_response(), b"PONG")
            self.assertEqual(len(seen), 1)
            self.assertEqual(seen[0][1], [b"app:cached"])
            self.assertFalse(connection.maxage_noticed)
            self.assertFalse(connection.should_reconnect())
        finally:
            pool.release(connection)
        self.assertTrue(connection.is_connected)
        client.close()

    def test_notice_is_not_passed_on(self):
        client = redis_maxage.Redis(port=self.port, **NO_RETRY)
        pool = client.connection_pool
        seen = []
        connection = pool.get_connection()
        try:
            connection._parser.set_invalidation_push_handler(seen.append)
            time.sleep((connection.maxage["notice-in-ms"] + 100) / 1000)
            connection.send_command("PING")
            self.assertEqual(connection.read_response(), b"PONG")
            self.assertTrue(connection.maxage_noticed)
            self.assertEqual(seen, [])
        finally:
            pool.release(connection)
        client.close()

    def test_resp2_retires_before_its_deadline(self):
        before = maxage_info(self.port)
        client = redis_maxage.Redis(port=self.port, protocol=2, **NO_RETRY)
        connection = client.connection_pool.get_connection()
        reply = connection.maxage
        self.assertEqual(reply["push"], 0)
        self.assertEqual(reply["no-push-reason"], "resp2")
        retire_in = connection._maxage_retire_at - time.monotonic()
        self.assertLess(retire_in, (reply["deadline-in-ms"] - LEAD_MS) / 1000 + 0.01)
        self.assertGreater(retire_in, 0)
        client.connection_pool.release(connection)
        _ok, failures = sync_load(client, seconds=2.5, threads=3)
        client.close()
        counts = deltas(before, maxage_info(self.port), *COUNTERS)
        self.assertEqual(failures, [], counts)
        # Every connection lived about 0.7 s: several new ones, none closed by the module.
        self.assertGreaterEqual(counts["total_connections_received"], 3 * 3, counts)
        self.assertEqual(counts["maxage_evicted_connections"], 0, counts)
        self.assertEqual(counts["maxage_notices_sent"], 0, counts)

    def test_notice_lost_to_flushall_falls_back_to_the_timer(self):
        """FLUSHALL empties the server's tracking table, notice keys too: the adapter still
        retires the connection, half the lead after the planned notice."""
        client = redis_maxage.Redis(port=self.port, **NO_RETRY)
        pool = client.connection_pool
        connection = pool.get_connection()
        try:
            with control(self.port) as other:
                other.flushall()
            time.sleep((connection.maxage["notice-in-ms"] + LEAD_MS / 2 + 20) / 1000)
            self.assertTrue(connection.should_reconnect())
        finally:
            pool.release(connection)
        self.assertFalse(connection.is_connected)
        client.close()


class RedisWithModule(WithModule, unittest.TestCase):
    flavor = "redis"


class ValkeyWithModule(WithModule, unittest.TestCase):
    flavor = "valkey"


class WithoutModule(unittest.TestCase):
    def test_plain_redis_py(self):
        port = SERVERS["plain"].port
        client = redis_maxage.Redis(port=port, **NO_RETRY)
        connection = client.connection_pool.get_connection()
        self.assertIsNone(connection.maxage)
        self.assertFalse(connection.should_reconnect())
        connection.send_command("CLIENT", "TRACKINGINFO")
        self.assertEqual(connection.read_response()[b"flags"], [b"off"])
        client.connection_pool.release(connection)
        self.assertTrue(client.set("k", "v"))
        self.assertEqual(client.get("k"), b"v")
        _ok, failures = sync_load(client, seconds=0.5, threads=2)
        self.assertEqual(failures, [])
        client.close()

        async def run():
            aclient = redis_maxage.asyncio.Redis(port=port, **ASYNC_NO_RETRY)
            self.assertEqual(await aclient.get("k"), b"v")
            aconnection = await aclient.connection_pool.get_connection()
            self.assertIsNone(aconnection.maxage)
            await aclient.connection_pool.release(aconnection)
            await aclient.aclose()

        asyncio.run(run())


if __name__ == "__main__":
    unittest.main()
