"""The module graph of src/: which file uses which (`crate::x` anywhere in it), its cycles, and
whether the pure policy (src/policy/) stays clear of the server boundary and the commands.

    python3 scripts/maxage_tools/imports.py          # fails (exit 1) on a cycle or a layer breach
    python3 scripts/maxage_tools/imports.py --depth  # also prints each file's longest chain

A file's module is its path under src/ (`ffi/acl.rs` is `ffi::acl`; `mod.rs` is its folder).
A use of `crate::a::b::c` counts for the longest module path that exists (`a::b` if `a/b.rs`
exists), so a folder's own `mod.rs` re-exports do not hide who uses what.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
CRATE_PATH = re.compile(r"crate((?:::[a-z_][a-z0-9_]*)+)")
USE_GROUP = re.compile(r"use crate::\{([^;]*)\};", re.DOTALL)


def module_of(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return "::".join(parts)


def graph() -> dict[str, set[str]]:
    files = {module_of(p): p for p in SRC.rglob("*.rs")}
    modules = set(files)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in files.items():
        text = path.read_text()
        # Strip unit tests: they may use anything.
        text = text.split("#[cfg(test)]\nmod tests")[0]
        paths = [m.group(1) for m in CRATE_PATH.finditer(text)]
        for group in USE_GROUP.finditer(text):
            paths += ["::" + item.strip().split("::")[0] for item in group.group(1).split(",")]
        for used in paths:
            words = used.strip(":").split("::")
            for length in range(len(words), 0, -1):
                target = "::".join(words[:length])
                if target in modules:
                    if target != module and not module.startswith(target + "::") and module != "":
                        edges[module].add(target)
                    break
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


# The pure policy never reaches the server or the commands (unit-tested without a server).
LAYERS = {"policy": ("server", "commands")}


def layering_violations(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for node, targets in sorted(edges.items()):
        banned = LAYERS.get(node.split("::")[0], ())
        for target in sorted(targets):
            if target.split("::")[0] in banned:
                found.append(f"{node} -> {target}")
    return found


def depths(edges: dict[str, set[str]]) -> dict[str, int]:
    memo: dict[str, int] = {}

    def depth(node: str) -> int:
        if node not in memo:
            memo[node] = 0
            memo[node] = 1 + max((depth(n) for n in edges[node]), default=0)
        return memo[node]

    return {node: depth(node) for node in edges}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", action="store_true", help="print each file's longest chain")
    args = parser.parse_args()
    edges = graph()
    cycle = find_cycle(edges)
    if args.depth:
        for node, d in sorted(depths(edges).items(), key=lambda item: -item[1]):
            print(f"{d:3} {node or 'lib'}")
    if cycle:
        print("imports: cycle: " + " -> ".join(cycle), file=sys.stderr)
        return 1
    violations = layering_violations(edges)
    if violations:
        print("imports: policy/ reaches the server: " + ", ".join(violations), file=sys.stderr)
        return 1
    print(f"imports: no cycle among {len(edges)} files; policy/ is pure", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
