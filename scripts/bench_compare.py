#!/usr/bin/env python3
"""Interleaved before/after comparison of two builds of a criterion bench.

    python3 scripts/bench_compare.py OLD_BENCH_BINARY NEW_BENCH_BINARY [ROUNDS] [-- criterion args]

Build each binary first, e.g. for the old commit in a second worktree:

    git worktree add /tmp/old <rev>
    cp benches/optim_step.rs /tmp/old/benches/      # the same bench source on both sides
    (cd /tmp/old && cargo bench --bench optim_step --no-run)
    cargo bench --bench optim_step --no-run

Runs old, new, old, new, … ROUNDS times each (criterion's median per bench
per run), so that a machine whose speed drifts over minutes slows both alike,
and prints per bench the median over rounds of each side and new/old.
"""

import re
import statistics
import subprocess
import sys

UNITS = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"^(\S.*?)\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]")


def run(binary, extra):
    out = subprocess.run(
        [binary, "--bench", *extra], capture_output=True, text=True, check=True
    ).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            res[m.group(1).strip()] = float(m.group(2)) * UNITS[m.group(3)]
            continue
        # criterion prints long names on their own line, the times on the next
        if line and not line.startswith(" ") and "time:" not in line:
            name = line.strip()
        m2 = re.match(r"^\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if m2 and name:
            res[name] = float(m2.group(1)) * UNITS[m2.group(2)]
    return res


def main():
    args = sys.argv[1:]
    extra = []
    if "--" in args:
        i = args.index("--")
        args, extra = args[:i], args[i + 1 :]
    old, new = args[0], args[1]
    rounds = int(args[2]) if len(args) > 2 else 3
    times = {"old": {}, "new": {}}
    for r in range(rounds):
        for side, binary in (("old", old), ("new", new)):
            for k, v in run(binary, extra).items():
                times[side].setdefault(k, []).append(v)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    print(f"| bench | old (median of {rounds}) | new | new / old |")
    print("|---|---|---|---|")
    for k in sorted(times["new"]):
        if k not in times["old"]:
            continue
        o = statistics.median(times["old"][k])
        n = statistics.median(times["new"][k])
        print(f"| {k} | {o * 1e3:.3f} ms | {n * 1e3:.3f} ms | {n / o:.3f} |")
    for k in sorted(times["new"]):
        if k not in times["old"]:
            n = statistics.median(times["new"][k])
            print(f"| {k} (new only) | — | {n * 1e3:.3f} ms | — |")


if __name__ == "__main__":
    main()
