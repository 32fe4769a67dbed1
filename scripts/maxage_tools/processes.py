"""What every script does with processes: children that die with the script, the module to load
(built if missing), free loopback ports, and the errors and signals that end a run.

    preexec_fn=processes.die_with_parent          # the child gets SIGKILL when we die
    processes.die_with_parent(signal.SIGTERM)     # ...or SIGTERM, called in the child itself
    processes.module_path()                       # MAXAGE_MODULE_PATH or the release build
    processes.built_module_path(log)              # the same, built with cargo when missing
    signal.signal(signal.SIGTERM, processes.raise_terminated)   # finally blocks run
"""

import ctypes
import os
import signal
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PR_SET_PDEATHSIG = 1
# Loaded here, in the parent, so that a child between fork and exec does not dlopen.
_LIBC = ctypes.CDLL(None, use_errno=True)


class CannotRun(Exception):
    """The run could not be set up (a missing binary or module, a server that refused to start,
    ...)."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so every finally block runs."""


def raise_terminated(signum, frame):
    """Signal handler: SIGTERM as Terminated."""
    raise Terminated()


def exit_on_signal(signum, _frame):
    """Signal handler: SystemExit(128 + signum), which unwinds through every finally, so servers
    and helpers are stopped on SIGTERM/SIGHUP too."""
    raise SystemExit(128 + signum)


def die_with_parent(signum=signal.SIGKILL):
    """Asks the kernel to send this process `signum` when its parent dies, even by SIGKILL, so
    no server or helper outlives the script that started it. Called in the child: as preexec_fn
    (before exec) or first thing in a forked helper. (A helper's pipe would not tell it: forked
    helpers hold copies of each other's pipe ends.)"""
    _LIBC.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def module_path():
    """The module to load: MAXAGE_MODULE_PATH or the release build."""
    return os.environ.get("MAXAGE_MODULE_PATH") or os.path.join(
        ROOT, "target", "release", "libredis_maxage.so"
    )


def built_module_path(log):
    """module_path(), first built with `cargo build --release` when it is the release build and
    missing (saying so through `log`). Raises CannotRun when the file is not there after all."""
    path = module_path()
    if not os.environ.get("MAXAGE_MODULE_PATH") and not os.path.isfile(path):
        log("building the module: cargo build --release --quiet")
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=False)
    if not os.path.isfile(path):
        raise CannotRun(f"the module {path} does not exist (cargo build --release)")
    return path


def free_port():
    """A loopback port nobody listens on right now (the OS picks it); never 6379. The window
    before the server binds it is covered by Server's retry on "Address already in use"."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port != 6379:
            return port
