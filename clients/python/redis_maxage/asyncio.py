"""The adapter for redis.asyncio: the same as redis_maxage, for its connections and pools.

import redis_maxage.asyncio
client = redis_maxage.asyncio.Redis(host="127.0.0.1", port=6379)  # redis.asyncio.Redis(...)
"""

import logging
import time
import weakref

import redis.asyncio
from redis.exceptions import ResponseError

from . import _notice
from ._notice import NOTICE_PREFIX, is_notice_key, split_notice

__all__ = [
    "NOTICE_PREFIX",
    "BlockingConnectionPool",
    "Connection",
    "ConnectionPool",
    "MaxAgeConnectionMixin",
    "MaxAgePoolMixin",
    "Redis",
    "SSLConnection",
    "UnixDomainSocketConnection",
    "adapt_pool",
    "is_notice_key",
    "maxage_connection_class",
    "split_notice",
]

logger = logging.getLogger("redis_maxage")


def _wrap_parser(connection, parser):
    """The async parsers await handle_push_response for each push: the notice check goes in
    front of it; other pushes reach the handlers the application set, untouched."""
    dispatch = getattr(parser, "handle_push_response", None)
    if dispatch is None or getattr(dispatch, "_maxage", False):
        return
    owner = weakref.ref(connection)

    async def handle_push_response(response, *args, **kwargs):
        noticed, rest = split_notice(response)
        if noticed:
            conn = owner()
            if conn is not None:
                conn._maxage_noticed()
            if rest is None:
                return None
        return await dispatch(rest, *args, **kwargs)

    handle_push_response._maxage = True
    parser.handle_push_response = handle_push_response


class MaxAgeConnectionMixin:
    """Opts a redis.asyncio connection in to the module's notices (see redis_maxage)."""

    def __init__(self, *args, **kwargs):
        self.maxage = None
        self.maxage_noticed = False
        self._maxage_retire_at = None
        super().__init__(*args, **kwargs)

    def set_parser(self, parser_class):
        super().set_parser(parser_class)
        _wrap_parser(self, self._parser)

    async def on_connect_check_health(self, check_health=True):
        await super().on_connect_check_health(check_health)
        await self._maxage_opt_in()

    async def _maxage_read_all(self, count):
        replies = []
        for _ in range(count):
            try:
                replies.append(await self.read_response())
            except ResponseError as error:
                replies.append(error)
        return replies

    async def _maxage_opt_in(self):
        self.maxage = None
        self.maxage_noticed = False
        self._maxage_retire_at = None
        resp3 = str(self.protocol) == "3" and not getattr(self, "_resp2_fallback", False)
        commands = _notice.opt_in_commands(resp3)
        started = _notice.started_at()
        await self.send_packed_command(self.pack_commands(commands), check_health=False)
        opt_in = _notice.OptIn(await self._maxage_read_all(len(commands)), resp3, started)
        if opt_in.follow_up:
            await self.send_packed_command(self.pack_commands(opt_in.follow_up), check_health=False)
            opt_in.followed_up(await self._maxage_read_all(len(opt_in.follow_up)))
        if opt_in.error is not None:
            logger.debug("redis-maxage: no notices on %r: %s", self, opt_in.error)
        self.maxage = opt_in.reply
        self._maxage_retire_at = opt_in.retire_at

    def _maxage_noticed(self):
        self.maxage_noticed = True
        self.mark_for_reconnect()

    def should_reconnect(self):
        if super().should_reconnect():
            return True
        retire_at = self._maxage_retire_at
        return retire_at is not None and time.monotonic() >= retire_at

    async def disconnect(self, *args, **kwargs):
        self._maxage_retire_at = None
        await super().disconnect(*args, **kwargs)


class Connection(MaxAgeConnectionMixin, redis.asyncio.Connection):
    pass


class SSLConnection(MaxAgeConnectionMixin, redis.asyncio.SSLConnection):
    pass


class UnixDomainSocketConnection(MaxAgeConnectionMixin, redis.asyncio.UnixDomainSocketConnection):
    pass


_CONNECTION_CLASSES = {
    redis.asyncio.Connection: Connection,
    redis.asyncio.SSLConnection: SSLConnection,
    redis.asyncio.UnixDomainSocketConnection: UnixDomainSocketConnection,
}


def maxage_connection_class(connection_class):
    """The adapter's variant of a redis.asyncio connection class."""
    if issubclass(connection_class, MaxAgeConnectionMixin):
        return connection_class
    adapted = _CONNECTION_CLASSES.get(connection_class)
    if adapted is None:
        adapted = type(
            f"MaxAge{connection_class.__name__}", (MaxAgeConnectionMixin, connection_class), {}
        )
        _CONNECTION_CLASSES[connection_class] = adapted
    return adapted


class MaxAgePoolMixin:
    """A redis.asyncio pool of adapted connections (see redis_maxage.MaxAgePoolMixin)."""

    def __init__(self, *args, connection_class=redis.asyncio.Connection, **kwargs):
        super().__init__(
            *args, connection_class=maxage_connection_class(connection_class), **kwargs
        )

    async def ensure_connection(self, connection):
        await super().ensure_connection(connection)
        if connection.should_reconnect():
            await connection.disconnect()
            await connection.connect()


class ConnectionPool(MaxAgePoolMixin, redis.asyncio.ConnectionPool):
    pass


class BlockingConnectionPool(MaxAgePoolMixin, redis.asyncio.BlockingConnectionPool):
    pass


_POOL_CLASSES = {
    redis.asyncio.ConnectionPool: ConnectionPool,
    redis.asyncio.BlockingConnectionPool: BlockingConnectionPool,
}


def adapt_pool(pool):
    """Turns a redis.asyncio pool that has not opened a connection yet into the adapter's."""
    if isinstance(pool, MaxAgePoolMixin):
        return pool
    pool_class = _POOL_CLASSES.get(type(pool))
    if pool_class is None:
        pool_class = type(f"MaxAge{type(pool).__name__}", (MaxAgePoolMixin, type(pool)), {})
        _POOL_CLASSES[type(pool)] = pool_class
    pool.__class__ = pool_class
    pool.connection_class = maxage_connection_class(pool.connection_class)
    return pool


class Redis(redis.asyncio.Redis):
    """redis.asyncio.Redis whose pool is the adapter's: the same arguments, from_url too (its
    single connection, taken from the pool on first use, is an adapted one as well)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        adapt_pool(self.connection_pool)
