"""Writes tests/fixtures/torch_bench_ns.json: the Newton-Schulz functions of
bench/torch_reference.py (the PyTorch side of the GPU benchmark: ns_batched,
ns_gram_batched) run in float64 on small seeded batches, so that
tests/torch_reference.rs can check that they compute what steepest's msign
computes (NewtonSchulz::muon() and its gram_form()): the GPU comparison is
then between two implementations of one function, not two functions.

    python3 scripts/torch_bench_ns_fixture.py      # needs torch (made with 2.11.0)
"""
import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("torch_reference", os.path.join(ROOT, "bench", "torch_reference.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

# (b, m, n): wide, tall, square, aspect 3 and 4 (the Gram form applies from 2),
# aspect 1.5 (the Gram form falls back to the standard form)
SHAPES = [(2, 8, 24), (1, 24, 8), (3, 16, 16), (2, 6, 24), (1, 12, 18)]


def main():
    g = torch.Generator().manual_seed(11)
    cases = []
    for b, m, n in SHAPES:
        x = torch.randn(b, m, n, generator=g, dtype=torch.float64)
        std = ref.ns_batched(torch, x, dtype=torch.float64)
        gram = ref.ns_gram_batched(torch, x, dtype=torch.float64)
        cases.append({
            "shape": [b, m, n],
            "input": x.flatten().tolist(),
            "standard": std.flatten().tolist(),
            "gram": gram.flatten().tolist(),
        })
    doc = {
        "made_by": "scripts/torch_bench_ns_fixture.py",
        "torch": torch.__version__,
        "coefficients": list(ref.NS_COEFFS),
        "steps": ref.NS_STEPS,
        "gram_restarts": [2, 4],
        "cases": cases,
    }
    path = os.path.join(ROOT, "tests", "fixtures", "torch_bench_ns.json")
    with open(path, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    print(f"wrote {path} ({len(cases)} cases, torch {torch.__version__})")


if __name__ == "__main__":
    main()
