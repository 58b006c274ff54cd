//! README snippets, run as written: the training loop of "Use it in a
//! candle training loop" (Muon with spectral decay, the head and biases on
//! AdamW, a checkpoint saved) fits a teacher network; the Stiefel recipe of
//! "Steepest descent under norms and on manifolds" (matrices on the
//! manifold, vectors on AdamW, one `Partition`) trains an MLP built with
//! `candle_nn::linear` and keeps every matrix on its manifold (checked in f64
//! with nalgebra); and "Compose your own optimizer" keeps the matrices on the
//! spectral sphere. The README holds each snippet verbatim.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, Optimizer, VarBuilder, VarMap};
use common::*;
use nalgebra::DMatrix;
use steepest::{Error, Manifold, Steepest, SteepestConfig};

/// The README's training-loop snippet, verbatim between the markers (less
/// the indentation; see `readme_holds_the_tested_snippets`).
mod training_loop {
    // README: begin training_loop
    use candle_core::{DType, Device, Module, Tensor};
    use candle_nn::{linear, loss, seq, Activation, Optimizer, VarBuilder, VarMap};
    use steepest::{AdamWConfig, Muon, MuonConfig, OptimizerState, WeightDecay};

    /// Fits a 16 → 64 → 4 MLP to `batches` of (input, target); returns the
    /// last batch's loss.
    pub fn train(
        batches: &[(Tensor, Tensor)],
        checkpoint: &std::path::Path,
    ) -> steepest::Result<f32> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = seq() // your candle-nn model, built with vb
            .add(linear(16, 64, vb.pp("fc1"))?)
            .add(Activation::Gelu)
            .add(linear(64, 4, vb.pp("head"))?);

        let mut opt = Muon::from_varmap(
            &varmap,
            MuonConfig {
                lr: 0.02,
                weight_decay: WeightDecay::spectral(0.1), // decay only σ₁ of each matrix
                adamw_names: vec!["head".into()],         // to AdamW, with the biases
                adamw: AdamWConfig {
                    lr: 3e-3, // AdamW's own rate (default 1e-3, whatever lr is)
                    ..AdamWConfig::default()
                },
                ..MuonConfig::default()
            },
        )?;

        let mut last = f32::NAN;
        for (x, y) in batches {
            let loss = loss::mse(&model.forward(x)?, y)?;
            opt.backward_step(&loss)?;
            last = loss.to_scalar()?;
        }
        opt.save_state(checkpoint)?; // opt.load_state(checkpoint) resumes
        Ok(last)
    }
    // README: end training_loop
}

/// The README's training loop, as written, on 200 steps of a fixed batch
/// from a random `16 → 32 → 4` tanh teacher (candle's initialisation of the
/// student is not seeded, so the bound leaves room): the loss ends below a
/// tenth of the targets' mean square, and the checkpoint it saves holds
/// Muon's momentum for `fc1.weight` and AdamW's moments for `head.weight`,
/// `head.bias` and `fc1.bias` (the routing the snippet's comments state),
/// with the rates it set.
#[test]
fn readme_training_loop_fits_and_saves() -> steepest::Result<()> {
    let mut r = rng(11);
    let x = randn(&mut r, &[256, 16], DType::F32);
    let a = (randn(&mut r, &[16, 32], DType::F32) * 0.25)?;
    let b = (randn(&mut r, &[32, 4], DType::F32) * (1.0 / 32f64.sqrt()))?;
    let y = x.matmul(&a)?.tanh()?.matmul(&b)?;
    let scale = y.sqr()?.mean_all()?.to_scalar::<f32>()?;
    let batches = vec![(x, y); 200];
    let dir = scratch_dir("readme_snippets", "training_loop");
    let checkpoint = dir.join("optimizer.safetensors");
    let last = training_loop::train(&batches, &checkpoint)?;
    eprintln!("loss {last}, targets' mean square {scale}");
    assert!(
        last < 0.03 * scale,
        "loss {last} vs targets' mean square {scale}"
    );
    let state = steepest::checkpoint::load(&checkpoint)?;
    let fields = |param: &str| -> Vec<&str> {
        let mut f: Vec<&str> = state
            .keys()
            .filter_map(|k| k.strip_prefix(param)?.strip_prefix('.'))
            .collect();
        f.sort();
        f
    };
    // Muon's chain (spectral decay's v₁, momentum) for the hidden matrix;
    // AdamW's moments for the head and the biases.
    assert_eq!(fields("fc1.weight"), ["decay.v", "momentum.buf"]);
    for param in ["head.weight", "head.bias", "fc1.bias"] {
        assert_eq!(
            fields(param),
            ["adam.exp_avg", "adam.exp_avg_sq", "adam.step"],
            "{param}"
        );
    }
    let config = &common::header(&state)["body"]["config"];
    assert_eq!(config["lr"], 0.02);
    assert_eq!(config["adamw"]["lr"], 3e-3);
    assert_eq!(config["weight_decay"]["Spectral"]["lambda"], 0.1);
    Ok(())
}

/// `4 → 16 → 16 → 2` with ReLU: weights 16×4 (tall), 16×16 (square), 2×16
/// (wide), and a bias in every layer.
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    head: Linear,
}

impl Mlp {
    fn new(varmap: &VarMap) -> Mlp {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        Mlp {
            fc1: linear(4, 16, vb.pp("fc1")).unwrap(),
            fc2: linear(16, 16, vb.pp("fc2")).unwrap(),
            head: linear(16, 2, vb.pp("head")).unwrap(),
        }
    }

    /// Replaces candle's (unseeded) initialisation by seeded Gaussians of
    /// standard deviation `1/√fan_in` (0.1 for the biases).
    fn seed(varmap: &VarMap, seed: u64) {
        let mut r = rng(seed);
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let scale = match var.dims() {
                [_, fan_in] => 1.0 / (*fan_in as f64).sqrt(),
                _ => 0.1,
            };
            let t = (randn(&mut r, var.dims(), DType::F32) * scale).unwrap();
            var.set(&t).unwrap();
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.fc1.forward(x).unwrap().relu().unwrap();
        let h = self.fc2.forward(&h).unwrap().relu().unwrap();
        self.head.forward(&h).unwrap()
    }
}

/// A regression target: a fixed random `4 → 8 → 2` tanh network on 64
/// Gaussian inputs.
fn data() -> (Tensor, Tensor) {
    let mut r = rng(7);
    let x = randn(&mut r, &[64, 4], DType::F32);
    let a = randn(&mut r, &[4, 8], DType::F32);
    let b = randn(&mut r, &[8, 2], DType::F32);
    let y = x.matmul(&a).unwrap().tanh().unwrap().matmul(&b).unwrap();
    (x, y)
}

fn mse(pred: &Tensor, y: &Tensor) -> Tensor {
    (pred - y).unwrap().sqr().unwrap().mean_all().unwrap()
}

/// `max |WᵀW − I|` (tall or square) or `max |WWᵀ − I|` (wide), in f64.
fn stiefel_error(w: &Tensor) -> f64 {
    let w = to_dmatrix(w);
    let (r, c) = w.shape();
    let g = if r >= c {
        w.transpose() * &w
    } else {
        &w * w.transpose()
    };
    (g - DMatrix::<f64>::identity(r.min(c), r.min(c))).amax_nan()
}

fn weights(model: &Mlp) -> [(&'static str, Tensor); 3] {
    [
        ("fc1.weight", model.fc1.weight().clone()),
        ("fc2.weight", model.fc2.weight().clone()),
        ("head.weight", model.head.weight().clone()),
    ]
}

/// The README's Stiefel recipe on an MLP with biases, as written (between
/// the markers; the README holds these lines verbatim, see
/// `readme_holds_the_stiefel_snippet`): construction succeeds, tall/square
/// weights go to `stiefel`, the wide head to `stiefel_t`, the biases to
/// `adamw`; after every step each weight is on its Stiefel manifold within
/// 1e-4 (f64 Gram matrix), the biases move, and the loss falls to less than
/// half its initial value.
#[test]
fn readme_stiefel_recipe_trains_an_mlp_with_biases() -> steepest::Result<()> {
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap);
    Mlp::seed(&varmap, 3);
    // README: begin stiefel
    use steepest::optim::Partition;
    use steepest::{AdamWConfig, DualAscent, Manifold, SteepestConfig};

    // Muon on the Stiefel manifold for the weight matrices: WᵀW = I for tall
    // (and square) ones, WWᵀ = I (`transpose: true`) for wide ones. A matrix
    // manifold takes no vectors: biases and norm gains go to AdamW.
    let stiefel = SteepestConfig {
        lr: 0.02,
        manifold: Manifold::Stiefel { transpose: false },
        dual: DualAscent::default(), // one dual step per step (amortised)
        ..SteepestConfig::default()  // Norm::Spectral (Muon's msign)
    };
    stiefel.validate()?; // `chain()` does not validate; `Steepest::from_varmap` does
    let stiefel_t = SteepestConfig {
        manifold: Manifold::Stiefel { transpose: true },
        ..stiefel.clone()
    };
    let adamw = AdamWConfig::default();
    // One Driver (candle_nn::Optimizer + OptimizerState): one atomic step,
    // one checkpoint for all three groups.
    let mut opt = Partition::by(|p| match p.matrix() {
        _ if p.name.starts_with("embed") => "adamw", // embeddings: by name
        Some((rows, cols)) if rows >= cols => "stiefel",
        Some(_) => "stiefel_t",
        None => "adamw", // biases, norm gains
    })
    .group("stiefel", stiefel.chain(), stiefel.lr)
    .group("stiefel_t", stiefel_t.chain(), stiefel_t.lr)
    .group("adamw", adamw.chain(), adamw.lr)
    .build_from_varmap(&varmap)?;
    // README: end stiefel

    for (name, label) in [
        ("fc1.weight", "stiefel"),
        ("fc2.weight", "stiefel"),
        ("head.weight", "stiefel_t"),
        ("fc1.bias", "adamw"),
        ("fc2.bias", "adamw"),
        ("head.bias", "adamw"),
    ] {
        assert_eq!(opt.label_of(name), Some(label), "{name}");
    }
    // Candle's default init is not on the manifold; the first step retracts.
    for (name, w) in weights(&model) {
        assert!(stiefel_error(&w) > 1e-2, "{name} starts off the manifold");
    }
    let bias0 = to_f64_vec(model.fc1.bias().unwrap());
    let (x, y) = data();
    let loss0 = mse(&model.forward(&x), &y).to_scalar::<f32>()?;
    let mut last = loss0;
    for step in 0..100 {
        let loss = mse(&model.forward(&x), &y);
        last = loss.to_scalar::<f32>()?;
        opt.backward_step(&loss)?;
        for (name, w) in weights(&model) {
            let e = stiefel_error(&w);
            assert!(e <= 1e-4, "step {step}: {name} off its manifold by {e}");
        }
    }
    eprintln!("loss {loss0} -> {last}");
    assert!(
        last.is_finite() && last < 0.5 * loss0,
        "loss {loss0} → {last}"
    );
    assert_ne!(
        to_f64_vec(model.fc1.bias().unwrap()),
        bias0,
        "AdamW moved the biases"
    );
    Ok(())
}

/// Why the recipe: `Steepest` alone on the same model refuses a bias at
/// construction (a matrix manifold, or the default spectral norm, takes no
/// vectors), naming it.
#[test]
fn steepest_alone_refuses_the_biases() {
    let varmap = VarMap::new();
    let _model = Mlp::new(&varmap);
    for config in [
        SteepestConfig {
            manifold: Manifold::Stiefel { transpose: false },
            ..SteepestConfig::default()
        },
        SteepestConfig::default(),
    ] {
        let e = Steepest::from_varmap(&varmap, config).unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e}");
        assert!(e.who().is_some_and(|w| w.ends_with(".bias")), "{e}");
    }
}

/// The lines between `// README: begin {name}` and `// README: end {name}`
/// in this file, less the indentation.
fn snippet(name: &str) -> String {
    let source = include_str!("readme_snippets.rs");
    let begin = source.find(&format!("// README: begin {name}\n")).unwrap();
    let end = source
        .find(&format!("    // README: end {name}\n"))
        .unwrap();
    let body = &source[begin..end];
    let body = &body[body.find('\n').unwrap() + 1..];
    body.lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The README contains the snippets run above verbatim (less the
/// indentation), so the snippets users copy are the ones tested.
#[test]
fn readme_holds_the_tested_snippets() {
    let readme = include_str!("../README.md");
    for (name, min_lines) in [("training_loop", 25), ("stiefel", 20), ("compose", 10)] {
        let snippet = snippet(name);
        assert!(snippet.lines().count() > min_lines, "{snippet}");
        assert!(
            readme.contains(&format!("```rust\n{snippet}```")),
            "README.md's {name} snippet differs from tests/readme_snippets.rs:\n{snippet}"
        );
    }
}

/// The README's "compose your own" snippet (Adam's preconditioning, then
/// back onto the spectral sphere `‖W‖₂ = 2`; AdamW for the rest), as
/// written: every weight matrix has σ₁ = 2 after each step (f64 SVD), the
/// biases move, the loss falls.
#[test]
fn readme_compose_snippet_keeps_the_matrices_on_the_spectral_sphere() -> steepest::Result<()> {
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap);
    Mlp::seed(&varmap, 5);
    // README: begin compose
    use steepest::optim::transform::{Adam, Decay, Retract};
    use steepest::optim::{Chain, Manifold, Partition};
    use steepest::{AdamWConfig, WeightDecay};

    let sphere = Chain::new()
        .then(Decay::new(WeightDecay::None, false)?)
        .then(Adam::default())
        .then(Retract::new(Manifold::SpectralSphere { radius: 2.0 })?);
    let adamw = AdamWConfig::default().chain();
    // a Driver: candle_nn::Optimizer + OptimizerState
    let mut opt = Partition::by(|p| if p.is_matrix() { "sphere" } else { "adamw" })
        .group("sphere", sphere, 1e-3)
        .group("adamw", adamw, 1e-3)
        .build_from_varmap(&varmap)?;
    // README: end compose

    let bias0 = to_f64_vec(model.fc1.bias().unwrap());
    let (x, y) = data();
    let loss0 = mse(&model.forward(&x), &y).to_scalar::<f32>()?;
    let mut last = loss0;
    for step in 0..50 {
        let loss = mse(&model.forward(&x), &y);
        last = loss.to_scalar::<f32>()?;
        opt.backward_step(&loss)?;
        for (name, w) in weights(&model) {
            let s1 = singular_values(&to_dmatrix(&w))[0];
            assert!(
                (s1 - 2.0).abs() <= 1e-4,
                "step {step}: {name} has σ₁ = {s1}"
            );
        }
    }
    assert!(last.is_finite() && last < loss0, "loss {loss0} → {last}");
    assert_ne!(
        to_f64_vec(model.fc1.bias().unwrap()),
        bias0,
        "AdamW moved the biases"
    );
    Ok(())
}

/// `SteepestConfig::chain` does not validate, but a chain whose manifold step
/// has a norm that does not fit the manifold is refused when the `Partition`
/// is built (naming the field), not at the first step.
#[test]
fn unvalidated_manifold_chain_is_refused_at_construction() {
    use steepest::optim::Partition;
    use steepest::{AdamWConfig, Norm};
    let varmap = VarMap::new();
    let _model = Mlp::new(&varmap);
    let config = SteepestConfig {
        norm: Norm::Euclidean,
        manifold: Manifold::Stiefel { transpose: false },
        ..SteepestConfig::default()
    };
    assert!(config.validate().is_err());
    let e = Partition::by(|p| if p.is_matrix() { "m" } else { "v" })
        .group("m", config.chain(), 0.02)
        .group("v", AdamWConfig::default().chain(), 1e-3)
        .build_from_varmap(&varmap)
        .unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    assert!(
        e.to_string().contains("ManifoldStep.manifold") && e.to_string().contains("Norm::Spectral"),
        "{e}"
    );
}
