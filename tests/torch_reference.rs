//! AdamW, SGD and Muon trajectories against PyTorch (fixtures made by
//! `scripts/torch_reference.py` with torch.optim.{AdamW, SGD, Muon}).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use serde_json::Value;
use steepest::optim::{AdamW, AdamWConfig, LrAdjust, Muon, MuonConfig, NamedVar, Sgd, SgdConfig};
use steepest::{NewtonSchulz, WeightDecay};

struct Fixture(Value);

impl Fixture {
    fn load() -> Self {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/torch_reference.json"
        ))
        .unwrap();
        Fixture(serde_json::from_str(&text).unwrap())
    }

    fn shape(&self, name: &str) -> Vec<usize> {
        self.0["shapes"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect()
    }

    fn tensor(&self, v: &Value, name: &str) -> Tensor {
        let data: Vec<f32> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        Tensor::from_vec(data, self.shape(name), &Device::Cpu).unwrap()
    }

    fn case_params(&self, case: &str) -> Vec<String> {
        self.0["cases"][case]["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }

    /// Runs `opt` over the fixture's gradients; returns the max abs error vs torch
    /// relative to the largest parameter entry, over all steps.
    fn replay<O: Optimizer>(&self, case: &str, make: impl FnOnce(Vec<NamedVar>) -> O) -> f64 {
        let names = self.case_params(case);
        let vars: Vec<NamedVar> = names
            .iter()
            .map(|n| NamedVar {
                name: n.clone(),
                var: Var::from_tensor(&self.tensor(&self.0["init"][n], n)).unwrap(),
            })
            .collect();
        let mut opt = make(vars.clone());
        let steps = self.0["steps"].as_u64().unwrap() as usize;
        let mut worst: f64 = 0.0;
        for t in 0..steps {
            // d/dw Σ w⊙g = g exactly: feeds torch's gradients through candle's backprop.
            let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
            for nv in &vars {
                let g = self.tensor(&self.0["grads"][t][&nv.name], &nv.name);
                loss = (loss + (nv.var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
            }
            opt.backward_step(&loss).unwrap();
            for nv in &vars {
                let want = self.tensor(&self.0["cases"][case]["trajectory"][t][&nv.name], &nv.name);
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64;
                // element by element in f64: candle's max_all (f32::max)
                // and f64::max drop a NaN, which would pass as agreement
                let got: Vec<f32> = nv.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let exp: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got.len(), exp.len(), "{case}: {}", nv.name);
                let err = got
                    .iter()
                    .zip(&exp)
                    .map(|(a, b)| {
                        let d = (*a as f64 - *b as f64).abs();
                        if d.is_finite() {
                            d
                        } else {
                            f64::INFINITY
                        }
                    })
                    .fold(0.0, f64::max);
                worst = worst.max(err / scale);
            }
        }
        eprintln!("{case}: worst relative error {worst:.3e}");
        worst
    }
}

#[test]
fn adamw_matches_torch() {
    let f = Fixture::load();
    let cfg = AdamWConfig {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: WeightDecay::Decoupled(0.1),
        decay_vectors: true, // torch decays every parameter
    };
    let err = f.replay("adamw", |v| AdamW::from_named(v, cfg).unwrap());
    assert!(err < 1e-6, "relative error vs torch.optim.AdamW: {err}");
}

#[test]
fn sgd_nesterov_matches_torch() {
    let f = Fixture::load();
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        nesterov: true,
        ..SgdConfig::default()
    };
    let err = f.replay("sgd_nesterov", |v| Sgd::from_named(v, cfg).unwrap());
    assert!(err < 1e-6, "relative error vs torch.optim.SGD: {err}");
}

#[test]
fn sgd_decoupled_decay_without_momentum_matches_torch_l2() {
    let f = Fixture::load();
    let cfg = SgdConfig {
        lr: 0.05,
        weight_decay: WeightDecay::Decoupled(0.1),
        decay_vectors: true,
        ..SgdConfig::default()
    };
    let err = f.replay("sgd_l2", |v| Sgd::from_named(v, cfg).unwrap());
    assert!(
        err < 1e-6,
        "relative error vs torch.optim.SGD(weight_decay): {err}"
    );
}

fn muon_cfg() -> MuonConfig {
    MuonConfig {
        lr: 0.02,
        weight_decay: WeightDecay::Decoupled(0.1),
        ..MuonConfig::default()
    }
}

#[test]
fn muon_matches_torch_with_f32_newton_schulz() {
    let f = Fixture::load();
    let err = f.replay("muon_f32", |v| Muon::from_named(v, muon_cfg()).unwrap());
    assert!(
        err < 5e-6,
        "relative error vs torch.optim.Muon (f32 NS): {err}"
    );
}

#[test]
fn muon_without_nesterov_match_rms_matches_torch() {
    let f = Fixture::load();
    let cfg = MuonConfig {
        momentum: 0.9,
        nesterov: false,
        lr_adjust: LrAdjust::MatchAdamWRms(0.2),
        weight_decay: WeightDecay::None,
        ..muon_cfg()
    };
    let err = f.replay("muon_f32_plain_rms", |v| Muon::from_named(v, cfg).unwrap());
    assert!(
        err < 5e-6,
        "relative error vs torch.optim.Muon (match_rms_adamw): {err}"
    );
}

#[test]
fn muon_bf16_newton_schulz_tracks_torch_bf16() {
    let f = Fixture::load();
    let cfg = MuonConfig {
        newton_schulz: NewtonSchulz::muon().with_compute_dtype(DType::BF16),
        ..muon_cfg()
    };
    let err = f.replay("muon_bf16", |v| Muon::from_named(v, cfg).unwrap());
    // bf16 operands (8-bit mantissa): a different summation order moves each
    // orthogonalised entry by ~1e-2 of its size, times lr = 0.02 per step.
    assert!(
        err < 3e-3,
        "relative error vs torch.optim.Muon (bf16 NS): {err}"
    );
    // ...and it is not trivially small: the f32 variant must differ from torch's bf16 run.
    let f32_err = f.replay("muon_bf16", |v| Muon::from_named(v, muon_cfg()).unwrap());
    assert!(
        f32_err > 1e-6,
        "f32 NS should not reproduce the bf16 trajectory exactly ({f32_err})"
    );
}

/// The PyTorch side of the GPU benchmark (`bench/torch_reference.py`'s
/// `ns_batched` and `ns_gram_batched`, run in f64 by
/// `scripts/torch_bench_ns_fixture.py`) computes the same function as
/// `msign` under `NewtonSchulz::muon()` and its `gram_form()`: the
/// benchmark compares two implementations of one computation. In f64 the
/// two agree to rounding (≤ 1e-12 of the largest entry), on wide, tall,
/// square and aspect-3/4/1.5 batches (1.5: both fall back to the standard
/// form).
#[test]
fn gpu_bench_newton_schulz_is_msign() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torch_bench_ns.json"
    ))
    .unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let f64s = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let x = Tensor::from_vec(f64s(&case["input"]), shape.as_slice(), &Device::Cpu).unwrap();
        for (form, ns) in [
            ("standard", NewtonSchulz::muon()),
            ("gram", NewtonSchulz::muon().gram_form()),
        ] {
            let want = f64s(&case[form]);
            let got: Vec<f64> = steepest::linalg::msign(&x, &ns)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
            let err = want
                .iter()
                .zip(&got)
                .fold(0f64, |a, (w, g)| a.max((w - g).abs()));
            assert!(
                err <= 1e-12 * scale,
                "{shape:?} {form}: {err:e} (scale {scale})"
            );
        }
    }
}
