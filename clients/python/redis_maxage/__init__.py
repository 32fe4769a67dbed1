"""redis-py adapter for the redis-maxage module's notices (docs/notices.md).

A connection opts in when it connects; the module tells it, `maxage.notice-lead-ms` before
the module would retire it, with a RESP3 invalidation push of its own notice key. The adapter
then marks the connection: it finishes the request in flight and is closed when it goes back
to the pool (or at its next checkout), and the pool opens a new one. Nothing is resent.

    import redis_maxage
    client = redis_maxage.Redis(host="127.0.0.1", port=6379)      # instead of redis.Redis(...)
    pool = redis_maxage.ConnectionPool(host="127.0.0.1", port=6379)  # or the pool itself

Without the module the connections stay plain redis-py connections. On RESP2 (`protocol=2`)
no push can arrive: a connection retires itself `notice-lead-ms` before the deadline it was
told at opt-in, and misses later changes (a CONFIG SET, MAXAGE.KILL ... GRACEFUL).
"""

import logging
import time
import weakref

import redis
from redis.event import AfterSingleConnectionInstantiationEvent, ClientType
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
    """Puts the notice check in front of the parser's push dispatch (every redis-py parser,
    hiredis too, hands each push to its handle_push_response). The application's invalidation
    handler (set_invalidation_push_handler) gets every other invalidation, untouched."""
    dispatch = getattr(parser, "handle_push_response", None)
    if dispatch is None or getattr(dispatch, "_maxage", False):
        return
    owner = weakref.ref(connection)

    def handle_push_response(response, *args, **kwargs):
        noticed, rest = split_notice(response)
        if noticed:
            conn = owner()
            if conn is not None:
                conn._maxage_noticed()
            if rest is None:
                return None
        return dispatch(rest, *args, **kwargs)

    handle_push_response._maxage = True
    parser.handle_push_response = handle_push_response


class MaxAgeConnectionMixin:
    """Opts a redis-py connection in to the module's notices (in front of a Connection class).

    maxage           the opt-in's reply (a dict), None without the module
    maxage_noticed   True once the notice came (the connection retires when released)
    """

    def __init__(self, *args, **kwargs):
        self.maxage = None
        self.maxage_noticed = False
        self._maxage_retire_at = None
        super().__init__(*args, **kwargs)

    def set_parser(self, parser_class):
        super().set_parser(parser_class)
        _wrap_parser(self, self._parser)

    def on_connect_check_health(self, check_health=True):
        super().on_connect_check_health(check_health)
        self._maxage_opt_in()

    def _maxage_read_all(self, count):
        replies = []
        for _ in range(count):
            try:
                replies.append(self.read_response())
            except ResponseError as error:
                replies.append(error)
        return replies

    def _maxage_opt_in(self):
        self.maxage = None
        self.maxage_noticed = False
        self._maxage_retire_at = None
        resp3 = str(self.protocol) == "3" and not getattr(self, "_resp2_fallback", False)
        commands = _notice.opt_in_commands(resp3)
        started = _notice.started_at()
        self.send_packed_command(self.pack_commands(commands), check_health=False)
        opt_in = _notice.OptIn(self._maxage_read_all(len(commands)), resp3, started)
        if opt_in.follow_up:
            self.send_packed_command(self.pack_commands(opt_in.follow_up), check_health=False)
            opt_in.followed_up(self._maxage_read_all(len(opt_in.follow_up)))
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

    def disconnect(self, *args, **kwargs):
        self._maxage_retire_at = None
        super().disconnect(*args, **kwargs)


class Connection(MaxAgeConnectionMixin, redis.Connection):
    pass


class SSLConnection(MaxAgeConnectionMixin, redis.SSLConnection):
    pass


class UnixDomainSocketConnection(MaxAgeConnectionMixin, redis.UnixDomainSocketConnection):
    pass


_CONNECTION_CLASSES = {
    redis.Connection: Connection,
    redis.SSLConnection: SSLConnection,
    redis.UnixDomainSocketConnection: UnixDomainSocketConnection,
}


def maxage_connection_class(connection_class):
    """The adapter's variant of a redis-py connection class (made once for other classes)."""
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
    """A pool of adapted connections: at checkout a connection that must retire (its notice
    read, or its time up) is replaced before it is handed out; at release redis-py closes one
    marked for reconnect."""

    def __init__(self, *args, connection_class=redis.Connection, **kwargs):
        super().__init__(
            *args, connection_class=maxage_connection_class(connection_class), **kwargs
        )

    def ensure_connection(self, connection):
        super().ensure_connection(connection)
        if connection.should_reconnect():
            connection.disconnect()
            connection.connect()


class ConnectionPool(MaxAgePoolMixin, redis.ConnectionPool):
    pass


class BlockingConnectionPool(MaxAgePoolMixin, redis.BlockingConnectionPool):
    pass


_POOL_CLASSES = {
    redis.ConnectionPool: ConnectionPool,
    redis.BlockingConnectionPool: BlockingConnectionPool,
}


def adapt_pool(pool):
    """Turns a redis-py pool that has not opened a connection yet into the adapter's (in place)."""
    if isinstance(pool, MaxAgePoolMixin):
        return pool
    pool_class = _POOL_CLASSES.get(type(pool))
    if pool_class is None:
        pool_class = type(f"MaxAge{type(pool).__name__}", (MaxAgePoolMixin, type(pool)), {})
        _POOL_CLASSES[type(pool)] = pool_class
    pool.__class__ = pool_class
    pool.connection_class = maxage_connection_class(pool.connection_class)
    return pool


class Redis(redis.Redis):
    """redis.Redis whose pool is the adapter's: the same arguments, from_url too. (redis-py
    itself closes and reopens a connection marked for reconnect after its command, so a
    `single_connection_client` retires on the notice as well.)"""

    def __init__(self, *args, single_connection_client=False, **kwargs):
        super().__init__(*args, single_connection_client=False, **kwargs)
        adapt_pool(self.connection_pool)
        if single_connection_client:
            # What redis.Redis does for it, once the pool makes the adapter's connections.
            self._single_connection_client = True
            self.connection = self.connection_pool.get_connection()
            self._event_dispatcher.dispatch(
                AfterSingleConnectionInstantiationEvent(
                    self.connection, ClientType.SYNC, self.single_connection_lock
                )
            )
