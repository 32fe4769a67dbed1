"""The notice protocol of docs/notices.md, without I/O: what a connection sends to opt in, what
it makes of the replies, and how it tells the notice from the application's invalidations.
Shared by the sync adapter (redis_maxage) and the asyncio one (redis_maxage.asyncio)."""

import time

NOTICE_PREFIX = "__maxage__:notice:"
_NOTICE_PREFIX_BYTES = NOTICE_PREFIX.encode()

TRACKING_ON = ("CLIENT", "TRACKING", "ON", "OPTIN")
CACHING_YES = ("CLIENT", "CACHING", "YES")
TRACKING_OFF = ("CLIENT", "TRACKING", "OFF")
NOTICE = ("MAXAGE.NOTICE",)


def opt_in_commands(resp3):
    """The pipelined opt-in: RESP3 tracks the notice key (OPTIN: nothing else), RESP2 can only
    ask for its deadline."""
    if resp3:
        return [TRACKING_ON, CACHING_YES, NOTICE]
    return [NOTICE]


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _as_dict(reply):
    """MAXAGE.NOTICE's reply: a map on RESP3, a flat list of pairs on RESP2."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    if isinstance(reply, list | tuple) and len(reply) % 2 == 0:
        return {_text(reply[i]): _text(reply[i + 1]) for i in range(0, len(reply), 2)}
    return None


class OptIn:
    """What a connection learnt from opting in.

    reply       MAXAGE.NOTICE's reply as a dict of str (None: the server refused it, e.g. the
                module is not loaded, and the connection is left as plain redis-py)
    push        True when the server will push the notice
    retire_at   time.monotonic() at which the connection retires without a notice, or None:
                without a push (RESP2) notice-lead-ms before the deadline given at opt-in; with a
                push, half the lead after the planned notice, a fallback for a notice that
                cannot come (the server forgets every tracked key on FLUSHALL / FLUSHDB; on
                Redis 7.0 a notice due at once may precede the key's registration)
    follow_up   commands still to send (their replies go to `followed_up`)
    error       the error MAXAGE.NOTICE got, if any
    """

    def __init__(self, replies, resp3, started):
        self.reply = None
        self.push = False
        self.retire_at = None
        self.follow_up = []
        self.error = None
        self._started = started
        tracking_on = resp3 and not isinstance(replies[0], Exception)
        notice = replies[-1]
        reply = None if isinstance(notice, Exception) else _as_dict(notice)
        if reply is None:
            self.error = notice if isinstance(notice, Exception) else ValueError(repr(notice))
            if tracking_on:
                self.follow_up = [TRACKING_OFF]
            return
        self.reply = reply
        self.push = reply.get("push") == 1
        lead_ms = reply.get("notice-lead-ms") or 0
        deadline_ms = reply.get("deadline-in-ms")
        if self.push:
            notice_ms = reply.get("notice-in-ms")
            if notice_ms is not None:
                self.retire_at = started + (notice_ms + lead_ms / 2) / 1000
            if reply.get("key-tracked") == 0 and reply.get("key"):
                # Redis 7.0: the client reads its key itself, so that the server tracks it.
                self.follow_up = [CACHING_YES, ("MAXAGE.NOTICEKEY", reply["key"])]
            return
        if tracking_on:
            self.follow_up = [TRACKING_OFF]  # nothing to track: back to a plain connection
        self._retire_before_deadline(deadline_ms, lead_ms)

    def _retire_before_deadline(self, deadline_ms, lead_ms):
        if deadline_ms is not None and lead_ms > 0:
            self.retire_at = self._started + max(0, deadline_ms - lead_ms) / 1000

    def followed_up(self, replies):
        """The follow-up's replies: a refused MAXAGE.NOTICEKEY means no push will come."""
        if self.push and self.follow_up and isinstance(replies[-1], Exception):
            self.push = False
            self.error = replies[-1]
            self._retire_before_deadline(
                self.reply.get("deadline-in-ms"), self.reply.get("notice-lead-ms") or 0
            )


def started_at():
    """The opt-in's time origin: taken before it is sent, so that every time derived from the
    server's relative figures is on the early side."""
    return time.monotonic()


def is_notice_key(key):
    if isinstance(key, bytes):
        return key.startswith(_NOTICE_PREFIX_BYTES)
    return isinstance(key, str) and key.startswith(NOTICE_PREFIX)


def split_notice(response):
    """(noticed, rest) for a push: noticed when it invalidates a notice key; rest is the push
    to pass on to the application's handlers (None: nothing left)."""
    try:
        kind, keys = response[0], response[1]
    except (TypeError, IndexError, KeyError):
        return False, response
    if _text(kind) != "invalidate" or not isinstance(keys, list | tuple):
        return False, response  # other pushes, and FLUSHALL's null invalidation
    others = [key for key in keys if not is_notice_key(key)]
    if len(others) == len(keys):
        return False, response
    if not others:
        return True, None
    return True, [response[0], others, *response[2:]]
