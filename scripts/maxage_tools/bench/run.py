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
from maxage_tools.bench.model import FULL, QUICK, ROW_TITLES, Figure, log
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
from maxage_tools.servers import ServerError, find_server

# --------------------------------------------------------------------------------------------
# The run: servers, holders and figures, all cleaned up however it ends


class Bench:
    def __init__(self, plan, module, has_valkey):
        self.plan = plan
        self.module = module
        self.has_valkey = has_valkey
        self.figures = []
        self.notes = []
        self.versions = {}
        self._servers = []
        self._holders = []

    def start_redis(self, label, with_module=False, module_args=()):
        module = self.module if with_module else None
        return self._start(Server(label, "redis", module, module_args))

    def start_valkey(self, label):
        return self._start(Server(label, "valkey"))

    def _start(self, server):
        self._servers.append(server)
        server.start()
        self.versions.setdefault(server.version(), server.label)
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

    def release(self):
        """Stops every helper and server this part of the run started."""
        for holder in self._holders:
            holder.stop()
        for server in self._servers:
            server.stop()
        self._holders.clear()
        self._servers.clear()


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
    args = parser.parse_args()
    args.rows = set(ROW_TITLES) if not args.only else {int(r) for r in args.only.split(",")}
    if not args.rows <= set(ROW_TITLES):
        parser.error(f"rows are {sorted(ROW_TITLES)}")
    return args


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
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="maxage-bench-") as workdir:
        # A private copy: a rebuild during the run must not change the module under test.
        module = shutil.copy(
            processes.built_module_path(log), os.path.join(workdir, "libredis_maxage.so")
        )
        bench = Bench(plan, module, valkey_binary() is not None)
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
            "rows": [figure.as_json() for figure in figures],
            "notes": bench.notes,
        }
        json.dump(report, out, indent=2)
    log(f"wrote {args.json}")
    return 0 if ok else 1
