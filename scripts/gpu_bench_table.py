"""Markdown table of issue #11's GPU benchmark from the two JSON files.

Reads the steepest side (examples/gpu_bench.rs) and the PyTorch side
(bench/torch_reference.py), both in the "steepest-gpu-bench/1" schema, and
prints the table for BENCHMARKS.md: steepest's median, PyTorch's median per
implementation, the speedup (PyTorch / steepest), the standard-FLOP floor at
the measured bf16 GEMM rate or the share of the measured copy bandwidth, then
each target of the issue as met or missed with its measured ratio.

    python3 scripts/gpu_bench_table.py gpu_bench_steepest.json gpu_bench_torch.json [--out table.md]

The ceilings (bf16 8192^3 matmul TFLOP/s, device-to-device copy GB/s) come
from the PyTorch file (measured in the same call); candle's own are the
fallback when PyTorch's are missing. Standard library only.
"""
import argparse
import json
import sys

# steepest workload -> the PyTorch workload it is compared with
COMPARE = {"adamw_spectral": "adamw", "ns_set_gram": "ns_set", "muon_step_gram": "muon_step"}


def load(path):
    try:
        with open(path) as f:
            return json.load(f), None
    except Exception as e:  # noqa: BLE001
        return {"records": []}, f"{path}: {type(e).__name__}: {e}"


def ok(r):
    return r is not None and r.get("error") is None and r.get("median_s")


def ms(t):
    return "—" if t is None else f"{t * 1e3:.3f}"


def find(doc, name, impl=None):
    for r in doc.get("records", []):
        if r.get("name") == name and (impl is None or r.get("impl") == impl):
            return r
    return None


def ceiling_rate(r, field):
    """A ceiling's rate from its CUDA-event median when there is one (the
    device's own time: the host clock adds launch and sync overhead, an
    estimated 2-4 % of a ~0.5 ms copy (not measured), which would lower the
    ceiling and flatter the ratios measured against it), else the recorded
    host-clock rate."""
    ev = r.get("median_event_s")
    work, scale = (r.get("flops"), 1e12) if field == "tflops" else (r.get("bytes"), 1e9)
    if ev and work:
        return work / ev / scale, "CUDA events"
    return r.get(field), "host clock"


def ceilings(torch_doc, ours_doc):
    """(TFLOP/s of the bf16 matmul, copy GB/s, where they came from)."""
    out = {}
    for key, field in (("matmul", "tflops"), ("copy", "gbps")):
        name = "ceiling/matmul_bf16" if key == "matmul" else "ceiling/copy"
        for doc, src in ((torch_doc, "torch"), (ours_doc, "candle")):
            r = find(doc, name)
            if ok(r) and r.get(field):
                rate, _ = ceiling_rate(r, field)
                out[key] = (rate, src, r)
                break
    return out


def shapes_str(r):
    sh = r.get("shapes") or []
    if r.get("workload") in ("msign_bf16",) or r.get("name", "").startswith("ceiling/"):
        return " ".join(f"{m}×{n}" for _, m, n in sh)
    return ", ".join(f"{b}×{m}×{n}" for b, m, n in sh)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ours", help="JSON of examples/gpu_bench.rs")
    ap.add_argument("torch", help="JSON of bench/torch_reference.py")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--missed-out", help="write steepest's workloads behind missed targets here, one per line "
                    "(what .gpu/run.sh profiles)")
    args = ap.parse_args()

    ours, err_o = load(args.ours)
    torch, err_t = load(args.torch)
    lines = []
    p = lines.append
    for e in (err_o, err_t):
        if e:
            p(f"> could not read {e}")
    p(
        f"steepest {ours.get('version', '?')} on {ours.get('device', '?')}; "
        f"PyTorch {torch.get('version', '?')} (CUDA {torch.get('cuda', '?')}) on {torch.get('device', '?')}; "
        f"medians of {ours.get('reps', '?')} / {torch.get('reps', '?')} reps after "
        f"{ours.get('warmup', '?')} / {torch.get('warmup', '?')} warm-up calls."
    )
    if ours.get("quick") or torch.get("quick"):
        p("")
        p(f"> **--quick shapes** (steepest quick={ours.get('quick')}, torch quick={torch.get('quick')}): not the issue's workloads.")
    if not (err_o or err_t) and ours.get("quick") != torch.get("quick"):
        p("> the two files were made with different --quick settings: the ratios compare different shapes.")

    ceil = ceilings(torch, ours)
    p("")
    p("| ceiling | source | median ms | rate | timed by |")
    p("|---|---|---:|---:|---|")
    for name, field, unit in (("ceiling/matmul_bf16", "tflops", "TFLOP/s"), ("ceiling/copy", "gbps", "GB/s")):
        for doc, src in ((torch, "torch"), (ours, "candle")):
            r = find(doc, name)
            if r is None:
                continue
            if ok(r):
                rate, how = ceiling_rate(r, field)
                med = r.get("median_event_s") if how == "CUDA events" else r["median_s"]
                p(f"| {name.split('/')[1]} ({shapes_str(r)}) | {src} | {ms(med)} | {rate:.4g} {unit} | {how} |")
            else:
                p(f"| {name.split('/')[1]} | {src} | error: {r.get('error')} | | |")
    gemm = ceil.get("matmul")
    copy = ceil.get("copy")
    p("")
    p(
        "Floor: standard FLOPs of Newton–Schulz (4s²l + 2s³ per step per matrix, s ≤ l, 5 steps) at the "
        + (f"measured bf16 GEMM rate ({gemm[0]:.4g} TFLOP/s, {gemm[1]})" if gemm else "bf16 GEMM rate (not measured)")
        + "; bandwidth: one read of W per power iteration, 28 B/parameter for AdamW, against the "
        + (f"measured copy ({copy[0]:.4g} GB/s read + write, {copy[1]})." if copy else "copy bandwidth (not measured).")
        + " Issued TFLOP/s: the GEMM FLOPs steepest's device path actually issues for Newton–Schulz"
        " (symmetric products on one triangle of tiles; the Gram form) over its median time."
    )
    p("")
    p("| workload | shapes (b×m×n) | steepest ms | PyTorch | PyTorch ms | speedup | floor ms | ×floor | % copy BW | issued TFLOP/s |")
    p("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in ours.get("records", []):
        name = r.get("name", "?")
        if name.startswith("ceiling/"):
            continue
        wl, _, st = name.partition("/")
        # ns_set_gram, ns_set_tiles1, … are all compared with PyTorch's ns_set
        base = COMPARE.get(wl) or ("ns_set" if wl.startswith("ns_set") else wl)
        tname = f"{base}/{st}" if st else name
        others = [t for t in torch.get("records", []) if t.get("name") == tname]
        mine = r.get("median_s") if ok(r) else None
        floor = (r["flops"] / (gemm[0] * 1e12)) if (gemm and r.get("flops")) else None
        xfloor = f"{mine / floor:.2f}" if (floor and mine) else "—"
        bw = f"{100 * (r['bytes'] / mine / 1e9) / copy[0]:.3g} %" if (copy and r.get("bytes") and mine) else "—"
        mine_s = ms(mine) if ok(r) else f"error: {r.get('error')}"
        if not others:
            others = [None]
        for t in others:
            if t is None:
                timpl, tms, sp = "—", "—", "—"
            elif ok(t):
                timpl, tms = t.get("impl", "?"), ms(t["median_s"])
                sp = f"{t['median_s'] / mine:.2f}×" if mine else "—"
            else:
                timpl, tms, sp = t.get("impl", "?"), f"error: {t.get('error')}", "—"
            label = name if tname == name else f"{name} (vs {tname})"
            issued = f"{r['tflops_issued']:.4g}" if r.get("tflops_issued") else "—"
            p(f"| {label} | {shapes_str(r)} | {mine_s} | {timpl} | {tms} | {sp} | {ms(floor)} | {xfloor} | {bw} | {issued} |")

    # Targets of the issue.
    def speed(name, impl, ours_name=None):
        a = find(ours, ours_name or name)
        b = find(torch, name, impl)
        if not ok(a):
            return None, f"steepest {ours_name or name} missing or failed"
        if not ok(b):
            return None, f"{impl} {name} missing or failed" + (f" ({b.get('error')})" if b else "")
        return b["median_s"] / a["median_s"], None

    targets = []
    missed = []  # steepest's workloads behind the missed targets, for the profile

    def target(desc, value, ok_fn, fmt, why=None, workload=None):
        if value is None:
            targets.append(f"- {desc}: **n/a** ({why})")
        else:
            note = f"; {why}" if why else ""
            met = ok_fn(value)
            targets.append(f"- {desc}: **{'met' if met else 'missed'}** ({fmt(value)}{note})")
            if not met and workload and workload not in missed:
                missed.append(workload)

    for wl, form in (("muon_step", ""), ("muon_step_gram", " (Gram form)")):
        v, why = speed("muon_step/gpt2_small", "torch.optim.Muon", ours_name=f"{wl}/gpt2_small")
        target(f"Muon step{form}, GPT-2-small, ≥ 9× faster than torch.optim.Muon", v, lambda x: x >= 9,
               lambda x: f"{x:.2f}×", why, f"{wl}/gpt2_small")
        v, why = speed("muon_step/gpt2_small", "torch_bmm", ours_name=f"{wl}/gpt2_small")
        target(f"Muon step{form}, GPT-2-small, ≥ 2× faster than the shape-batched torch.bmm version", v,
               lambda x: x >= 2, lambda x: f"{x:.2f}×", why, f"{wl}/gpt2_small")
        r = find(ours, f"{wl}/1b")
        if not ok(r):
            v, why = None, f"steepest {wl}/1b missing or failed"
        elif not gemm:
            v, why = None, "no GEMM ceiling measured"
        else:
            v, why = r["median_s"] / (r["flops"] / (gemm[0] * 1e12)), None
        target(f"Muon step{form}, 1B set, within 1.5× of the standard-FLOP floor", v, lambda x: x <= 1.5,
               lambda x: f"{x:.2f}× the floor", why, f"{wl}/1b")
    for st in ("gpt2_small", "1b"):
        name = f"power_iteration_x10/{st}"
        v, why = speed(name, "torch_bmm")
        target(f"Power iteration ×10, {st}, ≥ 2× faster than the batched torch.bmm loop", v, lambda x: x >= 2,
               lambda x: f"{x:.2f}×", why, name)
        r = find(ours, name)
        if not ok(r):
            v, why = None, f"steepest {name} missing or failed"
        elif not copy:
            v, why = None, "no copy bandwidth measured"
        else:
            v, why = (r["bytes"] / r["median_s"] / 1e9) / copy[0], None
        if v is not None and r.get("bytes_read"):
            # every pass the kernels make (the start and final passes too), for the reader
            why = f"counting every pass over W: {100 * (r['bytes_read'] / r['median_s'] / 1e9) / copy[0]:.3g} %"
        target(f"Power iteration ×10, {st}, ≥ 70 % of the copy bandwidth (one read of W per iteration)", v,
               lambda x: x >= 0.7, lambda x: f"{100 * x:.3g} %", why, name)
    for st in ("gpt2_small", "1b"):
        a = find(torch, f"adamw/{st}")
        impl = a.get("impl") if a else "torch.optim.AdamW(fused=True)"
        v, why = speed(f"adamw/{st}", impl, ours_name=f"adamw_spectral/{st}")
        target(f"AdamW + spectral decay, {st}, no slower than {impl} without it", v, lambda x: x >= 1,
               lambda x: f"{x:.2f}× (PyTorch / steepest)", why, f"adamw_spectral/{st}")
    p("")
    p("Targets (ratios from this one call):")
    p("")
    lines.extend(targets)

    errors = [f"{d.get('tool', '?')} {r.get('name')} [{r.get('impl')}]: {r.get('error')}"
              for d in (ours, torch) for r in d.get("records", []) if r.get("error")]
    if errors:
        p("")
        p("Failed workloads:")
        p("")
        lines.extend(f"- {e}" for e in errors)

    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.missed_out:
        with open(args.missed_out, "w") as f:
            f.write("".join(f"{w}\n" for w in missed))


if __name__ == "__main__":
    main()
