#!/usr/bin/env python3
"""Interleaved before/after comparison of two builds of a criterion bench.

    python3 scripts/bench_compare.py OLD_BENCH_BINARY NEW_BENCH_BINARY [ROUNDS] [-- criterion args]

Build each binary first, e.g. for the old commit in a second worktree:

    git worktree add /tmp/old <rev> && mkdir -p /tmp/old/benches/support &&
      cp benches/optim_step.rs /tmp/old/benches/ &&     # the same bench source on both sides
      cp benches/support/model.rs /tmp/old/benches/support/
    # optim_step.rs uses rayon: for a <rev> before 557dc9d (whose Cargo.toml
    # does not declare it), add  rayon = "1"  under [dev-dependencies] in
    # /tmp/old/Cargo.toml
    (cd /tmp/old && cargo bench --bench optim_step --no-run)
    cargo bench --bench optim_step --no-run

cargo prints each bench binary's path (target/release/deps/optim_step-HASH).

Runs old, new, old, new, … ROUNDS times each (default 3; criterion's median
per bench per run), so that a machine whose speed drifts over minutes slows
both alike, and prints per bench the median over rounds of each side and
new/old. Exit status 2: bad arguments; 1: a bench run failed (its stderr is
printed).
"""

import argparse
import re
import statistics
import subprocess
import sys

UNITS = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"^(\S.*?)\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]")


def run(binary, extra):
    cmd = [binary, "--bench", *extra]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        sys.exit(f"bench_compare: cannot run {binary}: {e}")
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        sys.exit(f"bench_compare: {' '.join(cmd)} exited with status {p.returncode} (its stderr above)")
    out = p.stdout
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
    if not res:
        print(
            f"bench_compare: warning: no criterion 'time:' lines in the output of {' '.join(cmd)}",
            file=sys.stderr,
        )
    return res


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {v}")
    return v


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(
        description="Interleaved before/after comparison of two builds of a criterion bench.",
        epilog="Arguments after -- go to both bench binaries (criterion's).",
    )
    ap.add_argument("old", help="the old bench binary")
    ap.add_argument("new", help="the new bench binary")
    ap.add_argument("rounds", nargs="?", type=positive_int, default=3, help="rounds (default 3)")
    args = ap.parse_args(argv)
    old, new, rounds = args.old, args.new, args.rounds
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
