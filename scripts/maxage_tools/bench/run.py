"""The bench's run: its servers, holders and figures (Bench), every group of rows, and the
command line (the package's docstring is its --help)."""

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

from maxage_tools import processes, servers
from maxage_tools.bench.clients import Holder
from maxage_tools.bench.kill import bench_one_shot_kill
from maxage_tools.bench.model import (
    DEFAULT_SETUP,
    FULL,
    QUICK,
    REDIS_8_IO_THREADS,
    ROW_TITLES,
    Figure,
    log,
)
from maxage_tools.bench.output import (
    LEGEND,
    footnotes,
    machine_description,
    markdown_table,
    text_table,
)
from maxage_tools.bench.precision import bench_precision
from maxage_tools.bench.resp3 import bench_resp3_due
from maxage_tools.bench.scaling import bench_scaling
from maxage_tools.bench.server import Server
from maxage_tools.bench.stall import bench_stall
from maxage_tools.bench.steady import bench_steady_state
from maxage_tools.servers import ServerError, find_release_server, find_server

# --------------------------------------------------------------------------------------------
# The run: servers, holders and figures, all cleaned up however it ends


class Bench:
    def __init__(self, plan, module, has_valkey, setup=DEFAULT_SETUP, redis_binary=None):
        self.plan = plan
        self.module = module
        self.has_valkey = has_valkey
        self.setup = setup
        self.redis_binary = redis_binary  # None: servers.find_server("redis")'s
        self.figures = []
        self.notes = []
        self.versions = {}
        self._servers = []
        self._holders = []
        self._descriptions = {}  # server label -> Server.description()

    def start_redis(self, label, with_module=False, module_args=()):
        module = self.module if with_module else None
        server = Server(
            label, "redis", module, module_args, self.redis_binary, self.setup.redis_config
        )
        return self._start(server)

    def start_valkey(self, label):
        return self._start(Server(label, "valkey"))

    def start_native_kill(self, label):
        """A stock server whose own CLIENT KILL MAXAGE is row 3's baseline."""
        if self.setup.native_kill == "valkey":
            return self.start_valkey(f"{label}-valkey")
        return self.start_redis(f"{label}-stock")

    @property
    def native_kill_product(self):
        return "Valkey" if self.setup.native_kill == "valkey" else "Redis"

    def _start(self, server):
        self._servers.append(server)
        server.start()
        self.versions.setdefault(server.version(), server.label)
        if self.setup.names_servers:
            # Read now: a server that dies later in the group can no longer say.
            self._descriptions[server.label] = server.description()
        return server

    def holder(self, server):
        holder = Holder(server)
        self._holders.append(holder)
        return holder

    def add(self, figures):
        self.figures += figures

    def note(self, text):
        log(f"note: {text}")
        self.notes.append(text)

    def name_servers(self, figures):
        """Marks figures with what this part of the run's servers ran (when the setup names
        them): one description when every server ran the same, else each with its servers."""
        if not self.setup.names_servers:
            return
        labels_of = {}
        for label, description in self._descriptions.items():
            labels_of.setdefault(description, []).append(label)
        if len(labels_of) == 1:
            named = next(iter(labels_of))
        else:
            named = "; ".join(f"{d} ({', '.join(labels)})" for d, labels in labels_of.items())
        for figure in figures:
            figure.server = named or "(no server started)"

    def release(self):
        """Stops every helper and server this part of the run started."""
        for holder in self._holders:
            holder.stop()
        for server in self._servers:
            server.stop()
        self._holders.clear()
        self._servers.clear()
        self._descriptions.clear()


def run_rows(bench, rows):
    """Runs each group of rows on its own servers, stopping them before the next group; a group
    that fails is reported and the others still run."""
    groups = [
        ({1, 2, 6, 7}, lambda: bench_steady_state(bench.plan, bench, rows)),
        ({3}, lambda: bench.add(bench_one_shot_kill(bench.plan, bench))),
        ({4}, lambda: bench.add(bench_stall(bench.plan, bench))),
        ({5}, lambda: bench.add(bench_precision(bench.plan, bench))),
        ({8}, lambda: bench.add(bench_resp3_due(bench.plan, bench))),
        ({9}, lambda: bench.add(bench_scaling(bench.plan, bench))),
    ]
    failed = False
    for group_rows, run in groups:
        if not group_rows & rows:
            continue
        first = len(bench.figures)
        try:
            run()
        except Exception:  # noqa: BLE001 - report it, mark the rows, run the rest
            failed = True
            traceback.print_exc()
            for row in sorted(group_rows & rows):
                bench.note(f"row {row} failed: {sys.exc_info()[1]}")
                bench.add(
                    [
                        Figure(
                            row=row,
                            figure="(failed, see stderr)",
                            unit="",
                            module=None,
                            failed=True,
                        )
                    ]
                )
        finally:
            bench.name_servers(bench.figures[first:])
            bench.release()
    return not failed


# --------------------------------------------------------------------------------------------
# Setup and entry point


def source_revision():
    """The commit the module was built from, as far as the work tree tells ("+edits" when the
    module's sources differ from it)."""

    def git(*args):
        run = subprocess.run(
            ["git", *args], cwd=processes.ROOT, capture_output=True, text=True, check=False
        )
        return run.stdout.strip() if run.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "unknown"
    edited = git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")
    return commit + ("+edits" if edited else "")


def valkey_binary():
    try:
        path = find_server("valkey")
    except ServerError:
        return None
    return path if os.path.exists(path) else None


def parse_args():
    parser = argparse.ArgumentParser(
        description=sys.modules[__package__].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a much smaller run of every row")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    default_json = os.path.join(processes.ROOT, "target", "bench.json")
    parser.add_argument("--json", default=default_json, help="write results here")
    parser.add_argument("--only", help="comma-separated row numbers (default: all)")
    parser.add_argument(
        REDIS_8_IO_THREADS.name,
        dest="setup",
        action="store_const",
        const=REDIS_8_IO_THREADS,
        default=DEFAULT_SETUP,
        help="rows 1, 3, 4 (the default rows with it) on Redis 8.0.6 with io-threads 2, every "
        "server alike; row 3 against Redis 8.0.6's own CLIENT KILL MAXAGE",
    )
    args = parser.parse_args()
    setup_rows = set(args.setup.rows)
    args.rows = setup_rows if not args.only else {int(r) for r in args.only.split(",")}
    if not args.rows <= set(ROW_TITLES):
        parser.error(f"rows are {sorted(ROW_TITLES)}")
    if not args.rows <= setup_rows:
        parser.error(f"{args.setup.name} runs rows {', '.join(map(str, sorted(setup_rows)))}")
    return args


def setup_redis_binary(setup):
    """The setup's redis-server when it is not Debian's (None), found or built before any
    server starts; exits when it cannot be had."""
    if setup.redis_release is None:
        return None
    try:
        return find_release_server(setup.redis_release, log)
    except ServerError as error:
        sys.exit(f"bench: {setup.name}: {error}")


def setup_json(setup, binary):
    """The JSON's "setup", for a run on another setup than the default (whose JSON stays as it
    was)."""
    if not setup.names_servers:
        return {}
    return {
        "setup": {
            "option": setup.name,
            "description": setup.description,
            "redis_server": binary,
            "redis_config": list(setup.redis_config),
            "row_3_baseline": f"{setup.native_kill}-server's own CLIENT KILL MAXAGE",
        }
    }


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, processes.exit_on_signal)
    signal.signal(signal.SIGHUP, processes.exit_on_signal)
    multiprocessing.set_start_method("fork")
    servers.raise_open_file_limit()
    plan = QUICK if args.quick else FULL
    try:
        redis_binary = find_server("redis")
    except ServerError:
        redis_binary = None
    if not redis_binary or not shutil.which("redis-benchmark"):
        sys.exit(
            "bench: redis-server and redis-benchmark must be on PATH (scripts/setup installs them)"
        )
    setup = args.setup
    setup_binary = setup_redis_binary(setup)
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="maxage-bench-") as workdir:
        # A private copy: a rebuild during the run must not change the module under test.
        module = shutil.copy(
            processes.built_module_path(log), os.path.join(workdir, "libredis_maxage.so")
        )
        bench = Bench(plan, module, valkey_binary() is not None, setup, setup_binary)
        try:
            ok = run_rows(bench, args.rows)
        finally:
            bench.release()
    elapsed = (datetime.datetime.now(datetime.UTC) - started).total_seconds()

    figures = sorted(bench.figures, key=lambda f: f.row)
    machine = machine_description()
    machine_line = f"{machine['nproc']} x {machine['cpu']}, {machine['kernel']}"
    server_versions = ", ".join(sorted(bench.versions))
    revision = source_revision()
    run_line = (
        f"redis-maxage bench ({plan.name}) of {revision}, {started:%Y-%m-%d %H:%M} UTC, "
        f"{elapsed:.0f} s; {server_versions}"
    )
    if setup.names_servers:
        run_line += f"\nSetup ({setup.name}): {setup.description}; {setup_binary or redis_binary}"
    print(run_line)
    print(f"Machine: {machine_line}")
    print()
    print(text_table(figures))
    print()
    print(LEGEND)
    print("\n".join(footnotes(figures, bench.notes)))
    if args.markdown:
        print()
        print(markdown_table(figures, bench.notes, machine_line, run_line))

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as out:
        report = {
            "plan": dataclasses.asdict(plan),
            "date": started.isoformat(),
            "revision": revision,
            "elapsed_s": elapsed,
            "machine": machine,
            "servers": sorted(bench.versions),
            **setup_json(setup, setup_binary or redis_binary),
            "rows": [figure.as_json() for figure in figures],
            "notes": bench.notes,
        }
        json.dump(report, out, indent=2)
    log(f"wrote {args.json}")
    return 0 if ok else 1
