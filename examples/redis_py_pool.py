"""A redis-py pool whose connections live at most MAX_AGE_MS: every new connection asks the
server to retire it at that age (MAXAGE.SELF), and the pool replaces retired ones by itself.

With the adapter in clients/python (`pip install ./clients/python`), connections also leave by
themselves `maxage.notice-lead-ms` before the module would close them, so no request fails on a
retirement (docs/notices.md). In one line, for the server's max age:

    client = redis_maxage.Redis(host="127.0.0.1", port=6379)   # instead of redis.Redis(...)

make_pool(notices=True) below combines both: MAXAGE.SELF first, then the adapter opts in.
"""

import redis

MAX_AGE_MS = 300_000  # 5 minutes


class MaxAgeConnection(redis.Connection):
    max_age_ms = MAX_AGE_MS

    def request_max_age(self):
        self.send_command("MAXAGE.SELF", self.max_age_ms)
        if self.read_response() != b"OK":
            raise redis.ConnectionError("MAXAGE.SELF refused")

    # redis-py 6+ runs on_connect_check_health on every new connection; older ones on_connect.
    if hasattr(redis.Connection, "on_connect_check_health"):

        def on_connect_check_health(self, check_health=True):
            super().on_connect_check_health(check_health)
            self.request_max_age()

    else:

        def on_connect(self):
            super().on_connect()
            self.request_max_age()


def make_pool(host="127.0.0.1", port=6379, max_age_ms=MAX_AGE_MS, notices=False, **kwargs):
    connection_class = type("Conn", (MaxAgeConnection,), {"max_age_ms": max_age_ms})
    pool_class = redis.ConnectionPool
    if notices:
        import redis_maxage  # clients/python: its pool opts each connection in to notices

        pool_class = redis_maxage.ConnectionPool
    return pool_class(
        host=host, port=port, connection_class=connection_class, max_connections=100, **kwargs
    )


if __name__ == "__main__":
    client = redis.Redis(connection_pool=make_pool())
    print(client.ping())
