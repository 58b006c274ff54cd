//! The same comparisons as `kernels_emu.rs`, on a real GPU: the device seam
//! (`steepest::device::*`) on CUDA tensors dispatches to the kernels of
//! `kernels/*.cu`; the CPU path on copies of the same data is the reference.
//!
//! Tolerances: the elementwise kernels are built without FMA contraction,
//! without flushing subnormals and with IEEE division and square root
//! (build.rs passes the flags and refuses PTX with any `fma`, `.ftz` or
//! `.approx`; PTX's `mul.rn`/`add.rn` are never fused by ptxas), so they
//! must match the CPU bit for bit, as under the emulator. Reductions, power iteration and msign use the
//! tolerances of the emulator tests, plus TF32-free cuBLAS (compute type
//! 32F), so the same bounds apply. Whole optimizer steps are compared too
//! (`kernels_emu/whole_steps.rs`).
#![cfg(all(feature = "cuda", feature = "emu"))]

#[path = "kernels_emu/cases.rs"]
mod cases;
#[path = "kernels_emu/whole_steps.rs"]
mod whole_steps;

use candle_core::{DType, Device, Tensor, Var};
use cases::*;
use steepest::device::{self, AdamItem, AdamStep, DecayTerm, Rank1, SgdItem};
use steepest::linalg::{msign, power_iteration, GramNewtonSchulz, NewtonSchulz};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// Equal bits elementwise, any NaN equal to any NaN (a GPU writes the
/// canonical NaN `0x7fffffff` where the CPU propagates its operand's
/// payload), naming the first differing element.
fn assert_same_value_bits(what: &str, a: &Tensor, b: &Tensor) {
    let (x, y) = (f64s(a), f64s(b));
    assert_eq!(x.len(), y.len(), "{what}: lengths");
    let same = |p: f64, q: f64| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan());
    if let Some(i) = (0..x.len()).find(|&i| !same(x[i], y[i])) {
        let diff = (0..x.len()).filter(|&i| !same(x[i], y[i])).count();
        panic!(
            "{what}: {diff} of {} elements differ, first at {i}: {:e} vs {:e}",
            x.len(),
            x[i],
            y[i]
        );
    }
}

struct P {
    w: Var,
    g: Tensor,
    s1: Var,
    s2: Var,
    r1: Option<(Tensor, Tensor)>,
}

/// The decay of case `i` (0: none, 1: decoupled, 2: decoupled plus rank-1),
/// turning with the dtype too, so that every shape meets each decay and
/// every dtype meets each decay on a third of the shapes.
fn variant(i: usize) -> usize {
    let n = UPDATE_SHAPES.len();
    (i % n + i / n) % 3
}

/// Case `i`: shape `i mod n` (`n` shapes), in `dt`.
fn make(i: usize, dt: DType, dev: &Device) -> P {
    let shape = UPDATE_SHAPES[i % UPDATE_SHAPES.len()];
    let mut r = rng(100 + i as u64);
    let cpu = Device::Cpu;
    let w = randn(&mut r, shape, dt, &cpu);
    let g = randn(&mut r, shape, dt, &cpu);
    let s1 = (randn(&mut r, shape, DType::F32, &cpu) * 0.1).unwrap();
    let s2 = rand_pos(&mut r, shape, 0.01, &cpu);
    let r1 = (variant(i) == 2).then(|| rank1_factors(&mut r, shape, &cpu));
    P {
        w: var_on(&w, dev),
        g: g.to_device(dev).unwrap(),
        s1: var_on(&s1, dev),
        s2: var_on(&s2, dev),
        r1: r1.map(|(a, b)| (a.to_device(dev).unwrap(), b.to_device(dev).unwrap())),
    }
}

fn decay(p: &P, i: usize) -> DecayTerm<'_> {
    DecayTerm {
        scale: if variant(i) == 0 { 1.0 } else { 0.999 },
        rank1: p.r1.as_ref().map(|(a, b)| Rank1 { coeff: 0.03, a, b }),
    }
}

/// The index of `p` in `ps` (its case number, which sets its decay).
fn idx(ps: &[P], p: &P) -> usize {
    ps.iter().position(|q| std::ptr::eq(q, p)).expect("member")
}

/// Every shape in every dtype (`3n` cases, case `i` in `DTYPES[i / n]`),
/// the three decays turning over them, in one mixed launch on the GPU.
#[test]
fn gpu_fused_updates_match_cpu() {
    let dev = gpu();
    let n = UPDATE_SHAPES.len();
    let dtype = |i: usize| DTYPES[(i / n) % 3];
    for (fam, mu, nesterov) in [
        ("adamw", 0.0, false),
        ("sgd", 0.9, true),
        ("sgd0", 0.0, false),
    ] {
        let cpu: Vec<P> = (0..n * 3)
            .map(|i| make(i, dtype(i), &Device::Cpu))
            .collect();
        let gpu: Vec<P> = (0..n * 3).map(|i| make(i, dtype(i), &dev)).collect();
        // The CPU reference one parameter per call (the seam's CPU path takes
        // one dtype per group); the GPU gets the whole mixed set at once.
        let cpu_calls: Vec<&[P]> = cpu.chunks(1).collect();
        let calls: Vec<&[P]> = cpu_calls.into_iter().chain([gpu.as_slice()]).collect();
        for ps in calls {
            match fam {
                "adamw" => {
                    let items: Vec<AdamItem<'_>> = ps
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (if ps.len() == 1 { idx(&cpu, p) } else { i }, p))
                        .map(|(i, p)| AdamItem {
                            w: &p.w,
                            g: &p.g,
                            m: &p.s1,
                            v: &p.s2,
                            step: AdamStep {
                                lr_bc1: 0.01 / (1.0 - 0.9f64.powi(3)),
                                bc2_sqrt: (1.0 - 0.999f64.powi(3)).sqrt(),
                            },
                            decay: decay(p, i),
                        })
                        .collect();
                    device::adamw_step(&items, 0.9, 0.999, 1e-8).unwrap();
                }
                _ => {
                    let items: Vec<SgdItem<'_>> = ps
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (if ps.len() == 1 { idx(&cpu, p) } else { i }, p))
                        .map(|(i, p)| SgdItem {
                            w: &p.w,
                            g: &p.g,
                            buf: (mu > 0.0).then_some(&p.s1),
                            lr: 0.01,
                            decay: decay(p, i),
                        })
                        .collect();
                    device::sgd_step(&items, mu, nesterov).unwrap();
                }
            }
        }
        for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            let what = format!("{fam} [{i}] {:?} {:?}", c.w.dtype(), c.w.dims());
            assert_same_value_bits(&what, c.w.as_tensor(), g.w.as_tensor());
            assert_same_value_bits(&what, c.s1.as_tensor(), g.s1.as_tensor());
            assert_same_value_bits(&what, c.s2.as_tensor(), g.s2.as_tensor());
        }
    }
}

#[test]
fn gpu_ema_and_apply_match_cpu() {
    let dev = gpu();
    for i in 0..UPDATE_SHAPES.len() {
        let cpu: Vec<P> = DTYPES.iter().map(|&dt| make(i, dt, &Device::Cpu)).collect();
        let gpu: Vec<P> = DTYPES.iter().map(|&dt| make(i, dt, &dev)).collect();
        let mut dims = vec![3];
        dims.extend_from_slice(cpu[0].w.dims());
        let d = randn(&mut rng(7), &dims, DType::F32, &Device::Cpu);
        let mut outs = Vec::new();
        // CPU: one member per call (one dtype per call); GPU: the batch at once.
        let mut one = dims.clone();
        one[0] = 1;
        let mut rows = Vec::new();
        for (k, p) in cpu.iter().enumerate() {
            let out = Var::zeros(one.as_slice(), DType::F32, &Device::Cpu).unwrap();
            device::ema_momentum(&[&p.g], &[&p.s1], &out, 0.95, i % 2 == 0).unwrap();
            rows.push(out.as_tensor().clone());
            let dk = d.narrow(0, k, 1).unwrap();
            device::apply_step(&[&p.w], &dk, &[0.01 * (k + 1) as f64], &[decay(p, i)]).unwrap();
        }
        outs.push(Tensor::cat(&rows, 0).unwrap());
        {
            let out = Var::zeros(dims.as_slice(), DType::F32, &dev).unwrap();
            let gs: Vec<&Tensor> = gpu.iter().map(|p| &p.g).collect();
            let bs: Vec<&Var> = gpu.iter().map(|p| &p.s1).collect();
            device::ema_momentum(&gs, &bs, &out, 0.95, i % 2 == 0).unwrap();
            let ws: Vec<&Var> = gpu.iter().map(|p| &p.w).collect();
            let decays: Vec<DecayTerm<'_>> = gpu.iter().map(|p| decay(p, i)).collect();
            device::apply_step(
                &ws,
                &d.to_device(&dev).unwrap(),
                &[0.01, 0.02, 0.03],
                &decays,
            )
            .unwrap();
            outs.push(out.as_tensor().clone());
        }
        assert_same_value_bits("ema out", &outs[0], &outs[1]);
        for (c, g) in cpu.iter().zip(&gpu) {
            assert_same_value_bits("apply w", c.w.as_tensor(), g.w.as_tensor());
            assert_same_value_bits("ema buf", c.s1.as_tensor(), g.s1.as_tensor());
        }
    }
}

/// Every shape in every dtype, in one call.
#[test]
fn gpu_reductions_match_cpu() {
    let dev = gpu();
    let mut r = rng(3);
    let ts: Vec<Tensor> = DTYPES
        .iter()
        .flat_map(|&dt| UPDATE_SHAPES.iter().map(move |s| (s, dt)))
        .map(|(s, dt)| randn(&mut r, s, dt, &Device::Cpu))
        .collect();
    let on_gpu: Vec<Tensor> = ts.iter().map(|t| t.to_device(&dev).unwrap()).collect();
    let refs: Vec<&Tensor> = on_gpu.iter().collect();
    assert_eq!(device::first_nonfinite(&refs).unwrap(), None);
    let got = device::sum_squares(&refs).unwrap();
    for (t, s) in ts.iter().zip(&got) {
        let want: f64 = f64s(t).iter().map(|x| x * x).sum();
        assert!(
            (s - want).abs() <= 1e-5 * want,
            "{:?}: {s} vs {want}",
            t.dims()
        );
    }
    let mut bad = f64s(&ts[5]);
    *bad.last_mut().unwrap() = f64::NAN;
    let bad = Tensor::from_vec(bad, ts[5].dims(), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let mut refs = refs.clone();
    refs[5] = &bad;
    assert_eq!(device::first_nonfinite(&refs).unwrap(), Some(5));
}

/// Every shape in every dtype.
#[test]
fn gpu_power_iteration_matches_cpu() {
    let dev = gpu();
    let cases = POWER_SHAPES
        .iter()
        .enumerate()
        .flat_map(|(i, &bmn)| DTYPES.iter().map(move |&dt| (i, bmn, dt)));
    for (i, (b, m, n), dt) in cases {
        let mut r = rng(200 + i as u64);
        let w = spiked(&mut r, b, m, n, dt, &Device::Cpu);
        let start = start_vec(&mut r, b, n, &Device::Cpu);
        let want = power_iteration(&w, Some(&start), 6).unwrap();
        let got = power_iteration(
            &w.to_device(&dev).unwrap(),
            Some(&start.to_device(&dev).unwrap()),
            6,
        )
        .unwrap();
        assert_sigma_close((b, m, n), &want.sigma, &got.sigma);
        assert!(max_diff(&want.u, &got.u) < 1e-3 && max_diff(&want.v, &got.v) < 1e-3);
    }
}

/// A group's parameters read where they are (each its own allocation, one
/// a view at an offset), each warm-started from its own state vector (one of
/// them zero: no start), through the kernels' tables of addresses, against
/// the CPU on the same matrices; each v₁ lands in its state vector.
#[test]
fn gpu_power_iteration_members_match_cpu() {
    let dev = gpu();
    for (i, &(b, m, n)) in [(3, 200, 70), (2, 70, 200), (4, 64, 64), (2, 1, 300)]
        .iter()
        .enumerate()
    {
        let dt = DTYPES[i % DTYPES.len()];
        let mut r = rng(260 + i as u64);
        let w = spiked(&mut r, b, m, n, dt, &Device::Cpu);
        let start = start_vec(&mut r, b, n, &Device::Cpu);
        let mut rows: Vec<Tensor> = (0..b).map(|j| start.get(j).unwrap()).collect();
        rows[0] = rows[0].zeros_like().unwrap();
        let start = Tensor::stack(&rows, 0).unwrap();
        let want = power_iteration(&w, Some(&start), 3).unwrap();
        let wg = w.to_device(&dev).unwrap();
        let mut ws: Vec<Tensor> = (0..b).map(|j| wg.get(j).unwrap().copy().unwrap()).collect();
        let pad = Tensor::zeros((3, n), dt, &dev).unwrap();
        ws[0] = Tensor::cat(&[&pad, &ws[0]], 0)
            .unwrap()
            .narrow(0, 3, m)
            .unwrap();
        let vs: Vec<Var> = rows
            .iter()
            .map(|s| Var::from_tensor(&s.to_device(&dev).unwrap()).unwrap())
            .collect();
        let got = device::power_iteration_members(&ws, &vs, 3).unwrap();
        assert_sigma_close((b, m, n), &want.sigma, &got.sigma);
        assert!(max_diff(&want.u, &got.u) < 1e-3 && max_diff(&want.v, &got.v) < 1e-3);
        for (j, v) in vs.iter().enumerate() {
            assert_eq!(f64s(v), f64s(&got.v.get(j).unwrap()), "v₁ stored");
        }
    }
}

/// σ₁ of every member within 1e-4 (relative) of the CPU's.
fn assert_sigma_close((b, m, n): (usize, usize, usize), want: &Tensor, got: &Tensor) {
    for (a, c) in f64s(want).iter().zip(&f64s(got)) {
        assert!(
            (a - c).abs() <= 1e-4 * a.abs().max(1e-30),
            "({b},{m},{n}): σ {a} vs {c}"
        );
    }
}

/// Short sides of 2048 and 4096: the power iteration's static tiles plus its
/// 2·4·k B of dynamic shared memory exceed 48 KiB, so the launch needs the
/// opt-in (which the dynamic part alone would not ask for). The limit is
/// the device's, from the driver (227 KiB on sm_90, 99 KiB on sm_86/89):
/// it must fit these shapes (34 816 B of tiles + 8·4096 B), or they would
/// run on candle's ops (a failed query reads 48 KiB), which the comparison
/// alone would not see.
#[test]
fn gpu_power_iteration_large_short_side() {
    let dev = gpu();
    let Device::Cuda(cuda) = &dev else {
        unreachable!("gpu() is a CUDA device")
    };
    let shared = device::cuda::shared_memory_per_block(cuda);
    assert!(
        shared >= 34_816 + 8 * 4096,
        "opt-in shared memory per block: {shared} B"
    );
    let shapes = [
        (1, 2048, 2100, DType::F32),
        (2, 2100, 2048, DType::BF16),
        (1, 4096, 4096, DType::F16),
    ];
    for (i, &(b, m, n, dt)) in shapes.iter().enumerate() {
        let mut r = rng(250 + i as u64);
        let w = spiked(&mut r, b, m, n, dt, &Device::Cpu);
        let want = power_iteration(&w, None, 4).unwrap();
        let got = power_iteration(&w.to_device(&dev).unwrap(), None, 4).unwrap();
        assert_sigma_close((b, m, n), &want.sigma, &got.sigma);
    }
}

/// `SpectralNormPenalty` on CUDA parameters (its power iteration through
/// the kernels, its loss term through candle's ops) against the same
/// parameters on the CPU: `add_to_grads` (cold; its gradients within 1e-2
/// of the largest, the rank-one terms being rounded to the 16-bit dtypes),
/// then three calls of `loss` (warm), the value and every gradient within
/// 1e-4 relative of the largest (1e-2 in the 16-bit dtypes).
#[test]
fn gpu_spectral_norm_penalty_matches_cpu() {
    use steepest::optim::NamedVar;
    use steepest::penalty::SpectralNormPenalty;
    let dev = gpu();
    let shapes: [(&[usize], DType); 5] = [
        (&[200, 70], DType::F32),
        (&[200, 70], DType::F32),
        (&[70, 300], DType::BF16),
        (&[1, 500], DType::F16),
        (&[64, 8, 3, 3], DType::F32),
    ];
    let mut r = rng(280);
    let ts: Vec<Tensor> = shapes
        .iter()
        .map(|(s, dt)| randn(&mut r, s, *dt, &Device::Cpu))
        .collect();
    let named = |d: &Device| -> Vec<NamedVar> {
        ts.iter()
            .enumerate()
            .map(|(i, t)| NamedVar {
                name: format!("w{i}"),
                var: var_on(t, d),
            })
            .collect()
    };
    let (cpu_vars, gpu_vars) = (named(&Device::Cpu), named(&dev));
    let mut cpu = SpectralNormPenalty::from_named(cpu_vars.clone(), 0.3).unwrap();
    let mut on_gpu = SpectralNormPenalty::from_named(gpu_vars.clone(), 0.3).unwrap();
    // add_to_grads into stores without the matrices (a constant's
    // backward): the rank-one gradients alone.
    let store = || {
        Tensor::zeros((), DType::F32, &Device::Cpu)
            .unwrap()
            .backward()
            .unwrap()
    };
    let (mut sa, mut sb) = (store(), store());
    let (x, y) = (
        cpu.add_to_grads(&mut sa).unwrap(),
        on_gpu.add_to_grads(&mut sb).unwrap(),
    );
    assert!((x - y).abs() <= 1e-4 * x, "add_to_grads: {x} vs {y}");
    for (p, q) in cpu_vars.iter().zip(&gpu_vars) {
        let (want, got) = (
            sa.get(p.var.as_tensor()).unwrap(),
            sb.get(q.var.as_tensor()).unwrap(),
        );
        let d = max_diff(want, got);
        assert!(
            d <= 1e-2 * max_abs(want),
            "add_to_grads {}: off by {d}",
            p.name
        );
    }
    for call in 0..3 {
        let (a, b) = (cpu.loss().unwrap(), on_gpu.loss().unwrap());
        let (x, y) = (f64s(&a)[0], f64s(&b)[0]);
        assert!((x - y).abs() <= 1e-4 * x, "call {call}: loss {x} vs {y}");
        let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
        for (p, q) in cpu_vars.iter().zip(&gpu_vars) {
            let (want, got) = (ga.get(&p.var).unwrap(), gb.get(&q.var).unwrap());
            let tol = 1e-4 * max_abs(want)
                + if p.var.dtype() == DType::F32 {
                    0.0
                } else {
                    1e-2 * max_abs(want)
                };
            assert!(
                max_diff(want, got) <= tol,
                "call {call} {}: gradient off by {}",
                p.name,
                max_diff(want, got)
            );
        }
    }
}

/// What the driver reports for every kernel: the static shared memory the
/// launch code assumes (the emulator checks launches with it), and no local
/// memory (ptxas reports no spills and no stack for sm_90).
#[test]
fn gpu_kernel_resources_match_the_launch_code() {
    let dev = gpu();
    for k in steepest::device::emu::kernel_names() {
        let r = steepest::device::cuda::kernel_resources(&dev, k).unwrap();
        println!(
            "{k}: {} registers, {} B static shared, {} B local",
            r.registers, r.static_shared, r.local
        );
        assert_eq!(
            r.static_shared, r.assumed_static_shared,
            "{k}: static shared memory"
        );
        assert_eq!(r.local, 0, "{k}: local memory (spills)");
    }
}

/// Aliased operands are refused on the GPU as on the CPU, nothing changed.
#[test]
fn gpu_aliased_operands_are_refused() {
    let dev = gpu();
    aliased_operands_are_refused_by(&dev, |items| device::adamw_step(items, 0.9, 0.999, 1e-8));
}

#[test]
fn gpu_msign_matches_cpu() {
    msign_on_every_shape(&NewtonSchulz::muon(), 300);
}

/// The Gram form on the GPU against the CPU's Gram form (`min_aspect = 1`:
/// every shape), f32 and bf16 operands, restarting every two steps.
#[test]
fn gpu_msign_gram_form_matches_cpu() {
    let gram = GramNewtonSchulz {
        min_aspect: 1.0,
        restarts: vec![2, 4],
    };
    msign_on_every_shape(&NewtonSchulz::you().with_gram(gram), 400);
}

/// Shapes whose short side spans several Gram tiles (`gram_tile`: 3 tiles
/// of 128 at 300, 4 of 160 with a short last one at 600, 4 of 192 at 768,
/// the GPT-2 size): the tiled symmetric products of the benchmark's sizes,
/// which `MSIGN_SHAPES` (short sides ≤ 130, at most 2 tiles) do not reach.
const MSIGN_TILED_SHAPES: &[(usize, usize, usize)] =
    &[(2, 300, 520), (1, 1000, 600), (1, 768, 768)];

/// msign under `ns` on the GPU against the CPU on every shape (and the
/// tiled ones): f32 input with f32 operands within 2e-3 of the largest
/// entry, bf16 operands within 0.1; bf16 input (the benchmark's
/// `msign_bf16`: loaded and stored as bf16) against the CPU's msign of the
/// same bf16 input, within 1e-2 (f32 operands: the output's bf16 rounding)
/// and 0.1 (bf16 operands).
fn msign_on_every_shape(ns: &NewtonSchulz, seed: u64) {
    let dev = gpu();
    let ns16 = ns.clone().with_compute_dtype(DType::BF16);
    for (i, &(b, m, n)) in MSIGN_SHAPES.iter().chain(MSIGN_TILED_SHAPES).enumerate() {
        let mut r = rng(seed + i as u64);
        let g = randn(&mut r, &[b, m, n], DType::F32, &Device::Cpu);
        let want = msign(&g, ns).unwrap();
        let scale = max_abs(&want).max(1.0);
        let got = msign(&g.to_device(&dev).unwrap(), ns).unwrap();
        let d = max_diff(&want, &got);
        assert!(d <= 2e-3 * scale, "({b},{m},{n}): {d:e}");
        let got16 = msign(&g.to_device(&dev).unwrap(), &ns16).unwrap();
        let d16 = max_diff(&want, &got16);
        assert!(d16 <= 0.1 * scale, "({b},{m},{n}) bf16: {d16:e}");
        let gb = g.to_dtype(DType::BF16).unwrap();
        let want_b = msign(&gb, ns).unwrap();
        let scale_b = max_abs(&want_b).max(1.0);
        for (nsx, tol, what) in [(ns, 1e-2, "f32"), (&ns16, 0.1, "bf16")] {
            let got_b = msign(&gb.to_device(&dev).unwrap(), nsx).unwrap();
            assert_eq!(got_b.dtype(), DType::BF16);
            let d = max_diff(&want_b, &got_b);
            assert!(
                d <= tol * scale_b,
                "({b},{m},{n}) bf16 input, {what} operands: {d:e}"
            );
        }
    }
}

/// Whole optimizer steps (AdamW, SGD, Muon; decoupled and spectral decay;
/// the Gram form) on the GPU against the CPU, 5 steps from the same
/// parameters and gradients: parameters and state within the tolerances of
/// `kernels_emu/whole_steps.rs`.
#[test]
fn gpu_whole_optimizer_steps_match_cpu() {
    whole_steps::compare(&Device::Cpu, &gpu(), false);
}

/// candle's generic ops on the GPU (the path of Metal and of f64 on CUDA,
/// forced by `device::with_generic_ops`) against the CPU, whole steps, same
/// tolerances as the kernels.
#[test]
fn gpu_generic_ops_match_the_kernels() {
    let cpu = |name: &str| whole_steps::run(name, &Device::Cpu);
    let generic = |name: &str| device::with_generic_ops(|| whole_steps::run(name, &gpu()));
    whole_steps::compare_runs(cpu, generic, false);
}

/// Every kernel the launch code names is in the embedded PTX.
#[test]
fn gpu_ptx_has_every_kernel() {
    let entries = steepest::device::cuda::ptx_entries();
    for k in steepest::device::emu::kernel_names() {
        assert!(entries.contains(k), "{k} missing from the PTX");
    }
}

/// The pool setting takes on a CUDA device and is refused, by name, on the CPU.
#[test]
fn gpu_retain_freed_memory() {
    steepest::device::cuda::retain_freed_memory(&gpu()).unwrap();
    let e = steepest::device::cuda::retain_freed_memory(&Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("retain_freed_memory"), "{e}");
}

/// AdamW with f32 master weights over bf16 parameters (several shapes, one
/// changed between steps outside the optimizer) on the GPU against the CPU:
/// parameters and masters bit for bit after every step (the update kernels
/// match the CPU bit for bit; the master's check and rounding run as
/// candle's ops on CUDA, rounding to nearest even as the CPU does).
#[test]
fn gpu_master_weights_match_cpu() {
    use steepest::optim::{AdamW, AdamWConfig, NamedVar};
    let shapes: [&[usize]; 4] = [&[64, 48], &[48, 64], &[64], &[3, 5, 7]];
    let make = |dev: &Device| -> (AdamW, Vec<Var>) {
        let vars: Vec<NamedVar> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut r = rng(900 + i as u64);
                let w = randn(&mut r, s, DType::BF16, &Device::Cpu);
                NamedVar {
                    name: format!("p{i}"),
                    var: var_on(&w, dev),
                }
            })
            .collect();
        let cfg = AdamWConfig {
            lr: 1e-3,
            decay_vectors: true,
            ..Default::default()
        };
        let handles = vars.iter().map(|v| v.var.clone()).collect();
        (
            AdamW::from_named(vars, cfg).unwrap().with_master_weights(),
            handles,
        )
    };
    let (dev, cpu) = (gpu(), Device::Cpu);
    let (mut a, va) = make(&cpu);
    let (mut b, vb) = make(&dev);
    for step in 0..5 {
        if step == 3 {
            let mut r = rng(999);
            let edit = randn(&mut r, shapes[0], DType::BF16, &cpu);
            va[0].set(&edit).unwrap();
            vb[0].set(&edit.to_device(&dev).unwrap()).unwrap();
        }
        let grads = |d: &Device| -> Vec<(usize, Tensor)> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut r = rng(1000 * step as u64 + i as u64);
                    let g = randn(&mut r, s, DType::BF16, &Device::Cpu);
                    (i, g.to_dtype(DType::F32).unwrap().to_device(d).unwrap())
                })
                .collect()
        };
        a.step_subset(&grads(&cpu)).unwrap();
        b.step_subset(&grads(&dev)).unwrap();
        for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
            assert_same_value_bits(&format!("step {step}: p{i}"), x.as_tensor(), y.as_tensor());
            let name = format!("p{i}");
            let (mx, my) = (
                a.driver().master_weight(&name).unwrap(),
                b.driver().master_weight(&name).unwrap(),
            );
            assert_same_value_bits(&format!("step {step}: p{i} master"), mx, my);
        }
    }
}
