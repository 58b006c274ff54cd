//! msign against an f64 SVD: for any coefficient table, Newton–Schulz maps
//! `G = U diag(σ) Vᵀ` to `U diag(p(σ/(‖G‖_F·scale + ε))) Vᵀ` with `p` the
//! composition of the per-step polynomials.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use nalgebra::DMatrix;
use steepest::linalg::msign_generic;
use steepest::{msign, GramNewtonSchulz, NewtonSchulz};

type MsignFn = fn(&Tensor, &NewtonSchulz) -> steepest::Result<Tensor>;

/// The CPU fast path and the device-generic path: both must meet the reference.
const IMPLS: [(&str, MsignFn); 2] = [("msign", msign), ("msign_generic", msign_generic)];

/// The expected output, computed from the SVD in f64 with the polynomial
/// evaluated here from the table (not by the crate).
fn expected(g: &DMatrix<f64>, ns: &NewtonSchulz) -> DMatrix<f64> {
    let svd = g.clone().svd(true, true);
    let scale = g.norm() * ns.norm_scale() + ns.eps();
    let mapped = svd.singular_values.map(|s| {
        let mut x = s / scale;
        for &[a, b, c] in ns.coefficients() {
            x = a * x + b * x.powi(3) + c * x.powi(5);
        }
        x
    });
    svd.u.unwrap() * DMatrix::from_diagonal(&mapped) * svd.v_t.unwrap()
}

const SHAPES: [(usize, usize); 7] = [(16, 16), (12, 20), (20, 12), (1, 9), (9, 1), (7, 3), (5, 5)];

fn tables() -> Vec<(&'static str, NewtonSchulz)> {
    vec![
        ("muon", NewtonSchulz::muon()),
        ("polar_express(8)", NewtonSchulz::polar_express(8)),
        ("polar_express(3)", NewtonSchulz::polar_express(3)),
        ("you", NewtonSchulz::you()),
        ("cubic(12)", NewtonSchulz::cubic(12)),
        ("quintic(6)", NewtonSchulz::quintic(6)),
    ]
}

#[test]
fn msign_applies_the_singular_value_polynomial_f64() {
    let mut r = rng(1);
    for (m, n) in SHAPES {
        let g = randn(&mut r, &[m, n], DType::F64);
        let gd = to_dmatrix(&g);
        for (name, ns) in tables() {
            for (which, f) in IMPLS {
                let got = to_dmatrix(&f(&g, &ns).unwrap());
                let err = rel_err(&got, &expected(&gd, &ns));
                assert!(
                    err < 1e-9,
                    "{which} {name} on {m}x{n}: relative error {err}"
                );
            }
        }
    }
}

#[test]
fn msign_f32_is_close_to_the_f64_reference() {
    let mut r = rng(2);
    for (m, n) in SHAPES {
        let g = randn(&mut r, &[m, n], DType::F32);
        let gd = to_dmatrix(&g);
        for (name, ns) in tables() {
            for (which, f) in IMPLS {
                let got = f(&g, &ns).unwrap();
                assert_eq!(got.dtype(), DType::F32);
                let err = rel_err(&to_dmatrix(&got), &expected(&gd, &ns));
                assert!(
                    err < 1e-4,
                    "{which} {name} on {m}x{n}: relative error {err}"
                );
            }
        }
    }
}

#[test]
fn precise_tables_converge_to_the_polar_factor() {
    let mut r = rng(3);
    // Singular values spread over [0.05, 1]: well inside what both tables handle.
    for (m, n) in [(8, 8), (6, 10), (10, 6)] {
        let k = m.min(n);
        let s: Vec<f64> = (0..k)
            .map(|i| 0.05 + 0.95 * i as f64 / (k - 1) as f64)
            .collect();
        let g = with_singular_values(&mut r, m, n, &s);
        let exact = polar(&g);
        let gt = from_dmatrix(&g, DType::F64);
        for (name, ns, tol) in [
            ("polar_express(10)", NewtonSchulz::polar_express(10), 1e-10),
            ("cubic(40)", NewtonSchulz::cubic(40), 1e-10),
        ] {
            let got = to_dmatrix(&msign(&gt, &ns).unwrap());
            let err = rel_err(&got, &exact);
            assert!(err < tol, "{name} on {m}x{n}: ‖msign − UVᵀ‖/‖UVᵀ‖ = {err}");
        }
        // The Muon quintic is fast, not exact: singular values within [0.6, 1.25].
        let got = to_dmatrix(&msign(&gt, &NewtonSchulz::muon()).unwrap());
        for sv in singular_values(&got) {
            assert!(
                (0.6..1.25).contains(&sv),
                "muon singular value {sv} out of range on {m}x{n}"
            );
        }
    }
}

#[test]
fn batch_equals_each_matrix_alone() {
    let mut r = rng(4);
    for (m, n) in [(4, 6), (6, 4)] {
        let g = randn(&mut r, &[3, m, n], DType::F32);
        let ns = NewtonSchulz::muon();
        for (which, f) in IMPLS {
            let batched = f(&g, &ns).unwrap();
            assert_eq!(batched.dims(), &[3, m, n]);
            for i in 0..3 {
                let alone = msign_generic(&g.get(i).unwrap(), &ns).unwrap();
                let d = max_abs_diff(&batched.get(i).unwrap(), &alone);
                assert!(d < 1e-5, "{which} {m}x{n} item {i}: {d}");
            }
        }
    }
}

/// The fused CPU path spreads a batch of small matrices over threads (one
/// matrix each): every member's result must be bit-identical to the matrix
/// alone, in both forms.
#[test]
fn batched_small_matrices_are_bit_identical_to_each_alone() {
    let mut r = rng(11);
    for dt in [DType::F32, DType::F64] {
        for (b, m, n) in [(5, 16, 40), (7, 30, 12), (3, 9, 9)] {
            let g = randn(&mut r, &[b, m, n], dt);
            for ns in [NewtonSchulz::muon(), NewtonSchulz::you().gram_form()] {
                let batched = msign(&g, &ns).unwrap();
                for i in 0..b {
                    let alone = msign(&g.get(i).unwrap(), &ns).unwrap();
                    let (x, y) = (to_f64_vec(&batched.get(i).unwrap()), to_f64_vec(&alone));
                    assert!(x == y, "{dt:?} ({b}, {m}, {n}) member {i} differs");
                }
            }
        }
    }
}

/// Zero in, zero out: on the fused CPU path (`msign`), the generic path
/// (`msign_generic`, and `msign` with a compute dtype) and the Gram form,
/// also with `eps = 0`, where the normalisation would be 0/0 (it gave NaN
/// there: an optimizer with such a schedule wrote NaN weights on a zero
/// gradient).
#[test]
fn zero_matrix_gives_zero_not_nan() {
    for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        for shape in [vec![4, 6], vec![6, 4], vec![2, 3, 3], vec![2, 3, 9]] {
            let z = Tensor::zeros(shape.as_slice(), dt, &Device::Cpu).unwrap();
            for eps in [1e-7, 0.0] {
                let muon = NewtonSchulz::muon().with_eps(eps);
                for ns in [
                    muon.clone(),
                    muon.clone().gram_form(),
                    muon.clone().with_compute_dtype(DType::BF16),
                ] {
                    for (path, out) in [
                        ("msign", msign(&z, &ns).unwrap()),
                        ("generic", msign_generic(&z, &ns).unwrap()),
                    ] {
                        let v = common::to_f64_vec(&out);
                        assert!(
                            v.iter().all(|x| *x == 0.0),
                            "{path} {dt:?} {shape:?} eps {eps} {ns:?}: {v:?}"
                        );
                    }
                }
            }
        }
    }
}

/// A NaN or ±Inf anywhere in a matrix makes that matrix's output all NaN
/// (msign's docs), on the fused CPU path and the generic one, for the
/// standard and the Gram form and one cubic step (where nothing else
/// mixes the entries); the other member of a batch is untouched. The
/// generic path replaced a NaN norm by 1 (as it does a zero one), so
/// `[[Inf, 1]]` under one cubic step came out `[NaN, −Inf]`.
#[test]
fn a_non_finite_entry_gives_an_all_nan_matrix() {
    for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        for (dims, at) in [((1usize, 2usize), 0usize), ((3, 5), 7), ((6, 2), 3)] {
            let mut vals: Vec<f32> = (0..dims.0 * dims.1).map(|i| 0.3 + i as f32).collect();
            vals[at] = bad;
            let g = Tensor::from_vec(vals, dims, &Device::Cpu).unwrap();
            let fine = Tensor::ones(dims, DType::F32, &Device::Cpu).unwrap();
            let batch = Tensor::stack(&[&g, &fine], 0).unwrap();
            for ns in [
                NewtonSchulz::cubic(1),
                NewtonSchulz::muon(),
                NewtonSchulz::muon().gram_form(),
            ] {
                for (path, out) in [
                    ("msign", msign(&batch, &ns).unwrap()),
                    ("generic", msign_generic(&batch, &ns).unwrap()),
                ] {
                    let first = common::to_f64_vec(&out.get(0).unwrap());
                    assert!(
                        first.iter().all(|x| x.is_nan()),
                        "{path} {bad} {dims:?} {ns:?}: {first:?}"
                    );
                    let second = common::to_f64_vec(&out.get(1).unwrap());
                    assert!(second.iter().all(|x| x.is_finite()), "{path}: {second:?}");
                }
            }
        }
    }
}

/// f64 entries so large that `Σ g²` overflows (1e160: the squares are
/// 1e320): the result is that of the same matrix scaled down (msign is
/// scale-invariant), not zero, on the fused CPU path and the generic path.
#[test]
fn huge_f64_entries_do_not_overflow_the_normalisation() {
    let mut r = rng(41);
    let g = randn(&mut r, &[6, 10], DType::F64);
    // eps = 0: with the default 1e-7 the unscaled input's result moves by
    // ~1e-8 relative to the scaled one's (eps against ‖G‖ ≈ 8)
    let ns = NewtonSchulz::muon().with_eps(0.0);
    let want = msign(&g, &ns).unwrap();
    let huge = (&g * 1e160).unwrap();
    for (path, out) in [
        ("msign", msign(&huge, &ns).unwrap()),
        ("generic", msign_generic(&huge, &ns).unwrap()),
    ] {
        let d = max_abs_diff(&out, &want);
        assert!(d < 1e-12, "{path}: max |Δ| {d}");
    }
}

#[test]
fn half_precision_keeps_shape_and_dtype_and_is_accurate() {
    let mut r = rng(5);
    for dt in [DType::BF16, DType::F16] {
        let g = randn(&mut r, &[10, 6], dt);
        let out = msign(&g, &NewtonSchulz::muon()).unwrap();
        assert_eq!((out.dims(), out.dtype()), (g.dims(), dt));
        let err = rel_err(
            &to_dmatrix(&out),
            &expected(&to_dmatrix(&g), &NewtonSchulz::muon()),
        );
        assert!(err < 1e-2, "{dt:?}: relative error {err}");
    }
    // Forcing bf16 arithmetic on f32 input: output is f32, error at bf16 level.
    let g = randn(&mut r, &[10, 6], DType::F32);
    let ns = NewtonSchulz::muon().with_compute_dtype(DType::BF16);
    let out = msign(&g, &ns).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    let err = rel_err(
        &to_dmatrix(&out),
        &expected(&to_dmatrix(&g), &NewtonSchulz::muon()),
    );
    assert!(
        err > 1e-5 && err < 3e-2,
        "bf16 compute: relative error {err}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let v = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    let e = msign(&v, &NewtonSchulz::muon()).unwrap_err().to_string();
    assert!(e.contains("msign") && e.contains("[5]"), "{e}");
    let t4 = Tensor::zeros((2, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(msign(&t4, &NewtonSchulz::muon()).is_err());
    let ints = Tensor::zeros((2, 2), DType::U32, &Device::Cpu).unwrap();
    let e = msign(&ints, &NewtonSchulz::muon()).unwrap_err().to_string();
    assert!(e.contains("float"), "{e}");
    let e = NewtonSchulz::custom(vec![]).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = NewtonSchulz::custom(vec![[1.0, f64::NAN, 0.0]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("step 0"), "{e}");
    // The seam's public msign checks the shape too (its CPU path indexed
    // the second-to-last dimension of a vector and panicked).
    let scalar = Tensor::new(3f32, &Device::Cpu).unwrap();
    for t in [&v, &scalar, &t4] {
        let e = steepest::device::msign(t, &NewtonSchulz::muon()).unwrap_err();
        assert!(
            matches!(e, steepest::Error::Shape { .. }) && e.to_string().contains("msign"),
            "{:?}: {e}",
            t.dims()
        );
    }
}

/// `validate` refuses a negative `eps` (it would divide by a norm that can
/// reach zero) and an integer compute dtype, naming the caller and the
/// field; the defaults and a bf16 compute dtype pass.
#[test]
fn validate_refuses_a_negative_eps_and_an_integer_compute_dtype() {
    let ns = NewtonSchulz::muon();
    ns.validate("ns").unwrap();
    ns.clone()
        .with_compute_dtype(DType::BF16)
        .validate("ns")
        .unwrap();
    ns.clone().with_eps(0.0).validate("ns").unwrap();
    for (bad, field) in [
        (ns.clone().with_eps(-1e-7), "eps"),
        (ns.clone().with_compute_dtype(DType::U32), "compute dtype"),
        // floats candle cannot multiply matrices in: refused before a step,
        // not inside it after the momentum was written
        (
            ns.clone().with_compute_dtype(DType::F8E4M3),
            "compute dtype",
        ),
        (ns.clone().with_compute_dtype(DType::F4), "compute dtype"),
    ] {
        match bad.validate("MuonConfig.ns") {
            Err(steepest::Error::Config { who, what }) => {
                assert_eq!(who, "MuonConfig.ns");
                assert!(what.contains(field), "{what}");
            }
            r => panic!("{field}: {r:?}"),
        }
    }
}

#[test]
fn custom_table_is_used_as_given() {
    let mut r = rng(6);
    let ns = NewtonSchulz::custom(vec![[2.0, -1.5, 0.5], [1.5, -0.5, 0.0]]).unwrap();
    let g = randn(&mut r, &[5, 7], DType::F64);
    let err = rel_err(
        &to_dmatrix(&msign(&g, &ns).unwrap()),
        &expected(&to_dmatrix(&g), &ns),
    );
    assert!(err < 1e-12, "{err}");
}

#[test]
fn fused_cpu_path_matches_the_generic_path_on_random_shapes() {
    let mut r = rng(7);
    let shapes: [&[usize]; 10] = [
        &[1, 1],
        &[1, 17],
        &[17, 1],
        &[3, 5],
        &[5, 3],
        &[33, 20],
        &[20, 33],
        &[4, 9, 6],
        &[2, 6, 9],
        &[64, 64],
    ];
    for shape in shapes {
        for dt in [DType::F32, DType::F64] {
            let g = randn(&mut r, shape, dt);
            for ns in [
                NewtonSchulz::muon(),
                NewtonSchulz::polar_express(7),
                NewtonSchulz::cubic(4),
            ] {
                let fused = msign(&g, &ns).unwrap();
                let generic = msign_generic(&g, &ns).unwrap();
                assert_eq!(
                    (fused.dims(), fused.dtype()),
                    (generic.dims(), generic.dtype())
                );
                let scale = max_abs_diff(&generic, &generic.zeros_like().unwrap()).max(1e-30);
                let d = max_abs_diff(&fused, &generic) / scale;
                let tol = if dt == DType::F64 { 1e-12 } else { 1e-4 };
                assert!(d < tol, "{shape:?} {dt:?}: fused vs generic {d}");
            }
        }
    }
    // Non-contiguous input (a transposed view) goes through the same path.
    let g = randn(&mut r, &[6, 10], DType::F32);
    let gt = g.t().unwrap();
    let a = msign(&gt, &NewtonSchulz::muon()).unwrap();
    let b = msign_generic(&gt.contiguous().unwrap(), &NewtonSchulz::muon()).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5);
}

/// Restart lists for a schedule of `steps`: none, every two steps, every step.
fn restart_lists(steps: usize) -> [Vec<usize>; 3] {
    [
        vec![],
        (2..steps).step_by(2).collect(),
        (1..steps).collect(),
    ]
}

/// The Gram form maps singular values by the same polynomial as the
/// standard form: checked against the f64 SVD for every table and restart
/// list, on every shape (`min_aspect = 1`, so squares too).
#[test]
fn gram_form_applies_the_singular_value_polynomial_f64() {
    let mut r = rng(8);
    for (m, n) in SHAPES {
        let g = randn(&mut r, &[m, n], DType::F64);
        let gd = to_dmatrix(&g);
        for (name, base) in tables() {
            let want = expected(&gd, &base);
            for restarts in restart_lists(base.coefficients().len()) {
                let ns = base.clone().with_gram(GramNewtonSchulz {
                    min_aspect: 1.0,
                    restarts: restarts.clone(),
                });
                for (which, f) in IMPLS {
                    let err = rel_err(&to_dmatrix(&f(&g, &ns).unwrap()), &want);
                    assert!(
                        err < 1e-9,
                        "{which} {name} restarts {restarts:?} on {m}x{n}: relative error {err}"
                    );
                }
            }
        }
    }
}

/// In f32, `gram_form()` (aspect ≥ 2, restart every two steps) stays at
/// f32 rounding level against the f64 reference, on wide, tall and batched
/// inputs, including low-rank ones (gradients often are): within 8× of the
/// standard form's error or 2e-5, whichever is larger (measured: at most 7×,
/// on errors of ~1e-5; 0.8× on Polar Express's ~1e-4 for low rank).
#[test]
fn gram_form_f32_is_close_to_the_f64_reference() {
    let mut r = rng(9);
    for (m, n) in [
        (8usize, 40usize),
        (40, 8),
        (12, 30),
        (1, 9),
        (9, 1),
        (16, 33),
    ] {
        let k = m.min(n);
        let low_rank: Vec<f64> = (0..k)
            .map(|i| if i < k.div_ceil(3) { 1.0 } else { 0.0 })
            .collect();
        for (kind, g) in [
            ("gaussian", randn(&mut r, &[m, n], DType::F64)),
            (
                "low rank",
                from_dmatrix(&with_singular_values(&mut r, m, n, &low_rank), DType::F64),
            ),
        ] {
            let gd = to_dmatrix(&g);
            let g32 = g.to_dtype(DType::F32).unwrap();
            for (name, base) in tables() {
                let ns = base.clone().gram_form();
                assert!(
                    ns.gram_restarts(m, n).is_some(),
                    "{m}x{n} takes the Gram form"
                );
                let want = expected(&gd, &base);
                for (which, f) in IMPLS {
                    let gram = rel_err(&to_dmatrix(&f(&g32, &ns).unwrap()), &want);
                    let standard = rel_err(&to_dmatrix(&f(&g32, &base).unwrap()), &want);
                    assert!(
                        gram < 2e-4 && gram < (8.0 * standard).max(2e-5),
                        "{which} {name} {kind} {m}x{n}: Gram {gram:e}, standard {standard:e}"
                    );
                }
            }
        }
    }
    let g = randn(&mut r, &[3, 6, 20], DType::F32);
    let ns = NewtonSchulz::you().gram_form();
    let batched = msign(&g, &ns).unwrap();
    for i in 0..3 {
        let alone = msign_generic(&g.get(i).unwrap(), &ns).unwrap();
        let d = max_abs_diff(&batched.get(i).unwrap(), &alone);
        assert!(d < 1e-5, "batch item {i}: {d}");
    }
}

/// Why restarts: with bf16 or f16 operands on an ill-conditioned input
/// (singular values from 1 down to 1e-4) the Gram form without restarts
/// blows up, while a restart every two steps stays within 3× of the
/// standard form's error (measured here: 1.4–1.7× for bf16, 1.2–1.5× for
/// f16; without restarts 1e0–6e6 against the standard form's 1e-2–1.5e-1).
/// These are the generic path's figures (each product's result rounded to
/// the operand dtype too); with the kernels' rounding (operands only) the
/// standard form is ~10× more accurate and the bound does not hold
/// (docs/math.md §4, "Restarts").
#[test]
fn gram_form_restarts_keep_low_precision_stable() {
    let mut r = rng(10);
    for (m, n) in [(16, 64), (48, 12)] {
        let k = m.min(n);
        let s: Vec<f64> = (0..k)
            .map(|i| 10f64.powf(-4.0 * i as f64 / (k - 1) as f64))
            .collect();
        let gd = with_singular_values(&mut r, m, n, &s);
        let g = from_dmatrix(&gd, DType::F32);
        for (name, base) in [("muon", NewtonSchulz::muon()), ("you", NewtonSchulz::you())] {
            let want = expected(&gd, &base);
            for op in [DType::BF16, DType::F16] {
                let err = |ns: NewtonSchulz| {
                    let out = msign_generic(&g, &ns.with_compute_dtype(op)).unwrap();
                    let e = rel_err(&to_dmatrix(&out), &want);
                    if e.is_nan() {
                        f64::INFINITY
                    } else {
                        e
                    }
                };
                let standard = err(base.clone());
                let restarted = err(base.clone().gram_form());
                let never = err(base.clone().with_gram(GramNewtonSchulz {
                    min_aspect: 2.0,
                    restarts: vec![],
                }));
                assert!(
                    restarted < 3.0 * standard && never > 10.0 * standard,
                    "{name} {op:?} {m}x{n}: standard {standard:e}, restart every 2 {restarted:e}, never {never:e}"
                );
            }
        }
    }
}

#[test]
fn gram_settings_are_validated_and_saved() {
    let steps = NewtonSchulz::muon().coefficients().len();
    for (gram, needle) in [
        (
            GramNewtonSchulz {
                min_aspect: 0.5,
                restarts: vec![],
            },
            "min_aspect",
        ),
        (
            GramNewtonSchulz {
                min_aspect: f64::NAN,
                restarts: vec![],
            },
            "min_aspect",
        ),
        (
            GramNewtonSchulz {
                min_aspect: 2.0,
                restarts: vec![0],
            },
            "step 0",
        ),
        (
            GramNewtonSchulz {
                min_aspect: 2.0,
                restarts: vec![2, steps],
            },
            "step 5",
        ),
    ] {
        let ns = NewtonSchulz::muon().with_gram(gram);
        let e = ns.validate("muon").unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains("gram"), "{e}");
        let g = Tensor::ones((4, 12), DType::F32, &Device::Cpu).unwrap();
        let e = msign(&g, &ns).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    // Routing: the aspect threshold, on both orientations.
    let ns = NewtonSchulz::muon().gram_form();
    assert_eq!(ns.gram_restarts(10, 20), Some(&[2, 4][..]));
    assert_eq!(ns.gram_restarts(20, 10), Some(&[2, 4][..]));
    assert_eq!(ns.gram_restarts(10, 19), None);
    assert_eq!(NewtonSchulz::muon().gram_restarts(10, 40), None);
    assert_eq!(GramNewtonSchulz::restart_every(3, 8).restarts, vec![3, 6]);
    // Saved with the schedule; a schedule saved before the Gram form existed
    // (no `gram` key) still loads, as the standard form.
    let json = serde_json::to_string(&ns).unwrap();
    assert_eq!(serde_json::from_str::<NewtonSchulz>(&json).unwrap(), ns);
    let plain = serde_json::to_string(&NewtonSchulz::muon()).unwrap();
    assert!(!plain.contains("gram"), "{plain}");
    let loaded: NewtonSchulz = serde_json::from_str(&plain).unwrap();
    assert!(loaded.gram().is_none());
}

/// The singular-value ranges README's "Which Newton–Schulz" table states,
/// from the composed polynomials evaluated here (not by the crate) on a
/// log-spaced grid of `s = σ/(‖G‖_F·scale)`.
#[test]
fn readme_singular_value_ranges_hold() {
    let range = |ns: &NewtonSchulz, lo: f64| {
        let (mut a, mut b) = (f64::MAX, f64::MIN);
        for i in 0..=20_000 {
            let mut x = lo * (1.0 / lo).powf(i as f64 / 20_000.0) / ns.norm_scale();
            for &[p, q, r] in ns.coefficients() {
                x = p * x + q * x.powi(3) + r * x.powi(5);
            }
            (a, b) = (a.min(x), b.max(x));
        }
        (a, b)
    };
    let rows: [(NewtonSchulz, [f64; 4], f64); 5] = [
        (NewtonSchulz::muon(), [0.68, 1.13, 0.47, 1.20], 5e-3),
        (NewtonSchulz::you(), [0.98, 1.03, 0.47, 1.15], 5e-3),
        (
            NewtonSchulz::polar_express(5),
            [0.87, 1.12, 0.84, 1.12],
            5e-3,
        ),
        (NewtonSchulz::polar_express(8), [1.0; 4], 5e-5),
        (NewtonSchulz::cubic(30), [1.0; 4], 5e-5),
    ];
    for (ns, [a2, b2, a3, b3], tol) in rows {
        for ((lo, hi), (want_lo, want_hi)) in
            [(range(&ns, 1e-2), (a2, b2)), (range(&ns, 1e-3), (a3, b3))]
        {
            assert!(
                (lo - want_lo).abs() <= tol && (hi - want_hi).abs() <= tol,
                "{:?}: [{lo}, {hi}] vs README [{want_lo}, {want_hi}]",
                ns.coefficients()[0]
            );
        }
    }
}

/// Larger matrices (short side 128 to 192, where the CPU path threads its
/// products or, for a small batch, spreads the batch over the threads):
/// against the generic path in f64 and f32, both forms, and the f64 SVD.
#[test]
fn larger_matrices_match_the_generic_path_and_the_svd() {
    let mut r = rng(12);
    let forms = [NewtonSchulz::muon(), NewtonSchulz::you().gram_form()];
    // (192, 576): threaded products; (2, 130, 260): a batch; (300, 140): tall.
    let shapes: [&[usize]; 4] = [&[128, 200], &[192, 576], &[2, 130, 260], &[300, 140]];
    for shape in shapes {
        for dt in [DType::F64, DType::F32] {
            let g = randn(&mut r, shape, dt);
            for ns in &forms {
                let fused = msign(&g, ns).unwrap();
                let generic = msign_generic(&g, ns).unwrap();
                let scale = max_abs_diff(&generic, &generic.zeros_like().unwrap());
                let d = max_abs_diff(&fused, &generic) / scale;
                let tol = if dt == DType::F64 { 1e-12 } else { 1e-4 };
                assert!(
                    d < tol,
                    "{shape:?} {dt:?} gram {}: fused vs generic {d}",
                    ns.gram().is_some()
                );
            }
        }
    }
    let g = randn(&mut r, &[130, 300], DType::F64);
    let gd = to_dmatrix(&g);
    for ns in &forms {
        let err = rel_err(&to_dmatrix(&msign(&g, ns).unwrap()), &expected(&gd, ns));
        assert!(
            err < 1e-9,
            "gram {}: relative error {err}",
            ns.gram().is_some()
        );
    }
}

/// A matrix with a zero dimension (and a batch of them) has nothing to
/// orthogonalise: both implementations return an empty tensor of the same
/// shape and dtype (the CPU path used to panic on a zero chunk size).
#[test]
fn msign_of_an_empty_matrix_is_empty() {
    for dims in [vec![0usize, 5], vec![5, 0], vec![2, 0, 3], vec![2, 3, 0]] {
        for dt in [DType::F32, DType::BF16] {
            let g = Tensor::zeros(dims.as_slice(), dt, &Device::Cpu).unwrap();
            for (name, f) in IMPLS {
                for ns in [NewtonSchulz::muon(), NewtonSchulz::muon().gram_form()] {
                    let out = f(&g, &ns).unwrap_or_else(|e| panic!("{name} {dims:?}: {e}"));
                    assert_eq!(out.dims(), dims.as_slice(), "{name}");
                    assert_eq!(out.dtype(), dt, "{name}");
                }
            }
        }
    }
}

/// `msign` is scale-free: `msign(s·G) = msign(G)` (the input is normalised
/// by `‖G‖_F` first). In f32 that needs `‖G‖_F` computed without squaring
/// `G` itself, which overflows for entries ≳ 1e19 and underflows for ≲ 1e-19
/// (the result was 0 for a huge gradient on the generic path). Both paths,
/// batched and not, tall and wide, at scales 1e30 and 1e-30 (and 1e-34,
/// where `eps = 1e-7` dominates `‖G‖_F` and `msign` is ≈ 0 by design, so
/// only finiteness is asserted): equal to the unscaled result to 1e-5.
#[test]
fn msign_is_scale_free_in_f32_at_extreme_scales() {
    let mut r = rng(404);
    for shape in [&[5usize, 3][..], &[3, 5], &[2, 4, 6]] {
        let g = randn(&mut r, shape, DType::F32);
        for (name, f) in IMPLS {
            let ns = NewtonSchulz::muon();
            let want = f(&g, &ns).unwrap();
            for scale in [1e30, 1e-30] {
                let got = f(&(&g * scale).unwrap(), &ns.clone().with_eps(0.0)).unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-5, "{name} {shape:?} ×{scale:e}: max |Δ| = {d:e}");
            }
            let tiny = f(&(&g * 1e-34).unwrap(), &ns).unwrap();
            assert!(
                to_f64_vec(&tiny).iter().all(|x| x.is_finite()),
                "{name} {shape:?} ×1e-34"
            );
        }
    }
}

/// `NewtonSchulz::apply_scalar` is the map the schedule applies to each
/// singular value of the normalised input: `msign_generic` (f64, `eps = 0`)
/// of a matrix with singular values `sᵢ` has singular values
/// `apply_scalar(sᵢ/‖s‖₂)` (`‖G‖_F = ‖s‖₂`), by f64 SVD, to 1e-12, for a
/// quintic table with `c ≠ 0`; and one step of `[a, b, c]` maps `x` to
/// `a x + b x³ + c x⁵`.
#[test]
fn apply_scalar_is_the_singular_value_map_of_msign() {
    let table = vec![[3.0, -3.2, 1.2], [2.0, -1.5, 0.5]];
    let ns = NewtonSchulz::custom(table).unwrap().with_eps(0.0);
    let one = NewtonSchulz::custom(vec![[1.5, -0.7, 0.3]]).unwrap();
    for x in [0.1f64, 0.5, 0.9] {
        let want = 1.5 * x - 0.7 * x.powi(3) + 0.3 * x.powi(5);
        assert!((one.apply_scalar(x) - want).abs() < 1e-15, "x = {x}");
    }
    let s = [1.0, 0.7, 0.4, 0.2];
    let mut r = rng(47);
    let g = with_singular_values(&mut r, 6, 4, &s);
    let out = msign_generic(&from_dmatrix(&g, DType::F64), &ns).unwrap();
    let mut got = singular_values(&to_dmatrix(&out));
    got.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let fro = s.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut want: Vec<f64> = s.iter().map(|x| ns.apply_scalar(x / fro).abs()).collect();
    want.sort_by(|a, b| b.partial_cmp(a).unwrap());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "σ {a} vs apply_scalar {b}");
    }
}

/// An f64 matrix with entries near 1e-170 (squares below f64's range) and
/// eps = 0 has the msign of the same matrix at scale 1 (msign does not
/// depend on the scale); the CPU path returned zeros (its norm underflowed
/// to 0), the generic path the right answer.
#[test]
fn msign_of_a_tiny_f64_matrix_with_eps_zero_is_scale_free() {
    let mut r = rng(41);
    let g = randn(&mut r, &[5, 3], DType::F64);
    let ns = NewtonSchulz::polar_express(8).with_eps(0.0);
    let want = msign(&g, &ns).unwrap();
    for scale in [1e-170, 1e-200] {
        let got = msign(&(&g * scale).unwrap(), &ns).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-12, "{scale:e}: {d:e}");
    }
}

/// `msign` validates its schedule on every path, `device::msign` (public,
/// called by the optimizers' transforms) too: there a NaN eps zeroed the
/// CPU path's output and filled the generic path's with NaN; now it is a
/// Config error naming `eps`.
#[test]
fn msign_refuses_an_invalid_schedule() {
    let g = randn(&mut rng(3), &[4, 3], DType::F32);
    let ns = NewtonSchulz::muon().with_eps(f64::NAN);
    for r in [
        msign(&g, &ns),
        steepest::device::msign(&g, &ns),
        steepest::device::with_generic_ops(|| steepest::device::msign(&g, &ns)),
    ] {
        match r {
            Err(steepest::Error::Config { what, .. }) => assert!(what.contains("eps"), "{what}"),
            other => panic!("{other:?}"),
        }
    }
}

/// A NaN or ±Inf in a matrix makes its whole output NaN on every path (the
/// documented contract: loud, not a finite wrong answer), and only its own
/// in a batch.
#[test]
fn non_finite_input_gives_an_all_nan_output() {
    let mut r = rng(77);
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for (m, n) in [(6, 4), (4, 6), (5, 5)] {
            let mut v = normal_vec(&mut r, 2 * m * n);
            v[3] = bad;
            let g = Tensor::from_vec(v, (2, m, n), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let ns = NewtonSchulz::muon();
            for (path, out) in [
                ("fused", msign(&g, &ns).unwrap()),
                ("generic", msign_generic(&g, &ns).unwrap()),
                (
                    "emulated kernels",
                    steepest::device::emu::msign(&g, &ns, None).unwrap(),
                ),
            ] {
                let first = to_f64_vec(&out.get(0).unwrap());
                let second = to_f64_vec(&out.get(1).unwrap());
                assert!(
                    first.iter().all(|x| x.is_nan()),
                    "{bad} {m}×{n} {path}: {first:?}"
                );
                assert!(
                    second.iter().all(|x| x.is_finite()),
                    "{bad} {m}×{n} {path}: the other matrix"
                );
            }
        }
    }
}
