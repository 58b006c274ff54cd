#!/usr/bin/env python3
"""The nearly square Stiefel dual (docs/math.md §3) in numpy: plain dual
descent against the smoothed dual for several μ.

For tall W (n×m, m < n ≤ 2m) and Ĝ = G·√m/‖G‖_F, from X = 0, 1000 steps of
X ← X − η₂(WᵀΦ + ΦᵀW), η₂ = 0.05, with Φ = msign(Ĝ + WX) (plain) or
Φ = M(MᵀM + μ²I)^{-1/2}, M = Ĝ + WX (smoothed: the top rows of
msign([M; μI])). Prints ‖WᵀΦ + ΦᵀW‖_F after 100, 300 and 1000 steps and
⟨Ĝ, Φ⟩/‖Φ‖₂ over the smallest ‖Ĝ + WX‖_* seen (an upper bound on every
tangent direction's value; a plain Φ that stalled is not tangent, and its
ratio can exceed 1).

    python3 scripts/stiefel_smoothing.py            # msign by f64 SVD (exact)
    python3 scripts/stiefel_smoothing.py --ns muon  # Keller Jordan's table, f32
    python3 scripts/stiefel_smoothing.py --eta 0.15 # another dual rate η₂
"""
import sys

import numpy as np

MUON = [[3.4445, -4.775, 2.0315]] * 5


def svd_map(a, f):
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return u @ np.diag(f(s)) @ vt


def newton_schulz(a, table):
    """msign(a) as the crate computes it: f32, normalised by ‖a‖_F + 1e-7,
    iterated on the short side."""
    x = a.astype(np.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for p, q, r in table:
        g = x @ x.T
        x = p * x + (q * g + r * g @ g) @ x
    return (x.T if tall else x).astype(np.float64)


def direction(a, mu, exact):
    if exact:
        return svd_map(a, (lambda s: s / np.sqrt(s * s + mu * mu)) if mu > 0 else np.ones_like)
    if mu == 0:
        return newton_schulz(a, MUON)
    stacked = np.vstack([a, mu * np.eye(a.shape[1])])
    return newton_schulz(stacked, MUON)[: a.shape[0]]


def run(n, m, mu, exact, eta=0.05, steps=1000, seed=0):
    rng = np.random.default_rng(seed)
    w = svd_map(rng.standard_normal((n, m)), np.ones_like)
    g = rng.standard_normal((n, m))
    g *= np.sqrt(m) / np.linalg.norm(g)
    x = np.zeros((m, m))
    marks, best = [], np.inf
    for t in range(steps):
        a = g + w @ x
        best = min(best, np.linalg.svd(a, compute_uv=False).sum())
        phi = direction(a, mu, exact)
        r = w.T @ phi + phi.T @ w
        x = x - eta * r
        if t + 1 in (100, 300, 1000):
            marks.append(np.linalg.norm(r))
    value = np.sum(g * phi) / np.linalg.norm(phi, 2) / best
    return marks, value, np.linalg.norm(phi, 2)


def main():
    exact = "--ns" not in sys.argv
    eta = 0.05
    if "--eta" in sys.argv:
        i = sys.argv.index("--eta")
        try:
            eta = float(sys.argv[i + 1])
        except (IndexError, ValueError):
            print("stiefel_smoothing: --eta needs a number, e.g. --eta 0.15", file=sys.stderr)
            sys.exit(2)
    print("msign: " + ("exact (f64 SVD)" if exact else "Keller Jordan's Newton–Schulz, f32"))
    print(f"η₂ = {eta}")
    shapes = [(7, 6), (10, 6), (12, 8), (16, 8), (33, 32), (40, 32), (48, 32), (56, 32)]
    for mu in [0.0, 0.05, 0.1, 0.2]:
        print(f"μ = {mu}" + (" (plain dual)" if mu == 0 else ""))
        for n, m in shapes:
            marks, value, norm = run(n, m, mu, exact, eta=eta)
            res = "  ".join(f"{v:.1e}" for v in marks)
            print(
                f"  {n:>2}×{m:<2}  residual at 100/300/1000: {res}"
                f"   value/bound {value:.3f}   ‖Φ‖₂ {norm:.3f}"
            )


if __name__ == "__main__":
    main()
