"""A small hand-written RESP2/RESP3 client: sends any bytes as arguments (NUL, invalid UTF-8,
CR/LF) and reads every RESP3 type, with a deadline on every read."""

import socket
import time


class ConnClosed(Exception):
    """The server closed the connection (or it could not be used)."""


class ReplyTimeout(Exception):
    """No complete reply within the deadline."""


class RespError:
    """An error reply (- or !); a value, not an exception, so that pipelines read on."""

    __slots__ = ("message",)

    def __init__(self, message):
        self.message = message

    def __repr__(self):
        return f"RespError({self.message!r})"


class Push(list):
    """An out-of-band RESP3 push (>): invalidations, pubsub messages."""


def encode(argv):
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(argv)]
    for arg in argv:
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return b"".join(out)


class RespConn:
    def __init__(self, port, timeout=2.0):
        try:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as err:
            raise ConnClosed(f"connect: {err}") from err
        self.buf = bytearray()
        self.pos = 0
        self.closed = False

    def local_port(self):
        try:
            return self.sock.getsockname()[1]
        except OSError:
            return None

    def send(self, data):
        if self.closed:
            raise ConnClosed("already closed")
        try:
            self.sock.sendall(data)
        except OSError as err:
            self.close()
            raise ConnClosed(f"send: {err}") from err

    def send_command(self, argv):
        self.send(encode(argv))

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def drain(self):
        """Discard whatever has already arrived (unsolicited pushes, monitor lines)."""
        if self.closed:
            return
        self.buf.clear()
        self.pos = 0
        try:
            self.sock.setblocking(False)
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    self.close()
                    return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()
        finally:
            if not self.closed:
                self.sock.setblocking(True)

    # Reading --------------------------------------------------------------------------------

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReplyTimeout()
        if self.pos > (1 << 20):
            del self.buf[: self.pos]
            self.pos = 0
        try:
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(1 << 18)
        except TimeoutError as err:
            raise ReplyTimeout() from err
        except OSError as err:
            self.close()
            raise ConnClosed(f"recv: {err}") from err
        if not chunk:
            self.close()
            raise ConnClosed("EOF")
        self.buf += chunk

    def _line(self, deadline):
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos : end])
                self.pos = end + 2
                return line
            self._fill(deadline)

    def _exact(self, n, deadline):
        while len(self.buf) - self.pos < n + 2:
            self._fill(deadline)
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n + 2
        return data

    def _parse(self, deadline):
        line = self._line(deadline)
        if not line:
            raise ConnClosed("protocol: empty line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest)
        if kind == b":":
            return int(rest)
        if kind in (b"$", b"=", b"!"):
            n = int(rest)
            if n < 0:
                return None
            data = self._exact(n, deadline)
            return RespError(data) if kind == b"!" else data
        if kind in (b"*", b"~", b">"):
            n = int(rest)
            if n < 0:
                return None
            items = [self._parse(deadline) for _ in range(n)]
            return Push(items) if kind == b">" else items
        if kind == b"%":
            n = int(rest)
            out = {}
            for _ in range(n):
                key = self._parse(deadline)
                out[key if isinstance(key, (bytes, int)) else repr(key)] = self._parse(deadline)
            return out
        if kind == b"_":
            return None
        if kind == b",":
            return float(rest) if rest not in (b"inf", b"-inf", b"nan") else rest
        if kind == b"#":
            return rest == b"t"
        if kind == b"(":
            return int(rest)
        if kind == b"|":
            n = int(rest)
            for _ in range(2 * n):
                self._parse(deadline)
            return self._parse(deadline)
        raise ConnClosed(f"protocol: unexpected reply type {line[:40]!r}")

    def read(self, timeout=2.0):
        """The next frame, pushes included."""
        if self.closed:
            raise ConnClosed("already closed")
        start = self.pos
        try:
            return self._parse(time.monotonic() + timeout)
        except ReplyTimeout:
            self.pos = start  # A partial frame stays for the next read.
            raise
        except (ValueError, IndexError) as err:
            self.close()
            raise ConnClosed(f"protocol: {err}") from err

    def read_reply(self, timeout=2.0, skip_messages=False):
        """The next reply, skipping RESP3 pushes (and, for a RESP2 subscriber, messages)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.read(max(0.001, deadline - time.monotonic()))
            if isinstance(frame, Push):
                continue
            if (
                skip_messages
                and isinstance(frame, list)
                and frame
                and frame[0] in (b"message", b"pmessage", b"smessage")
            ):
                continue
            return frame

    def call(self, argv, timeout=2.0):
        self.send_command(argv)
        return self.read_reply(timeout)
