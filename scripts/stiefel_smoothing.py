#!/usr/bin/env python3
"""The nearly square Stiefel dual (docs/math.md §3) in numpy, f64, with exact
SVDs: plain dual descent against the smoothed dual for several μ.

For tall W (n×m, m < n < 2m) and Ĝ = G·√m/‖G‖_F, from X = 0, 1000 steps of
X ← X − η₂(WᵀΦ + ΦᵀW), η₂ = 0.05, with Φ = polar(Ĝ + WX) (plain) or
Φ = M(MᵀM + μ²I)^{-1/2}, M = Ĝ + WX (smoothed). Prints ‖WᵀΦ + ΦᵀW‖_F after
100, 300 and 1000 steps and ⟨Ĝ, Φ⟩/‖Φ‖₂ over the smallest ‖Ĝ + WX‖_* seen
(an upper bound on every tangent direction's value; a plain Φ that stalled
is not tangent, and its ratio can exceed 1).

    python3 scripts/stiefel_smoothing.py
"""
import numpy as np


def svd_map(a, f):
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return u @ np.diag(f(s)) @ vt


def run(n, m, mu, eta=0.05, steps=1000, seed=0):
    rng = np.random.default_rng(seed)
    w = svd_map(rng.standard_normal((n, m)), np.ones_like)
    g = rng.standard_normal((n, m))
    g *= np.sqrt(m) / np.linalg.norm(g)
    x = np.zeros((m, m))
    marks, best = [], np.inf
    for t in range(steps):
        a = g + w @ x
        best = min(best, np.linalg.svd(a, compute_uv=False).sum())
        phi = svd_map(a, (lambda s: s / np.sqrt(s * s + mu * mu)) if mu > 0 else np.ones_like)
        r = w.T @ phi + phi.T @ w
        x = x - eta * r
        if t + 1 in (100, 300, 1000):
            marks.append(np.linalg.norm(r))
    value = np.sum(g * phi) / np.linalg.norm(phi, 2) / best
    return marks, value


def main():
    shapes = [(7, 6), (10, 6), (12, 8), (33, 32), (40, 32), (48, 32), (56, 32)]
    for mu in [0.0, 0.05, 0.1, 0.2]:
        print(f"μ = {mu}" + (" (plain dual)" if mu == 0 else ""))
        for n, m in shapes:
            marks, value = run(n, m, mu)
            res = "  ".join(f"{v:.1e}" for v in marks)
            print(f"  {n:>2}×{m:<2}  residual at 100/300/1000: {res}   value/bound {value:.3f}")


if __name__ == "__main__":
    main()
