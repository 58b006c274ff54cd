"""PyTorch side of issue #11's GPU benchmark (examples/gpu_bench.rs is the steepest side).

Same shapes, same JSON schema ("steepest-gpu-bench/1"), one record per
workload and implementation:

- msign_bf16/<n>: a bf16 Newton-Schulz (Keller Jordan's quintic
  3.4445, -4.7750, 2.0315 x 5) on one n x n matrix (torch_bmm);
- ns_set/<set>: the same Newton-Schulz on each same-shape batch (b, m, n) of
  the set (f32 input, bf16 iteration, as in a Muon step) (torch_bmm), and in
  the Gram form with restarts before steps 2 and 4, as steepest's
  NewtonSchulz::gram_form() (torch_bmm_gram);
- muon_step/<set>: one step of torch.optim.Muon, and one step of a
  shape-batched Muon (foreach momentum, stacked bf16 Newton-Schulz with
  torch.baddbmm, decoupled decay, update) (torch_bmm);
- power_iteration_x10/<set>: 10 power iterations per same-shape batch with
  torch.bmm, plus the final sigma/u pass (torch_bmm);
- adamw/<set>: torch.optim.AdamW(fused=True), decoupled decay 0.1;
- ceiling/matmul_bf16: a bf16 8192^3 torch.matmul (TFLOP/s);
- ceiling/copy: a 1 GiB device-to-device copy (GB/s, read + write).

Sets (f32 parameters): gpt2_small = 12 x (768x2304, 768x768, 768x3072,
3072x768); 1b = 16 x (2048x6144, 2048x2048, 2048x8192, 8192x2048).

Timing: per rep, torch.cuda.synchronize(); host clock; CUDA event; the call;
CUDA event; torch.cuda.synchronize(); host clock. median_s is the host-clock
median (the same method as the Rust side), median_event_s the CUDA-event
median. Warm-up calls first. Every workload runs in try/except: an error is
recorded in the JSON and the script goes on; the JSON is rewritten after
every workload. Exit status 2: --out cannot be written (checked before
anything is measured) or --only matches no workload; 1: a write of --out
failed during the run.

    python3 bench/torch_reference.py --out gpu_bench_torch.json
    python3 bench/torch_reference.py --quick --device cpu --out /tmp/t.json   # smoke run
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
PI_ITERS = 10

CONVENTIONS = {
    "timing": "per rep: torch.cuda.synchronize, host clock (and CUDA events) around the call, "
    "torch.cuda.synchronize; warm-up calls first; median_s: host-clock median; "
    "median_event_s: CUDA-event median",
    "ns_flops": "standard FLOPs of Newton-Schulz: per step and per m x n matrix with s = min(m,n), "
    "l = max(m,n): X X^T 2 s^2 l + A A 2 s^3 + (bA + cA^2) X 2 s^2 l = 4 s^2 l + 2 s^3; "
    "times steps (5) and batch; elementwise work not counted",
    "pi_bytes": "power iteration: one read of W per iteration: iters * sum(b m n) * bytes per element",
    "adamw_bytes": "AdamW, f32: read w, g, m, v and write w, m, v: 28 bytes per parameter",
    "copy_gbps": "copy: (bytes read + bytes written) / time, i.e. 2 x buffer size / time",
    "matmul_tflops": "2 n^3 / time for an n x n x n product",
}


def mat_set(name, quick):
    if name == "gpt2_small":
        layers, d = (2, 32) if quick else (12, 768)
    else:
        layers, d = (2, 64) if quick else (16, 2048)
    kinds = [("qkv", (d, 3 * d)), ("proj", (d, d)), ("fc", (d, 4 * d)), ("fc_proj", (4 * d, d))]
    return {"name": name, "layers": layers, "kinds": kinds}


def set_shapes(s):
    return [[s["layers"], m, n] for _, (m, n) in s["kinds"]]


def ns_flops(shape):
    b, m, n = shape
    s, l = float(min(m, n)), float(max(m, n))
    return NS_STEPS * (4.0 * s * s * l + 2.0 * s * s * s) * b


class Bench:
    def __init__(self, torch, dev, reps, warmup, quick, only, out):
        self.torch = torch
        self.dev = dev
        self.reps = reps
        self.warmup = warmup
        self.quick = quick
        self.only = only
        self.out = out
        self.records = []
        self.seen = []  # every workload name met, wanted or not
        self.writes_failed = 0
        self.last_write_ok = False
        self.cuda = dev.type == "cuda"
        if self.cuda:
            self.device_name = torch.cuda.get_device_name(dev)
        else:
            self.device_name = "cpu"

    def wanted(self, name):
        return not self.only or any(s in name for s in self.only)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def run(self, name, impl, shapes, dtype, notes, prepare, fn, flops=None, nbytes=None, warmup=None):
        """Times fn(state) after state = prepare(); records the result or the error.
        `warmup`: warm-up calls for this workload (default: the script's)."""
        self.seen.append(name)
        if not self.wanted(name):
            return
        torch = self.torch
        rec = {
            "name": name,
            "workload": name.split("/", 1)[0],
            "set": name.split("/", 1)[1] if "/" in name else "",
            "impl": impl,
            "shapes": shapes,
            "dtype": dtype,
            "notes": notes,
            "reps": 0,
            "median_s": None,
            "min_s": None,
            "mean_s": None,
            "median_event_s": None,
            "times_s": [],
            "flops": flops,
            "bytes": nbytes,
            "tflops": None,
            "gbps": None,
            "error": None,
        }
        state = None
        try:
            state = prepare()
            for _ in range(self.warmup if warmup is None else warmup):
                fn(state)
            self.sync()
            times, ev_times = [], []
            for _ in range(self.reps):
                if self.cuda:
                    e0 = torch.cuda.Event(enable_timing=True)
                    e1 = torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                if self.cuda:
                    e0.record()
                fn(state)
                if self.cuda:
                    e1.record()
                self.sync()
                times.append(time.perf_counter() - t0)
                if self.cuda:
                    ev_times.append(e0.elapsed_time(e1) / 1e3)
            med = statistics.median(times)
            rec.update(
                reps=len(times),
                median_s=med,
                min_s=min(times),
                mean_s=sum(times) / len(times),
                median_event_s=statistics.median(ev_times) if ev_times else None,
                times_s=times,
            )
            if flops is not None:
                rec["tflops"] = flops / med / 1e12
            if nbytes is not None:
                rec["gbps"] = nbytes / med / 1e9
            line = f"{name:<32} {impl:<30} {med * 1e3:10.3f} ms"
            if rec["tflops"] is not None:
                line += f"  {rec['tflops']:8.1f} TFLOP/s"
            if rec["gbps"] is not None:
                line += f"  {rec['gbps']:8.1f} GB/s"
            print(line, flush=True)
        except Exception as e:  # noqa: BLE001 -- record and go on
            rec["error"] = f"{type(e).__name__}: {e}"
            print(f"{name:<32} {impl:<30} ERROR {rec['error']}", flush=True)
            traceback.print_exc()
        finally:
            state = None
            self.free()
        self.records.append(rec)
        try:
            self.write()
            self.last_write_ok = True
        except Exception as e:  # noqa: BLE001 -- report, go on, exit non-zero at the end
            self.writes_failed += 1
            self.last_write_ok = False
            print(f"torch_reference: writing {self.out}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def free(self):
        import gc

        gc.collect()
        if self.cuda:
            try:
                self.torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass

    def write(self):
        if not self.out:
            return
        torch = self.torch
        doc = {
            "schema": "steepest-gpu-bench/1",
            "tool": "torch",
            "version": torch.__version__,
            "cuda": getattr(torch.version, "cuda", None),
            "device": self.device_name,
            "quick": self.quick,
            "reps": self.reps,
            "warmup": self.warmup,
            "ns": {"coefficients": list(NS_COEFFS), "steps": NS_STEPS, "operands": "bf16", "accumulate": "f32 (cuBLAS)"},
            "tf32_matmul": tf32_matmul(torch) if self.cuda else None,
            "conventions": CONVENTIONS,
            "records": self.records,
        }
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, self.out)


def check_out_writable(path):
    """Exits 2 with one line unless `path` can be written the way Bench.write
    writes it (PATH.tmp, renamed over PATH); leaves PATH itself untouched."""
    try:
        if os.path.isdir(path):
            raise IsADirectoryError("is a directory")
        tmp = path + ".tmp"
        with open(tmp, "w"):
            pass
        os.remove(tmp)
    except OSError as e:
        print(f"torch_reference: --out {path}: cannot write: {e}", file=sys.stderr)
        sys.exit(2)


def tf32_matmul(torch):
    """Whether f32 matmuls may use TF32 (reading the setting must not end the run)."""
    m = torch.backends.cuda.matmul
    try:
        precision = getattr(m, "fp32_precision", None)  # torch >= 2.9
        if precision is not None:
            return precision == "tf32"
        return bool(m.allow_tf32)
    except Exception as e:  # noqa: BLE001 - a record, not a reason to stop
        return f"unknown ({e})"


def ns_batched(torch, g, dtype=None):
    """Keller Jordan's Newton-Schulz on a batch (b, m, n) in bf16 (or `dtype`), with
    baddbmm. scripts/torch_bench_ns_fixture.py checks, in f64, that this is the
    function steepest's msign computes (tests/torch_reference.rs)."""
    a, b, c = NS_COEFFS
    x = g.to(dtype or torch.bfloat16)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(NS_STEPS):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a, alpha=1.0)
    if tall:
        x = x.mT
    return x


def ns_gram_batched(torch, g, restarts=(2, 4), min_aspect=2.0, dtype=None):
    """Newton-Schulz in the Gram form (Zhang, Amsel, Chen, Dao 2026), as steepest's
    NewtonSchulz::muon().gram_form(): on the short side, R = X X^T (s x s); per step
    Z = bR + cR^2, Q <- QZ + aQ (Q = Z + aI first), R <- (Z + aI) R (Z + aI) unless the
    segment ends; before each step in `restarts`, X <- QX and R <- X X^T; X <- QX at
    the end. bf16 operands (bmm/baddbmm; or `dtype`). Aspect ratio < min_aspect: the
    standard form."""
    m, n = g.shape[-2], g.shape[-1]
    if max(m, n) < min_aspect * min(m, n):
        return ns_batched(torch, g, dtype)
    a, b, c = NS_COEFFS
    x = g.to(dtype or torch.bfloat16)
    tall = m > n
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    eye = torch.eye(x.size(-2), device=x.device, dtype=x.dtype).expand(x.size(0), -1, -1)
    r = torch.bmm(x, x.mT)
    q = None
    for k in range(NS_STEPS):
        if k in restarts and q is not None:
            x = torch.bmm(q, x)
            r = torch.bmm(x, x.mT)
            q = None
        z = torch.baddbmm(r, r, r, beta=b, alpha=c)
        q = z + a * eye if q is None else torch.baddbmm(q, q, z, beta=a)
        if k + 1 < NS_STEPS and (k + 1) not in restarts:
            rz = torch.baddbmm(r, r, z, beta=a)
            r = torch.baddbmm(rz, z, rz, beta=a)
    x = torch.bmm(q, x)
    if tall:
        x = x.mT
    return x


def make_params(torch, s, dev):
    """The set's matrices as f32 Parameters N(0, 0.02^2) with fixed N(0, 1) grads, in set order."""
    ps = []
    for _ in range(s["layers"]):
        for _, (m, n) in s["kinds"]:
            p = torch.nn.Parameter(torch.randn(m, n, device=dev) * 0.02)
            p.grad = torch.randn(m, n, device=dev)
            ps.append(p)
    return ps


def groups_of(s):
    """Indices into make_params' order, one list per shape."""
    k = len(s["kinds"])
    return [[layer * k + j for layer in range(s["layers"])] for j in range(k)]


class BatchedMuon:
    """Muon with same-shape matrices batched, torch.optim.Muon's update (torch 2.11):
    foreach momentum B <- lerp(B, g, 1 - mu), nesterov lerp(g, B, mu); stacked bf16
    Newton-Schulz; decoupled decay; update scaled by lr sqrt(max(1, rows/cols))
    (torch's "original" adjustment)."""

    def __init__(self, torch, params, groups, lr=0.02, wd=0.1, mu=0.95):
        self.torch = torch
        self.params = params
        self.groups = groups
        self.lr, self.wd, self.mu = lr, wd, mu
        self.bufs = [torch.zeros_like(p) for p in params]

    def step(self):
        torch = self.torch
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            torch._foreach_lerp_(self.bufs, grads, 1.0 - self.mu)
            upd = torch._foreach_lerp(grads, self.bufs, self.mu)
            torch._foreach_mul_(self.params, 1.0 - self.lr * self.wd)
            for idx in self.groups:
                g = torch.stack([upd[i] for i in idx])
                o = ns_batched(torch, g).float()
                m, n = g.shape[-2], g.shape[-1]
                scale = self.lr * math.sqrt(max(1.0, m / n))
                torch._foreach_add_([self.params[i] for i in idx], list(o.unbind(0)), alpha=-scale)


def power_iteration_bmm(torch, w, x0, iters):
    """Top singular triplet of each matrix of w (b, m, n) by iters power iterations
    on the short side, with torch.bmm; x0 (b, n, 1) is the start for v."""
    b, m, n = w.shape
    wt = w.mT
    eps = 1e-30
    if n <= m:
        x = x0
        for _ in range(iters):
            x = torch.bmm(wt, torch.bmm(w, x))
            x = x / (x.norm(dim=1, keepdim=True) + eps)
        wv = torch.bmm(w, x)
        sigma = wv.norm(dim=1, keepdim=True)
        return sigma, wv / (sigma + eps), x
    y = torch.bmm(w, x0)
    y = y / (y.norm(dim=1, keepdim=True) + eps)
    for _ in range(iters):
        y = torch.bmm(w, torch.bmm(wt, y))
        y = y / (y.norm(dim=1, keepdim=True) + eps)
    wty = torch.bmm(wt, y)
    sigma = wty.norm(dim=1, keepdim=True)
    return sigma, y, wty / (sigma + eps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 3 reps (unless --reps)")
    ap.add_argument("--out", default=None, help="JSON path (rewritten after every workload)")
    ap.add_argument("--reps", type=int, default=None, help="timed reps (default 20, 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3, 1 with --quick)")
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    args = ap.parse_args()
    if args.out:
        check_out_writable(args.out)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("torch_reference: CUDA not available (use --device cpu)", file=sys.stderr)
        sys.exit(2)
    dev = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(0)
    quick = args.quick
    reps = args.reps if args.reps is not None else (3 if quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    only = [s for s in args.only.split(",") if s]
    bench = Bench(torch, dev, max(1, reps), max(0, warmup), quick, only, args.out)
    print(
        f"torch_reference (torch {torch.__version__}): device {bench.device_name}, "
        f"{bench.warmup} warm-up + {bench.reps} timed reps each{', --quick shapes' if quick else ''}",
        flush=True,
    )

    # Ceilings first: the floors and bandwidth targets are computed from these
    # (gpu_bench_table.py takes their CUDA-event medians). The GPU is cold
    # here, so they get at least 20 warm-up calls (clocks up, cuBLAS's
    # heuristics and workspace settled).
    ceiling_warmup = max(bench.warmup, 20)
    n = 256 if quick else 8192
    bench.run(
        "ceiling/matmul_bf16", "torch", [[1, n, n]], "bf16",
        "torch.matmul(a, b, out=c), n x n x n bf16",
        lambda: (torch.randn(n, n, device=dev, dtype=torch.bfloat16),
                 torch.randn(n, n, device=dev, dtype=torch.bfloat16),
                 torch.empty(n, n, device=dev, dtype=torch.bfloat16)),
        lambda st: torch.matmul(st[0], st[1], out=st[2]),
        flops=2.0 * float(n) ** 3,
        warmup=ceiling_warmup,
    )
    elems = (1 << 20) if quick else (1 << 28)
    bench.run(
        "ceiling/copy", "torch", [[1, 1, elems]], "f32",
        "dst.copy_(src), device to device, 1 GiB f32 (4 MiB with --quick)",
        lambda: (torch.empty(elems, device=dev), torch.empty(elems, device=dev).fill_(1.0)),
        lambda st: st[0].copy_(st[1]),
        nbytes=2.0 * 4.0 * elems,
        warmup=ceiling_warmup,
    )

    squares = [64, 128, 256] if quick else [1024, 4096, 8192]
    for n in squares:
        bench.run(
            f"msign_bf16/{n}", "torch_bmm", [[1, n, n]], "bf16 in/out, bf16 operands",
            "Keller Jordan's Newton-Schulz (bmm/baddbmm, bf16) on one n x n bf16 matrix",
            lambda n=n: torch.randn(1, n, n, device=dev).bfloat16(),
            lambda g: ns_batched(torch, g),
            flops=ns_flops([1, n, n]),
        )

    for set_name in ["gpt2_small", "1b"]:
        s = mat_set(set_name, quick)
        shapes = set_shapes(s)
        n_params = float(sum(b * m * n for b, m, n in shapes))
        ns_total = sum(ns_flops(sh) for sh in shapes)
        n_mats = len(s["kinds"]) * s["layers"]

        bench.run(
            f"ns_set/{set_name}", "torch_bmm", shapes, "f32 in, bf16 operands",
            "Newton-Schulz (bmm/baddbmm, bf16) on each same-shape batch (b, m, n) of the set",
            lambda shapes=shapes: [torch.randn(b, m, n, device=dev) for b, m, n in shapes],
            lambda gs: [ns_batched(torch, g) for g in gs],
            flops=ns_total,
        )

        bench.run(
            f"ns_set/{set_name}", "torch_bmm_gram", shapes, "f32 in, bf16 operands",
            "Newton-Schulz in the Gram form (bmm/baddbmm, bf16; restarts before steps 2 and 4; "
            "aspect ratio < 2: the standard form) on each same-shape batch (b, m, n) of the set",
            lambda shapes=shapes: [torch.randn(b, m, n, device=dev) for b, m, n in shapes],
            lambda gs: [ns_gram_batched(torch, g) for g in gs],
            flops=ns_total,
        )

        muon_cls = getattr(torch.optim, "Muon", None)

        def prep_torch_muon(s=s):
            if muon_cls is None:
                raise RuntimeError("torch.optim.Muon unavailable in torch " + torch.__version__)
            ps = make_params(torch, s, dev)
            opt = muon_cls(ps, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                           ns_coefficients=NS_COEFFS, eps=1e-7, ns_steps=NS_STEPS)
            return opt, ps

        bench.run(
            f"muon_step/{set_name}", "torch.optim.Muon", shapes, "f32 params/grads/momentum, bf16 NS",
            f"torch.optim.Muon.step over {n_mats} matrices: lr 0.02, momentum 0.95 nesterov, "
            "weight_decay 0.1, default adjust_lr_fn",
            prep_torch_muon,
            lambda st: st[0].step(),
            flops=ns_total,
        )

        bench.run(
            f"muon_step/{set_name}", "torch_bmm", shapes, "f32 params/grads/momentum, bf16 NS",
            f"shape-batched Muon over {n_mats} matrices: foreach momentum 0.95 nesterov, "
            "torch.stack + bf16 baddbmm Newton-Schulz, decay 0.1, foreach update",
            lambda s=s: BatchedMuon(torch, make_params(torch, s, dev), groups_of(s)),
            lambda opt: opt.step(),
            flops=ns_total,
        )

        bench.run(
            f"power_iteration_x10/{set_name}", "torch_bmm", shapes, "f32",
            "10 power iterations per same-shape batch (b, m, n) with torch.bmm on the short side, "
            "start: a fixed random (b, n, 1); includes the final sigma/u pass",
            lambda shapes=shapes: [(torch.randn(b, m, n, device=dev) * 0.02, torch.randn(b, n, 1, device=dev))
                                   for b, m, n in shapes],
            lambda st: [power_iteration_bmm(torch, w, x0, PI_ITERS) for w, x0 in st],
            nbytes=PI_ITERS * n_params * 4.0,
        )

        def prep_adamw(s=s):
            ps = make_params(torch, s, dev)
            opt = torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                    fused=dev.type == "cuda")
            return opt, ps

        bench.run(
            f"adamw/{set_name}", "torch.optim.AdamW(fused=True)" if dev.type == "cuda" else "torch.optim.AdamW",
            shapes, "f32 params/grads/moments",
            f"AdamW.step over {n_mats} matrices: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.1",
            prep_adamw,
            lambda st: st[0].step(),
            nbytes=28.0 * n_params,
        )

    if not bench.records and only:
        print(f"torch_reference: --only {args.only} matched no workload; the workloads: {', '.join(bench.seen)}",
              file=sys.stderr)
        sys.exit(2)
    if args.out:
        if bench.last_write_ok:
            print(f"wrote {args.out}", flush=True)
        if bench.writes_failed:
            last = " (the last one succeeded: the file has every record)" if bench.last_write_ok else ""
            print(f"torch_reference: {bench.writes_failed} of {len(bench.records)} writes of {args.out} failed{last}",
                  file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
