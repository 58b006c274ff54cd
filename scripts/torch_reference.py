"""Reference trajectories from PyTorch for tests/torch_reference.rs.

Runs torch.optim.AdamW, torch.optim.SGD and torch.optim.Muon on fixed
parameters with fixed per-step gradients (float32) and stores every step's
parameters in tests/fixtures/torch_reference.json.

    python3 scripts/torch_reference.py        # needs torch >= 2.9 (torch.optim.Muon)

Muon is run twice: as shipped (Newton-Schulz in bfloat16), and with the
Newton-Schulz iteration patched to run in float32 (the same code with
`.bfloat16()` replaced by `.float()`), which is what steepest does by default.
"""
import json
import pathlib

import torch
import torch.optim._muon as muon_mod

STEPS = 6
SHAPES = {"a": (6, 4), "b": (4, 6), "c": (5, 5), "bias": (4,)}


def ns_float32(grad, ns_coefficients, ns_steps, eps):
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    if grad.size(0) > grad.size(1):
        x = x.T
    return x


def run(names, make_opt, patch_ns=False):
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.randn(SHAPES[n], generator=gen) for n in SHAPES}
    grads = [{n: torch.randn(SHAPES[n], generator=gen) for n in SHAPES} for _ in range(STEPS)]
    ps = [torch.nn.Parameter(params[n].clone()) for n in names]
    opt = make_opt(ps)
    original = muon_mod._zeropower_via_newtonschulz
    if patch_ns:
        muon_mod._zeropower_via_newtonschulz = ns_float32
    traj = []
    try:
        for t in range(STEPS):
            for n, p in zip(names, ps):
                p.grad = grads[t][n].clone()
            opt.step()
            traj.append({n: p.detach().flatten().tolist() for n, p in zip(names, ps)})
    finally:
        muon_mod._zeropower_via_newtonschulz = original
    return params, grads, traj


def main():
    all_names = list(SHAPES)
    mats = ["a", "b", "c"]
    cases = {
        "adamw": (all_names, lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1), False),
        "sgd_nesterov": (all_names, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True), False),
        "sgd_l2": (all_names, lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=0.1), False),
        "muon_f32": (mats, lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True), True),
        "muon_f32_plain_rms": (mats, lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0, momentum=0.9, nesterov=False, adjust_lr_fn="match_rms_adamw"), True),
        "muon_bf16": (mats, lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1), False),
    }
    out = {"torch_version": torch.__version__, "steps": STEPS, "shapes": SHAPES, "cases": {}}
    for name, (names, make, patch) in cases.items():
        params, grads, traj = run(names, make, patch)
        out["init"] = {n: params[n].flatten().tolist() for n in SHAPES}
        out["grads"] = [{n: g[n].flatten().tolist() for n in SHAPES} for g in grads]
        out["cases"][name] = {"params": names, "trajectory": traj}
    path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "torch_reference.json"
    path.write_text(json.dumps(out))
    print(f"wrote {path} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
