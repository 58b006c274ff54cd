#!/usr/bin/env python3
"""Compare the per-step training losses of two train_lm runs.

    python3 scripts/compare_losses.py A.csv B.csv [--steps 20] [--rtol 5e-3]
                                      [--early 5] [--rtol-early 1e-4]

A and B are `train_lm --loss-log PATH` files (optimizer, seed, step,
train_loss). For every (optimizer, seed) in both, the first --steps losses are
compared: the script prints them side by side with the relative difference
|a - b| / |a|, the largest difference per run and overall, and PASS (exit 0)
when every difference is within --rtol and those of the first --early steps
within --rtol-early, else FAIL (exit 1). Exit 2: an input that cannot be
read (a missing file, a column missing, a value that is no number: one line
names the file and the problem), no run or too few steps in common.

The tolerances. Both runs are f32 (candle's CUDA matmuls are plain FP32 cuBLAS
unless TF32 is switched on, which train_lm does not do), but the GPU sums in
another order (cuBLAS's blocking, CUDA reductions for the means, the norms,
the softmax), so each op differs by a few ulp and the first loss (a forward
pass on identical weights and data) agrees to ~1e-6. Training feeds the
differences back, and they grow: on the CPU, the same arithmetic in another
summation order (train_lm --ranks 2 or 4 against one rank, small default
configuration, --stop-after 20) differs by <= 1.1e-7 over steps 1-5, 3.7e-6 by
step 10, 1.2e-4 by step 15 (the warmup ends there) and 3.2e-4 by step 20
(muon-spectral; adamw 1.4e-4). The GPU reorders every reduction, not only the
batch sum, so its gap starts larger; the defaults leave it ~1000x over steps
1-5 (--rtol-early 1e-4) and ~15x over 20 steps (--rtol 5e-3). Another seed
(other initial weights and batches) differs by 2.4e-2 at step 1 and 4e-2 at
most over 20 steps, so it fails both; a wrong op in the forward pass or the
optimizer shows at step 1 or 2 (the early bound).
"""

import argparse
import csv
import math
import sys
from collections import defaultdict


COLUMNS = ("optimizer", "seed", "step", "train_loss")


class InputError(Exception):
    """A loss log that cannot be read; the message names the file."""


def read(path):
    """{(optimizer, seed): {step: loss}}; InputError when `path` is unreadable."""
    runs = defaultdict(dict)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(
                    f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                    f"(expected {', '.join(COLUMNS)}; a train_lm --loss-log file)"
                )
            for row in reader:
                if any(row[c] is None for c in COLUMNS):
                    raise InputError(f"{path}: bad value at line {reader.line_num}: fewer fields than the header")
                try:
                    key = (row["optimizer"], int(row["seed"]))
                    runs[key][int(row["step"])] = float(row["train_loss"])
                except ValueError as e:
                    raise InputError(f"{path}: bad value at line {reader.line_num}: {e}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a CSV loss log: {e}") from None
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="reference loss log (e.g. the CPU run)")
    ap.add_argument("b", help="loss log to check (e.g. the GPU run)")
    ap.add_argument("--steps", type=int, default=20, help="steps compared (default 20)")
    ap.add_argument(
        "--rtol",
        type=float,
        default=5e-3,
        help="largest relative difference allowed, every step (default 5e-3)",
    )
    ap.add_argument(
        "--early", type=int, default=5, help="steps held to --rtol-early (default 5)"
    )
    ap.add_argument(
        "--rtol-early",
        type=float,
        default=1e-4,
        help="largest relative difference allowed over the first --early steps (default 1e-4)",
    )
    ap.add_argument("--quiet", action="store_true", help="only the per-run lines")
    ap.add_argument(
        "--ignore-seed",
        action="store_true",
        help="match runs by optimizer only (each file: one seed per optimizer)",
    )
    args = ap.parse_args()

    try:
        a, b = read(args.a), read(args.b)
    except InputError as e:
        print(e, file=sys.stderr)
        return 2
    if args.ignore_seed:
        for runs, path in ((a, args.a), (b, args.b)):
            opts = [o for o, _ in runs]
            if len(opts) != len(set(opts)):
                print(f"--ignore-seed: {path} has several seeds of one optimizer", file=sys.stderr)
                return 2
        a = {(o, 0): v for (o, _), v in a.items()}
        b = {(o, 0): v for (o, _), v in b.items()}
    common = [k for k in a if k in b]
    if not common:
        print(f"no (optimizer, seed) in both {args.a} and {args.b}", file=sys.stderr)
        return 2
    only = sorted(set(a) ^ set(b))
    if only:
        print(f"(not in both, skipped: {', '.join(f'{o} seed {s}' for o, s in only)})")

    worst, worst_early, failed = 0.0, 0.0, False
    for key in common:
        opt, seed = key
        steps = range(1, args.steps + 1)
        missing = [s for s in steps if s not in a[key] or s not in b[key]]
        if missing:
            print(
                f"{opt} seed {seed}: step {missing[0]} missing "
                f"({args.a}: {len(a[key])} steps, {args.b}: {len(b[key])} steps)",
                file=sys.stderr,
            )
            return 2
        if not args.quiet:
            print(f"\n{opt} seed {seed}")
            print(f"{'step':>5} {'A':>12} {'B':>12} {'rel diff':>10}")
        run_worst, at, run_early = 0.0, 1, 0.0
        for s in steps:
            x, y = a[key][s], b[key][s]
            rel = abs(x - y) / abs(x) if x != 0 else abs(y)
            if math.isnan(rel):
                rel = math.inf
            if rel > run_worst:
                run_worst, at = rel, s
            if s <= args.early:
                run_early = max(run_early, rel)
            if not args.quiet:
                print(f"{s:>5} {x:>12.7f} {y:>12.7f} {rel:>10.2e}")
        ok = run_worst <= args.rtol and run_early <= args.rtol_early
        failed |= not ok
        print(
            f"{opt} seed {seed}: max rel diff {run_worst:.2e} (step {at}) over "
            f"{args.steps} steps, {run_early:.2e} over the first {args.early}: "
            f"{'ok' if ok else 'OVER'}"
        )
        worst, worst_early = max(worst, run_worst), max(worst_early, run_early)

    print(
        f"\n{'FAIL' if failed else 'PASS'}: max relative difference {worst:.2e} over the "
        f"first {args.steps} losses (rtol {args.rtol:g}), {worst_early:.2e} over the first "
        f"{args.early} (rtol {args.rtol_early:g}); {len(common)} run(s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
