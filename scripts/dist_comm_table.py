#!/usr/bin/env python3
"""Bytes sent per step and per rank for data-parallel Muon (DESIGN.md,
"Data-parallel Muon: communication"). Plain arithmetic, no dependencies:

    python3 scripts/dist_comm_table.py

(a) DDP: ring all-reduce of the gradients, every rank runs Muon on everything.
(b) Keller Jordan's distributed Muon: DDP all-reduce of the gradients, then per
    same-size group, rounds of N parameters (padded to a multiple of N), each
    rank updates one, all-gather of the updated parameters.
(c) this crate (src/distributed): one reduce-scatter of the flat gradient
    buffer (owner-ordered, padded to N equal chunks), owners update, one
    all-gather of the owners' parameters. The plan is the same LPT greedy as
    src/distributed/plan.rs.
Ring collectives: all-reduce 2(N-1)/N*S, reduce-scatter and all-gather (N-1)/N*S
per rank, S = bytes of the whole buffer. MB = 1e6 bytes.
"""
import math


def gpt2_small():
    return [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12


def one_b():
    return [(2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)] * 16


def cost(m, n):
    return m * n * min(m, n)


def lpt(shapes, world):
    order = sorted(range(len(shapes)), key=lambda i: (-cost(*shapes[i]), i))
    load = [0] * world
    elems = [0] * world
    for i in order:
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += cost(*shapes[i])
        elems[r] += shapes[i][0] * shapes[i][1]
    return load, elems


def ns_flops(m, n, iters=5):
    a, b = min(m, n), max(m, n)
    return iters * (4 * a * a * b + 2 * a ** 3)


def main():
    sets = [("GPT-2 small (48 matrices)", gpt2_small()), ("1B-class (64 matrices)", one_b())]
    print("| matrix set | N | grads | (a) DDP + replicated Muon | (b) Keller Jordan | (c) reduce-scatter + owners + all-gather | (c) gathering bf16 updates (`ParamGather::Bf16Updates`) | (c)/(a) |")
    print("|---|---|---|---|---|---|---|---|")
    mem = []
    for name, shapes in sets:
        P = sum(m * n for m, n in shapes)
        sizes = {}
        for m, n in shapes:
            sizes[m * n] = sizes.get(m * n, 0) + 1
        for N in (2, 4, 8):
            load, elems = lpt(shapes, N)
            F = N * max(elems)
            kj_pad = sum(math.ceil(c / N) * N * s for s, c in sizes.items())
            for gname, bg in (("bf16", 2), ("f32", 4)):
                bp = 4  # f32 parameters (master weights)
                a = 2 * (N - 1) / N * P * bg
                b = a + (N - 1) / N * kj_pad * bp
                c = (N - 1) / N * F * (bg + bp)
                c16 = (N - 1) / N * F * (bg + 2)
                print(f"| {name} | {N} | {gname} | {a/1e6:.1f} | {b/1e6:.1f} | {c/1e6:.1f} | {c16/1e6:.1f} | {c/a:.2f} |")
            ns_total = sum(ns_flops(m, n) for m, n in shapes)
            ns_max = 0
            order = sorted(range(len(shapes)), key=lambda i: (-cost(*shapes[i]), i))
            ld = [0] * N
            nsr = [0] * N
            for i in order:
                r = min(range(N), key=lambda r: (ld[r], r))
                ld[r] += cost(*shapes[i])
                nsr[r] += ns_flops(*shapes[i])
            ns_max = max(nsr)
            # KJ round robin per size group (size order as in its param groups: largest first).
            kj_ns = [0] * N
            kj_el = [0] * N
            for s in sorted(sizes, reverse=True):
                group = [sh for sh in shapes if sh[0] * sh[1] == s]
                for k, sh in enumerate(group):
                    kj_ns[k % N] += ns_flops(*sh)
                    kj_el[k % N] += s
            mem.append((name, N, P, F, max(elems), max(kj_el), ns_total, max(kj_ns), ns_max, max(load) / min(load)))
    print()
    print("| matrix set | N | P (elements) | padded flat buffer F = N·chunk | f32 momentum, largest rank: (a) | (b) | (c) | Newton–Schulz flops, busiest rank: (a) | (b) | (c) | (c) max/min cost |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, N, P, F, chunk, kj_el, nst, kjns, nsmax, ratio in mem:
        print(f"| {name} | {N} | {P/1e6:.2f} M | {F/1e6:.2f} M | {4*P/1e6:.0f} MB | {4*kj_el/1e6:.0f} MB | {4*chunk/1e6:.0f} MB | {nst/1e12:.2f} T | {kjns/1e12:.2f} T | {nsmax/1e12:.2f} T | {ratio:.3f} |")


if __name__ == "__main__":
    main()
