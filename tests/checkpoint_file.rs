//! Checkpoint files: bit-identical resume for every alias, a partition and
//! a plain driver; corrupted, truncated, old-format, foreign, other-kind and
//! future-version files refused with a clear error and no change; and a
//! fallible chain that fails mid-step restores every group.

mod common;
mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarMap};
use steepest::optim::transform::{
    Adam, Decay, GroupStep, Momentum, Orthogonalize, Retract, Stage, Transform, TransformState,
};
use steepest::optim::{
    AdamW, AdamWConfig, Chain, Driver, Manifold, Muon, MuonConfig, OptimizerState, ParamInfo,
    Partition, Sgd, SgdConfig, Steepest, SteepestConfig,
};
use steepest::{Error, NewtonSchulz, WeightDecay};
use support::*;

type Shapes = [(&'static str, &'static [usize])];

const MIXED: &Shapes = &[
    ("a.weight", &[6, 4]),
    ("b.weight", &[6, 4]),
    ("wide.weight", &[3, 5]),
    ("conv.weight", &[4, 2, 2, 2]),
    ("embed.weight", &[9, 4]),
    ("a.bias", &[6]),
    ("gain", &[]),
];

const TALL: &Shapes = &[
    ("a.weight", &[6, 4]),
    ("b.weight", &[6, 4]),
    ("c.weight", &[8, 3]),
    ("conv.weight", &[8, 1, 2, 2]),
];

fn adamw(vm: &VarMap) -> AdamW {
    AdamW::from_varmap(
        vm,
        AdamWConfig {
            lr: 0.01,
            weight_decay: WeightDecay::spectral(0.1),
            decay_vectors: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn sgd(vm: &VarMap) -> Sgd {
    Sgd::from_varmap(
        vm,
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: WeightDecay::spectral(0.1),
            decay_vectors: true,
        },
    )
    .unwrap()
}

fn muon(vm: &VarMap) -> Muon {
    Muon::from_varmap(
        vm,
        MuonConfig {
            lr: 0.02,
            weight_decay: WeightDecay::spectral(0.1),
            adamw: AdamWConfig {
                lr: 0.004,
                ..Default::default()
            },
            adamw_names: vec!["embed".into()],
            ..Default::default()
        },
    )
    .unwrap()
}

fn steepest_free(vm: &VarMap) -> Steepest {
    Steepest::from_varmap(
        vm,
        SteepestConfig {
            lr: 0.02,
            weight_decay: WeightDecay::spectral(0.1),
            ..Default::default()
        },
    )
    .unwrap()
}

fn steepest_sphere(vm: &VarMap) -> Steepest {
    Steepest::from_varmap(
        vm,
        SteepestConfig {
            lr: 0.05,
            manifold: Manifold::SpectralSphere { radius: 1.5 },
            ..Default::default()
        },
    )
    .unwrap()
}

fn steepest_stiefel(vm: &VarMap) -> Steepest {
    Steepest::from_varmap(
        vm,
        SteepestConfig {
            lr: 0.05,
            manifold: Manifold::Stiefel { transpose: false },
            ..Default::default()
        },
    )
    .unwrap()
}

fn muon_chain() -> Chain {
    Chain::new()
        .then(Decay::new(WeightDecay::spectral(0.1), false).unwrap())
        .then(Momentum::ema(0.9, true).unwrap())
        .then(Orthogonalize {
            ns: NewtonSchulz::muon(),
        })
}

fn adamw_chain() -> Chain {
    Chain::new()
        .then(Decay::new(WeightDecay::Decoupled(0.1), true).unwrap())
        .then(Adam::default())
}

/// Three groups, one of them fallible (Adam then a spectral-sphere
/// retraction).
fn partition(vm: &VarMap) -> Driver {
    Partition::by(|p: &ParamInfo| {
        if p.name.starts_with("embed") {
            "sphere"
        } else if p.is_matrix() {
            "muon"
        } else {
            "adamw"
        }
    })
    .group("muon", muon_chain(), 0.02)
    .group("adamw", adamw_chain(), 0.005)
    .group(
        "sphere",
        Chain::new()
            .then(Adam::default())
            .then(Retract::new(Manifold::SpectralSphere { radius: 2.0 }).unwrap()),
        0.01,
    )
    .build_from_varmap(vm)
    .unwrap()
}

fn driver(vm: &VarMap) -> Driver {
    Driver::from_varmap(
        vm,
        Chain::new()
            .then(Decay::new(WeightDecay::Decoupled(0.1), true).unwrap())
            .then(Momentum::classic(0.9, false).unwrap()),
        0.05,
    )
    .unwrap()
}

/// 6 uninterrupted steps against 3 steps, parameters and optimizer state
/// saved to files, everything rebuilt from the files, 3 more steps: the
/// same bits, parameters and state.
fn resume<O: Optimizer + OptimizerState>(
    what: &str,
    shapes: &Shapes,
    dtype: DType,
    make: fn(&VarMap) -> O,
) {
    let vm = model_of(shapes, dtype, 21);
    let mut opt = make(&vm);
    for t in 0..6 {
        opt.backward_step(&loss_of(&vm, shapes, t)).unwrap();
    }
    let straight = (snapshot(&vm), state_tensors(&opt.state_dict().unwrap()));

    let dir = temp_dir("resume");
    let vm = model_of(shapes, dtype, 21);
    let mut opt = make(&vm);
    for t in 0..3 {
        opt.backward_step(&loss_of(&vm, shapes, t)).unwrap();
    }
    vm.save(dir.join("params.safetensors")).unwrap();
    opt.save_state(dir.join("opt.safetensors")).unwrap();
    drop((opt, vm));

    let mut vm = model_of(shapes, dtype, 21);
    vm.load(dir.join("params.safetensors")).unwrap();
    let mut opt = make(&vm);
    opt.load_state(dir.join("opt.safetensors")).unwrap();
    for t in 3..6 {
        opt.backward_step(&loss_of(&vm, shapes, t)).unwrap();
    }
    let resumed = (snapshot(&vm), state_tensors(&opt.state_dict().unwrap()));
    assert!(
        resumed == straight,
        "{what} {dtype:?}: the resumed run differs"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_alias_a_partition_and_a_driver_resume_bit_identically() {
    for dtype in [DType::F32, DType::BF16] {
        resume("AdamW", MIXED, dtype, adamw);
        resume("Sgd", MIXED, dtype, sgd);
        resume("Muon", MIXED, dtype, muon);
        resume("Steepest free", TALL, dtype, steepest_free);
        resume("Steepest spectral sphere", TALL, dtype, steepest_sphere);
        resume("Steepest Stiefel", TALL, dtype, steepest_stiefel);
        resume("Partition", MIXED, dtype, partition);
        resume("Driver", MIXED, dtype, driver);
    }
}

/// An optimizer, its model and a checkpoint file of it after 2 steps; the
/// optimizer has then taken a third step (so the file is not its state).
struct Saved {
    vm: VarMap,
    opt: AdamW,
    dir: std::path::PathBuf,
    bytes: Vec<u8>,
}

fn saved() -> Saved {
    let vm = model_of(MIXED, DType::F32, 21);
    let mut opt = adamw(&vm);
    for t in 0..2 {
        opt.backward_step(&loss_of(&vm, MIXED, t)).unwrap();
    }
    let dir = temp_dir("ckpt");
    opt.save_state(dir.join("good.safetensors")).unwrap();
    let bytes = std::fs::read(dir.join("good.safetensors")).unwrap();
    opt.backward_step(&loss_of(&vm, MIXED, 2)).unwrap();
    opt.set_learning_rate(0.007);
    Saved {
        vm,
        opt,
        dir,
        bytes,
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// Loads `bytes` (written to a file) into `opt`: must be refused with an
/// `Error::Checkpoint` that passes `check`, and change no state, no rate
/// and no parameter. Returns the error's text.
fn refused<O: Optimizer + OptimizerState>(
    opt: &mut O,
    vm: &VarMap,
    dir: &Path,
    bytes: &[u8],
    check: impl Fn(&str, &str),
) -> String {
    let path = dir.join("bad.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let state = state_snapshot(&opt.state_dict().unwrap());
    let (lr, params) = (opt.learning_rate(), snapshot(vm));
    let err = opt.load_state(&path).unwrap_err();
    match &err {
        Error::Checkpoint { who, what } => check(who, what),
        e => panic!("expected Error::Checkpoint, got {e:?}"),
    }
    assert_eq!(
        state_snapshot(&opt.state_dict().unwrap()),
        state,
        "a refused load changed the state ({err})"
    );
    assert_eq!(opt.learning_rate(), lr, "a refused load changed the rate");
    assert_eq!(snapshot(vm), params);
    err.to_string()
}

/// Each tensor's name and the byte range of its data in a safetensors file,
/// and the end of the JSON header.
fn layout(bytes: &[u8]) -> (Vec<(String, std::ops::Range<usize>)>, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let tensors = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (k.clone(), 8 + n + a..8 + n + b)
        })
        .collect();
    (tensors, 8 + n)
}

#[test]
fn a_corrupted_byte_anywhere_in_the_tensor_data_is_refused_naming_the_key() {
    let mut s = saved();
    let (tensors, _) = layout(&s.bytes);
    // Moments, spectral v₁ and step counters of every parameter.
    assert!(tensors.len() > 15, "{tensors:?}");
    assert!(tensors.iter().any(|(k, _)| k == "a.weight.decay.v"));
    assert!(tensors.iter().any(|(k, _)| k == "gain.adam.step"));
    let mut tried = 0;
    for (key, range) in &tensors {
        let mut positions = vec![range.start, range.start + range.len() / 2, range.end - 1];
        positions.dedup();
        for pos in positions {
            for bit in [0x01u8, 0x80] {
                let mut bad = s.bytes.clone();
                bad[pos] ^= bit;
                let dir = s.dir.clone();
                refused(&mut s.opt, &s.vm, &dir, &bad, |who, what| {
                    assert_eq!(who, key, "byte {pos}: {what}");
                    assert!(what.contains("checksum"), "{what}");
                });
                tried += 1;
            }
        }
    }
    assert!(tried >= 6 * tensors.len() - 6);
    // The intact file loads and brings back the saved rate.
    std::fs::write(s.dir.join("good.safetensors"), &s.bytes).unwrap();
    s.opt.load_state(s.dir.join("good.safetensors")).unwrap();
    assert_eq!(s.opt.learning_rate(), 0.01);
}

/// The hyperparameters travel as JSON in the safetensors metadata, outside
/// the tensors' checksums: a flipped bit there must be refused too, not
/// loaded as another hyperparameter.
#[test]
fn a_corrupted_byte_in_the_header_is_refused() {
    let mut s = saved();
    let (_, header_end) = layout(&s.bytes);
    // `"beta2":0.999` inside the escaped JSON of the metadata.
    let needle = b"beta2\\\":0.999";
    let at = s.bytes[..header_end]
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("β₂ in the header")
        + needle.len()
        - 1;
    assert_eq!(s.bytes[at], b'9');
    let mut bad = s.bytes.clone();
    bad[at] = b'8'; // 0x39 → 0x38: one bit, still valid JSON (β₂ = 0.998)
    let probe_path = s.dir.join("probe.safetensors");
    std::fs::write(&probe_path, &bad).unwrap();
    let mut probe = adamw(&model_of(MIXED, DType::F32, 21));
    if probe.load_state(&probe_path).is_ok() {
        panic!(
            "a header with one flipped bit loaded: β₂ is now {} (saved: 0.999)",
            probe.config().beta2
        );
    }
    let dir = s.dir.clone();
    refused(&mut s.opt, &s.vm, &dir, &bad, |_, _| {});
}

#[test]
fn a_truncated_file_is_refused() {
    let mut s = saved();
    let (tensors, header_end) = layout(&s.bytes);
    let len = s.bytes.len();
    let last = tensors.iter().map(|(_, r)| r.start).max().unwrap();
    for cut in [0, 5, 8, header_end / 2, header_end, last + 1, len - 1] {
        let dir = s.dir.clone();
        let msg = refused(&mut s.opt, &s.vm, &dir, &s.bytes[..cut], |_, _| {});
        assert!(msg.contains("bad.safetensors"), "cut at {cut}: {msg}");
    }
}

/// A file as commit 7804977 wrote it (`src/optim/state.rs` there): no
/// safetensors metadata, the optimizer kind and parameter names as `u8`
/// tensors `__steepest__.kind` / `__steepest__.params`, hyperparameters as
/// f64 scalars `__steepest__.<kind>.<name>`, slots `<param>.<slot>`.
fn old_format(vm: &VarMap) -> std::collections::HashMap<String, Tensor> {
    let text = |s: &str| Tensor::from_vec(s.as_bytes().to_vec(), s.len(), &Device::Cpu).unwrap();
    let scalar = |x: f64| Tensor::new(x, &Device::Cpu).unwrap();
    let mut names: Vec<&str> = MIXED.iter().map(|(n, _)| *n).collect();
    names.sort();
    let mut s = std::collections::HashMap::new();
    s.insert("__steepest__.kind".to_string(), text("adamw"));
    s.insert("__steepest__.params".to_string(), text(&names.join("\n")));
    for (k, x) in [
        ("lr", 0.01),
        ("beta1", 0.9),
        ("beta2", 0.999),
        ("eps", 1e-8),
        ("decay_vectors", 1.0),
    ] {
        s.insert(format!("__steepest__.adamw.{k}"), scalar(x));
    }
    s.insert(
        "__steepest__.adamw.weight_decay".to_string(),
        Tensor::new(&[2.0f64, 0.1, 1.0], &Device::Cpu).unwrap(),
    );
    for n in names {
        let v = var(vm, n);
        for slot in ["exp_avg", "exp_avg_sq"] {
            s.insert(
                format!("{n}.{slot}"),
                v.as_tensor()
                    .ones_like()
                    .unwrap()
                    .affine(0.01, 0.0)
                    .unwrap(),
            );
        }
        s.insert(
            format!("{n}.step"),
            Tensor::new(2i64, &Device::Cpu).unwrap(),
        );
    }
    s
}

#[test]
fn an_old_format_file_is_refused_as_the_old_format() {
    let mut s = saved();
    let old = old_format(&s.vm);
    let path = s.dir.join("old.safetensors");
    // What 7804977's `save_state` did.
    candle_core::safetensors::save(&old, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let dir = s.dir.clone();
    let msg = refused(&mut s.opt, &s.vm, &dir, &bytes, |_, what| {
        assert!(what.contains("format 1"), "{what}");
        assert!(what.contains("cannot be resumed"), "{what}");
    });
    assert!(msg.contains("steepest 0.1"), "{msg}");
    // As a state dict (e.g. read by hand) too.
    let before = state_snapshot(&s.opt.state_dict().unwrap());
    match s.opt.load_state_dict(&old) {
        Err(Error::Checkpoint { what, .. }) => {
            assert!(what.contains("format 1"), "{what}")
        }
        r => panic!("expected Error::Checkpoint, got {r:?}"),
    }
    assert_eq!(state_snapshot(&s.opt.state_dict().unwrap()), before);
}

#[test]
fn a_foreign_safetensors_file_is_refused() {
    let mut s = saved();
    // A model's weights, not an optimizer's state.
    s.vm.save(s.dir.join("params.safetensors")).unwrap();
    let bytes = std::fs::read(s.dir.join("params.safetensors")).unwrap();
    let dir = s.dir.clone();
    refused(&mut s.opt, &s.vm, &dir, &bytes, |_, what| {
        assert!(what.contains("not a steepest checkpoint"), "{what}")
    });
    // Not safetensors at all.
    let dir = s.dir.clone();
    refused(&mut s.opt, &s.vm, &dir, b"{\"lr\": 0.01}\n", |_, what| {
        assert!(what.contains("safetensors"), "{what}")
    });
}

#[test]
fn a_checkpoint_of_another_kind_is_refused() {
    let mut s = saved();
    let vm = model_of(MIXED, DType::F32, 21);
    let (mut other, mut part) = (sgd(&vm), partition(&vm));
    other.backward_step(&loss_of(&vm, MIXED, 0)).unwrap();
    part.backward_step(&loss_of(&vm, MIXED, 0)).unwrap();
    for (kind, path) in [
        ("sgd", "sgd.safetensors"),
        ("partition", "part.safetensors"),
    ] {
        let p = s.dir.join(path);
        match kind {
            "sgd" => other.save_state(&p).unwrap(),
            _ => part.save_state(&p).unwrap(),
        }
        let bytes = std::fs::read(&p).unwrap();
        let dir = s.dir.clone();
        refused(&mut s.opt, &s.vm, &dir, &bytes, |_, what| {
            assert!(
                what.contains(&format!("`{kind}`")) && what.contains("`adamw`"),
                "{what}"
            )
        });
    }
    // And the other way round: an AdamW file into a partition.
    let p = s.dir.join("adamw.safetensors");
    std::fs::write(&p, &s.bytes).unwrap();
    let dir = s.dir.clone();
    refused(&mut part, &vm, &dir, &s.bytes, |_, what| {
        assert!(what.contains("`adamw`"), "{what}")
    });
}

#[test]
fn a_newer_format_version_is_refused() {
    let mut s = saved();
    let state = steepest::checkpoint::load(s.dir.join("good.safetensors")).unwrap();
    for (field, value, needle) in [
        ("version", serde_json::json!(3), "version 3"),
        ("format", serde_json::json!("other-state"), "other-state"),
    ] {
        let bumped = common::with_header(&state, |h| h[field] = value.clone());
        let p = s.dir.join("bumped.safetensors");
        // A well-formed file with valid checksums: only the header differs.
        steepest::checkpoint::save(&bumped, &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let dir = s.dir.clone();
        refused(&mut s.opt, &s.vm, &dir, &bytes, |_, what| {
            assert!(what.contains(needle), "{what}")
        });
    }
}

// ---------------------------------------------------------------------------
// A fallible chain that fails mid-step.

/// A user-written transform (through the public trait): does nothing but
/// count its calls, and fails on call number `fail_at` (0-based, over all
/// groups and steps), after recording the first member's values, which the
/// update before it has already changed.
#[derive(Clone, Debug)]
struct FailOn {
    fail_at: usize,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Option<Seen>>>,
}

/// A parameter's name and values.
type Seen = (String, Vec<f64>);

impl FailOn {
    fn new(fail_at: usize) -> Self {
        Self {
            fail_at,
            calls: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(None)),
        }
    }
}

impl Transform for FailOn {
    fn kind(&self) -> &'static str {
        "fail_on"
    }
    fn stage(&self) -> Stage {
        Stage::Post
    }
    fn hparams(&self) -> serde_json::Value {
        serde_json::json!({ "fail_at": self.fail_at })
    }
    fn set_hparams(&mut self, _v: &serde_json::Value) -> steepest::Result<()> {
        Ok(())
    }
    fn fallible(&self) -> bool {
        true
    }
    fn apply(
        &self,
        step: &mut GroupStep<'_>,
        _states: &mut [Option<Box<dyn TransformState>>],
        _fuse: bool,
    ) -> steepest::Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == self.fail_at {
            let name = step.info(0).name.clone();
            let now = common::to_f64_vec(step.var(0).as_tensor());
            *self.seen.lock().unwrap() = Some((name.clone(), now));
            return Err(Error::numerical(name, "planned failure"));
        }
        Ok(())
    }
    fn boxed(&self) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}

/// Matrices: decay, momentum, `msign`, then `FailOn` (after the update);
/// the rest: AdamW.
fn failing_partition(vm: &VarMap, fail: &FailOn) -> Driver {
    let chain = muon_chain().then(fail.clone());
    Partition::by(|p: &ParamInfo| {
        if p.is_matrix() && !p.name.starts_with("embed") {
            "fallible"
        } else {
            "adamw"
        }
    })
    .group("fallible", chain, 0.02)
    .group("adamw", adamw_chain(), 0.005)
    .build_from_varmap(vm)
    .unwrap()
}

#[test]
fn a_fallible_chain_failing_mid_step_restores_every_group() {
    // The fallible group has three shape groups per step: 3×5, 4×8 (the
    // conv view), 6×4 (two matrices, one batch). Steps 0 and 1 make calls
    // 0–5; step 2 fails on its first, second or third group.
    for fail_at in [6, 7, 8] {
        let fail = FailOn::new(fail_at);
        let vm = model_of(MIXED, DType::F32, 21);
        let mut opt = failing_partition(&vm, &fail);
        let never = FailOn::new(usize::MAX);
        let rv = model_of(MIXED, DType::F32, 21);
        let mut reference = failing_partition(&rv, &never);
        for t in 0..2 {
            opt.backward_step(&loss_of(&vm, MIXED, t)).unwrap();
            reference.backward_step(&loss_of(&rv, MIXED, t)).unwrap();
        }
        assert_eq!(fail.calls.load(Ordering::SeqCst), 6);
        let params = snapshot(&vm);
        let state = state_snapshot(&opt.state_dict().unwrap());
        assert!(state.contains_key("a.weight.momentum.buf"));
        assert!(state.contains_key("a.bias.adam.exp_avg"));

        let err = opt.try_step(&loss_of(&vm, MIXED, 2).backward().unwrap());
        let (name, seen) = fail.seen.lock().unwrap().clone().expect("it failed");
        match err {
            Err(Error::Numerical { who, what }) => {
                assert_eq!(who, name);
                assert!(what.contains("planned failure"), "{what}");
            }
            r => panic!("expected the planned Error::Numerical, got {r:?}"),
        }
        // The failing group had been updated when it failed (the restore
        // below is not vacuous) ...
        assert_ne!(
            seen, params[&name],
            "fail_at {fail_at}: {name} had not moved"
        );
        // ... and after the step nothing in any group changed.
        assert_eq!(
            snapshot(&vm),
            params,
            "fail_at {fail_at}: a parameter changed"
        );
        assert_eq!(
            state_snapshot(&opt.state_dict().unwrap()),
            state,
            "fail_at {fail_at}: the state changed"
        );
        // The next steps run as if the failed one had never been tried.
        for t in 2..4 {
            opt.backward_step(&loss_of(&vm, MIXED, t)).unwrap();
            reference.backward_step(&loss_of(&rv, MIXED, t)).unwrap();
        }
        assert_eq!(snapshot(&vm), snapshot(&rv), "fail_at {fail_at}");
        assert_eq!(
            state_tensors(&opt.state_dict().unwrap()),
            state_tensors(&reference.state_dict().unwrap()),
            "fail_at {fail_at}"
        );
    }
}

/// The candle idiom `AdamW::new(varmap.all_vars(), …)`: `all_vars` lists a
/// `HashMap`'s values, in an order that changes from one process to the
/// next. Three same-shape layers, each trained a different number of steps
/// (its Adam step count tells them apart), saved from one order and loaded
/// into an optimizer given the layers in every other order: each layer gets
/// its own state back (the bare-var names follow the variables' creation
/// order, not the order given), so the next step is the uninterrupted one.
#[test]
fn bare_var_checkpoints_follow_the_variables_not_the_order_given() {
    use candle_nn::{Init, VarBuilder};
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let init = Init::Randn {
        mean: 0.0,
        stdev: 1.0,
    };
    let layers: Vec<Tensor> = ["a", "b", "c"]
        .iter()
        .map(|n| vb.get_with_hints((4, 4), n, init).unwrap())
        .collect();
    let vars = |order: [usize; 3]| -> Vec<candle_core::Var> {
        let data = vm.data().lock().unwrap();
        order
            .iter()
            .map(|&i| data[["a", "b", "c"][i]].clone())
            .collect()
    };
    // layer i is trained in steps ≥ i: 3, 2 and 1 Adam steps
    let loss = |step: usize| {
        let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (i, w) in layers.iter().enumerate().filter(|(i, _)| step >= *i) {
            let term = (w.sqr().unwrap().sum_all().unwrap() * (i + 1) as f64).unwrap();
            total = (total + term).unwrap();
        }
        total
    };
    let cfg = AdamWConfig {
        lr: 0.01,
        ..Default::default()
    };
    let mut saved = AdamW::new(vars([2, 0, 1]), cfg.clone()).unwrap();
    for step in 0..3 {
        saved.backward_step(&loss(step)).unwrap();
    }
    let path = temp_dir("bare-order").join("opt.safetensors");
    saved.save_state(&path).unwrap();
    let before = snapshot(&vm);
    // the uninterrupted run's next step
    saved.backward_step(&loss(3)).unwrap();
    let expected = snapshot(&vm);
    for order in [[0, 1, 2], [1, 2, 0], [2, 1, 0], [0, 2, 1]] {
        {
            let data = vm.data().lock().unwrap();
            for (k, w) in &before {
                let t = Tensor::from_vec(w.clone(), data[k].shape(), &Device::Cpu).unwrap();
                data[k].set(&t.to_dtype(DType::F32).unwrap()).unwrap();
            }
        }
        let mut resumed = AdamW::new(vars(order), cfg.clone()).unwrap();
        resumed.load_state(&path).unwrap();
        resumed.backward_step(&loss(3)).unwrap();
        assert_eq!(snapshot(&vm), expected, "order {order:?}");
    }
}

/// A checkpoint of bare variables written before they were numbered in
/// creation order (its header has no `bare_names`) cannot be matched to the
/// variables: it is refused with a message that says why and what to do,
/// and nothing changes. Checkpoints keyed by `VarMap` names carry no such
/// marker and are unaffected.
#[test]
fn bare_var_checkpoints_of_the_old_numbering_are_refused() {
    let vm = model_of(MIXED, DType::F32, 0);
    let vars = |vm: &VarMap| -> Vec<candle_core::Var> {
        let data = vm.data().lock().unwrap();
        MIXED.iter().map(|(n, _)| data[*n].clone()).collect()
    };
    let mut opt = AdamW::new(vars(&vm), AdamWConfig::default()).unwrap();
    opt.backward_step(&loss_of(&vm, MIXED, 0)).unwrap();
    let state = opt.state_dict().unwrap();
    assert_eq!(common::header(&state)["bare_names"], "creation");
    let old = common::with_header(&state, |h| {
        h.as_object_mut().unwrap().remove("bare_names");
    });
    opt.backward_step(&loss_of(&vm, MIXED, 1)).unwrap();
    let (params, before) = (snapshot(&vm), state_snapshot(&opt.state_dict().unwrap()));
    let e = opt.load_state_dict(&old).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
    let msg = e.to_string();
    for part in ["param.<i>", "creation order", "from_varmap"] {
        assert!(msg.contains(part), "missing {part:?}: {msg}");
    }
    assert_eq!(snapshot(&vm), params);
    assert_eq!(state_snapshot(&opt.state_dict().unwrap()), before);
    // A marker naming another numbering rule is no marker of this one.
    let other = common::with_header(&state, |h| h["bare_names"] = "given".into());
    let e = opt.load_state_dict(&other).unwrap_err();
    assert!(e.to_string().contains("creation order"), "{e}");
    assert_eq!(state_snapshot(&opt.state_dict().unwrap()), before);
    // the same state with its marker loads
    opt.load_state_dict(&state).unwrap();
    // named parameters: no marker, and none needed
    let named = adamw(&vm);
    let h = common::header(&named.state_dict().unwrap());
    assert!(h.get("bare_names").is_none(), "{h}");
}

/// Only the names `Optimizer::new` gives (exactly `param.0`, …,
/// `param.{n−1}`) make a checkpoint a bare-variable one: a user's own
/// parameter that happens to be called `param.7` gets no marker and is not
/// refused as an old bare-variable checkpoint.
#[test]
fn a_name_that_merely_looks_bare_is_not_a_bare_variable_checkpoint() {
    let shapes: &Shapes = &[("param.7", &[3, 2]), ("w", &[2, 2])];
    let vm = model_of(shapes, DType::F32, 1);
    let mut opt = AdamW::from_varmap(&vm, AdamWConfig::default()).unwrap();
    opt.backward_step(&loss_of(&vm, shapes, 0)).unwrap();
    let state = opt.state_dict().unwrap();
    assert!(common::header(&state).get("bare_names").is_none());
    opt.load_state_dict(&state).unwrap();
    // `param.00`, `param.01` parse as 0 and 1 but are not the names
    // `Optimizer::new` gives (`param.0`, `param.1`).
    let shapes: &Shapes = &[("param.00", &[3, 2]), ("param.01", &[2, 2])];
    let vm = model_of(shapes, DType::F32, 1);
    let mut opt = AdamW::from_varmap(&vm, AdamWConfig::default()).unwrap();
    opt.backward_step(&loss_of(&vm, shapes, 0)).unwrap();
    let state = opt.state_dict().unwrap();
    let h = common::header(&state);
    assert!(h.get("bare_names").is_none(), "{h}");
    opt.load_state_dict(&state).unwrap();
}

/// An optimizer without parameters has no bare variables: its header has
/// no numbering marker, and a header without one (as an earlier version
/// wrote it) loads.
#[test]
fn an_optimizer_without_parameters_is_not_a_bare_variable_checkpoint() {
    let mut opt = AdamW::new(Vec::new(), AdamWConfig::default()).unwrap();
    let state = opt.state_dict().unwrap();
    let h = common::header(&state);
    assert_eq!(h["params"], serde_json::json!([]));
    assert!(h.get("bare_names").is_none(), "{h}");
    let unmarked = common::with_header(&state, |h| {
        h.as_object_mut().unwrap().remove("bare_names");
    });
    opt.load_state_dict(&unmarked).unwrap();
}

// ---------------------------------------------------------------------------
// The header's checksum list, older versions, merge and nested names.

/// `bytes` (a safetensors file) with its `__metadata__` changed by `edit`:
/// the JSON header re-encoded (padded with spaces to a multiple of 8 bytes,
/// as the writer does) and its length prefix updated; the tensor data is
/// left as it is.
fn with_metadata(
    bytes: &[u8],
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(header["__metadata__"].as_object_mut().unwrap());
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// The metadata's `steepest.crc32` lists a checksum per tensor; a key it
/// lists that the file does not hold (a tensor dropped from the file, the
/// list otherwise intact) must be refused naming that key — not loaded as
/// a checkpoint without that state — and nothing changes.
#[test]
fn a_checksum_listed_for_a_tensor_the_file_lacks_is_refused_naming_the_key() {
    let mut s = saved();
    let ghost = "a.weight.adam.ghost";
    let edit = |add: bool| {
        with_metadata(&s.bytes, |m| {
            let mut crcs: std::collections::BTreeMap<String, String> =
                serde_json::from_str(m["steepest.crc32"].as_str().unwrap()).unwrap();
            assert!(crcs.contains_key("a.weight.adam.exp_avg"), "{crcs:?}");
            if add {
                crcs.insert(ghost.into(), "00000000".into());
            }
            m["steepest.crc32"] = serde_json::to_string(&crcs).unwrap().into();
        })
    };
    // The rewriting alone keeps a loadable file (the refusal below is about
    // the extra key, not about the rewrite).
    let intact = s.dir.join("rewritten.safetensors");
    std::fs::write(&intact, edit(false)).unwrap();
    assert!(steepest::checkpoint::load(&intact).is_ok());

    let bad = edit(true);
    let path = s.dir.join("ghost.safetensors");
    std::fs::write(&path, &bad).unwrap();
    match steepest::checkpoint::load(&path) {
        Err(Error::Checkpoint { who, what }) => {
            assert_eq!(who, ghost, "{what}");
            assert!(what.contains("missing"), "{what}");
        }
        r => panic!("expected Error::Checkpoint naming {ghost}, got {r:?}"),
    }
    let dir = s.dir.clone();
    refused(&mut s.opt, &s.vm, &dir, &bad, |who, what| {
        assert_eq!(who, ghost, "{what}");
        assert!(what.contains("missing"), "{what}");
    });
}

/// The reader accepts exactly its own format version: an older one
/// (`VERSION − 1`, a format this version no longer reads) is refused like
/// a newer one, naming the version, and nothing changes.
#[test]
fn an_older_format_version_is_refused() {
    use steepest::checkpoint::VERSION;
    let mut s = saved();
    let state = steepest::checkpoint::load(s.dir.join("good.safetensors")).unwrap();
    assert_eq!(common::header(&state)["version"], VERSION);
    let older = VERSION - 1;
    let bumped = common::with_header(&state, |h| h["version"] = older.into());
    let p = s.dir.join("older.safetensors");
    // A well-formed file with valid checksums: only the version differs.
    steepest::checkpoint::save(&bumped, &p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let dir = s.dir.clone();
    let needle = format!("version {older}");
    refused(&mut s.opt, &s.vm, &dir, &bytes, |_, what| {
        assert!(what.contains(&needle), "{what}");
        assert!(what.contains(&format!("reads version {VERSION}")), "{what}");
    });
}

/// `merge` takes a key present in several dicts only when it holds the same
/// tensor in each: dtype, shape and bytes. The same four f32 values shaped
/// (4,) in one dict and (2, 2) in the other have identical bytes but are
/// different tensors: refused, naming the key.
#[test]
fn merge_refuses_one_key_with_the_same_bytes_in_another_shape() {
    let shapes: &Shapes = &[("w", &[3, 2]), ("v", &[4])];
    let vm = model_of(shapes, DType::F32, 3);
    let mut opt = adamw(&vm);
    opt.backward_step(&loss_of(&vm, shapes, 0)).unwrap();
    let base = opt.state_dict().unwrap();
    let key = "v.adam.exp_avg";
    assert_eq!(base[key].dims(), [4]);
    let flat = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap();
    let square = flat.reshape((2, 2)).unwrap();
    let with = |t: &Tensor| {
        let mut d = base.clone();
        d.insert(key.to_string(), t.clone());
        d
    };
    // The same tensor in both: merged, and the key keeps it.
    let merged = steepest::checkpoint::merge(&[with(&flat), with(&flat)]).unwrap();
    assert_eq!(merged[key].dims(), [4]);
    // Another shape, the same bytes.
    for pair in [[with(&flat), with(&square)], [with(&square), with(&flat)]] {
        match steepest::checkpoint::merge(&pair) {
            Err(Error::Checkpoint { who, what }) => {
                assert_eq!(who, key, "{what}");
                assert!(what.contains("different values"), "{what}");
            }
            r => panic!("expected Error::Checkpoint naming {key}, got {r:?}"),
        }
    }
}

/// Parameters whose names prefix one another (`a`, `a.b`, `a.b.c`): a state
/// key `<name>.<transform>.<field>` belongs to the longest name that
/// prefixes it, so each parameter's state comes back to it on a resume
/// (bit-identical to the uninterrupted run), and `checkpoint::restrict`
/// keeps exactly the named parameter's entries. Which keys those are is
/// read off the key format: `<name>.` followed by exactly
/// `<transform>.<field>` (one dot; field names have none).
#[test]
fn nested_parameter_names_resume_and_restrict_to_their_own_state() {
    const NESTED: &Shapes = &[("a", &[4, 3]), ("a.b", &[3, 5]), ("a.b.c", &[6])];
    let vm = model_of(NESTED, DType::F32, 5);
    let mut opt = adamw(&vm);
    for t in 0..2 {
        opt.backward_step(&loss_of(&vm, NESTED, t)).unwrap();
    }
    let state = opt.state_dict().unwrap();
    let own = |name: &str, key: &str| {
        key.strip_prefix(name)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|rest| rest.matches('.').count() == 1)
    };
    let mut covered = 0;
    for (name, _) in NESTED {
        let mut want: Vec<&str> = state
            .keys()
            .map(|k| k.as_str())
            .filter(|k| own(name, k))
            .collect();
        // Adam's moments and step count at least, for every parameter.
        assert!(
            want.contains(&format!("{name}.adam.exp_avg").as_str()),
            "{name}: {want:?}"
        );
        covered += want.len();
        want.push("__steepest__");
        want.sort();
        let kept = steepest::checkpoint::restrict(&state, &[name]).unwrap();
        let mut got: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        got.sort();
        assert_eq!(got, want, "restrict to {name}");
        // The entries kept are the state's own.
        let mine: std::collections::HashMap<String, Tensor> = want
            .iter()
            .map(|k| (k.to_string(), state[*k].clone()))
            .collect();
        assert_eq!(state_snapshot(&kept), state_snapshot(&mine), "{name}");
    }
    // Every entry but the header belongs to exactly one parameter.
    assert_eq!(covered, state.len() - 1);
    resume("AdamW nested names", NESTED, DType::F32, adamw);
}

/// `merge` takes state dicts of one optimizer only: the same parameters
/// and kind with another learning rate (another header) are refused,
/// naming the header, whichever dict comes first.
#[test]
fn merge_refuses_dicts_with_another_header() {
    let shapes: &Shapes = &[("w", &[3, 2]), ("v", &[4])];
    let vm = model_of(shapes, DType::F32, 3);
    let mut opt = adamw(&vm);
    opt.backward_step(&loss_of(&vm, shapes, 0)).unwrap();
    let a = opt.state_dict().unwrap();
    opt.set_learning_rate(0.02);
    let b = opt.state_dict().unwrap();
    assert_eq!(common::header(&a)["kind"], common::header(&b)["kind"]);
    assert_ne!(common::header(&a), common::header(&b));
    steepest::checkpoint::merge(&[a.clone(), a.clone()]).unwrap();
    for pair in [[a.clone(), b.clone()], [b, a]] {
        match steepest::checkpoint::merge(&pair) {
            Err(Error::Checkpoint { who, what }) => {
                assert_eq!(who, "__steepest__", "{what}");
                assert!(what.contains("another header"), "{what}");
            }
            r => panic!("expected Error::Checkpoint naming the header, got {r:?}"),
        }
    }
}

/// `restrict` keeps every entry that belongs to no parameter of the header
/// — here `warmup.step`, whose name starts with the parameter name `w` but
/// not with `w.` — whichever parameters are kept, and refuses a name the
/// header does not list.
#[test]
fn restrict_keeps_entries_of_no_parameter_and_refuses_unknown_names() {
    let shapes: &Shapes = &[("w", &[3, 2]), ("v", &[4])];
    let vm = model_of(shapes, DType::F32, 3);
    let mut opt = adamw(&vm);
    opt.backward_step(&loss_of(&vm, shapes, 0)).unwrap();
    let mut state = opt.state_dict().unwrap();
    let extra = "warmup.step";
    state.insert(extra.into(), Tensor::new(5i64, &Device::Cpu).unwrap());
    for keep in [&["v"][..], &["w"], &[], &["w", "v"]] {
        let kept = steepest::checkpoint::restrict(&state, keep).unwrap();
        assert!(kept.contains_key(extra), "restrict to {keep:?}");
        assert!(kept.contains_key("__steepest__"), "restrict to {keep:?}");
        for name in ["w", "v"] {
            let key = format!("{name}.adam.exp_avg");
            assert_eq!(
                kept.contains_key(&key),
                keep.contains(&name),
                "{key}, {keep:?}"
            );
        }
    }
    match steepest::checkpoint::restrict(&state, &["v", "ghost"]) {
        Err(Error::Checkpoint { who, what }) => {
            assert_eq!(who, "ghost", "{what}");
            assert!(what.contains("not a parameter"), "{what}");
        }
        r => panic!(
            "expected Error::Checkpoint naming ghost, got {:?}",
            r.map(|m| m.len())
        ),
    }
}

/// A file whose header checksum (`steepest.header.crc32`) is missing from
/// the metadata is refused, like a wrong one, and nothing changes.
#[test]
fn a_missing_header_checksum_is_refused() {
    let mut s = saved();
    let bad = with_metadata(&s.bytes, |m| {
        assert!(m.remove("steepest.header.crc32").is_some());
    });
    let dir = s.dir.clone();
    refused(&mut s.opt, &s.vm, &dir, &bad, |who, what| {
        assert_eq!(who, "__steepest__", "{what}");
        assert!(what.contains("no header checksum"), "{what}");
    });
}

/// `save` writes `<path>.tmp` (the whole name, whatever its extension) and
/// renames it: two files differing only in extension never share a
/// temporary file, nothing is left beside them, and a write that fails
/// leaves the earlier file at `path` as it was.
#[test]
fn a_save_goes_through_path_dot_tmp_and_a_failed_one_keeps_the_old_file() {
    let s = saved();
    let (bin, pt) = (s.dir.join("opt.bin"), s.dir.join("opt.pt"));
    s.opt.save_state(&bin).unwrap();
    s.opt.save_state(&pt).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&s.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["good.safetensors", "opt.bin", "opt.pt"]);
    let before = std::fs::read(&bin).unwrap();
    assert_ne!(
        before, s.bytes,
        "the optimizer stepped since `good` was saved"
    );

    // `opt.bin.tmp` cannot be written (a directory is there): the save
    // fails naming the file, and `opt.bin` keeps its bytes.
    std::fs::create_dir(s.dir.join("opt.bin.tmp")).unwrap();
    let vm = model_of(MIXED, DType::F32, 21);
    let mut other = adamw(&vm);
    other.backward_step(&loss_of(&vm, MIXED, 0)).unwrap();
    let err = other.save_state(&bin).unwrap_err();
    match &err {
        Error::Checkpoint { who, what } => {
            assert!(who.ends_with("opt.bin"), "{err}");
            assert!(what.contains("cannot write"), "{err}");
        }
        e => panic!("expected Error::Checkpoint, got {e:?}"),
    }
    assert_eq!(std::fs::read(&bin).unwrap(), before);
}

/// A save whose rename fails (a non-empty directory stands at `path`) is
/// refused naming the file, and removes the `<path>.tmp` it had written:
/// nothing is left beside the checkpoints.
#[test]
fn a_save_whose_rename_fails_removes_its_temporary_file() {
    let s = saved();
    let target = s.dir.join("opt.st");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let err = s.opt.save_state(&target).unwrap_err();
    match &err {
        Error::Checkpoint { who, what } => {
            assert!(who.ends_with("opt.st"), "{err}");
            assert!(what.contains("cannot write"), "{err}");
        }
        e => panic!("expected Error::Checkpoint, got {e:?}"),
    }
    assert!(
        !s.dir.join("opt.st.tmp").exists(),
        "the temporary file is left behind"
    );
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"x");
}

/// A tensor of the file that the metadata's checksum list does not name
/// (its entry dropped, the list otherwise intact) is refused naming the
/// key, and nothing changes.
#[test]
fn a_tensor_without_a_checksum_is_refused_naming_the_key() {
    let mut s = saved();
    let key = "a.weight.adam.exp_avg";
    let bad = with_metadata(&s.bytes, |m| {
        let mut crcs: std::collections::BTreeMap<String, String> =
            serde_json::from_str(m["steepest.crc32"].as_str().unwrap()).unwrap();
        assert!(crcs.remove(key).is_some(), "{crcs:?}");
        m["steepest.crc32"] = serde_json::to_string(&crcs).unwrap().into();
    });
    let dir = s.dir.clone();
    refused(&mut s.opt, &s.vm, &dir, &bad, |who, what| {
        assert_eq!(who, key, "{what}");
        assert!(what.contains("without a checksum"), "{what}");
    });
}

/// A checkpoint holds state for one manifold, so loading it into a chain on
/// another is refused, naming the transform, and changes nothing, for
/// `Retract` as for `ManifoldStep` (which `Steepest` builds on): another kind
/// of manifold, or the Stiefel manifold in the other orientation (square
/// matrices fit both, so the shapes alone do not tell them apart). A
/// different radius on the same manifold is a hyperparameter: it loads.
#[test]
fn a_checkpoint_for_another_manifold_is_refused_by_retract_and_manifold_step() {
    use steepest::optim::transform::ManifoldStep;
    use steepest::optim::{DualAscent, Norm};
    const SQUARES: &Shapes = &[("a.weight", &[4, 4]), ("b.weight", &[3, 3])];
    let retract = |m: Manifold| {
        Chain::new()
            .then(Adam::default())
            .then(Retract::new(m).unwrap())
    };
    let manifold_step = |m: Manifold| {
        Chain::new().then(ManifoldStep {
            manifold: m,
            norm: Norm::Spectral(NewtonSchulz::default()),
            dual: DualAscent::default(),
        })
    };
    let stiefel = |transpose| Manifold::Stiefel { transpose };
    let (sphere, spectral) = (
        Manifold::Sphere { radius: 1.0 },
        Manifold::SpectralSphere { radius: 1.0 },
    );
    let cases: Vec<(&str, Chain, Chain, bool)> = vec![
        (
            "retract: sphere → Stiefel",
            retract(sphere),
            retract(stiefel(false)),
            false,
        ),
        (
            "retract: Stiefel → sphere",
            retract(stiefel(true)),
            retract(sphere),
            false,
        ),
        (
            "retract: Stiefel orientation",
            retract(stiefel(false)),
            retract(stiefel(true)),
            false,
        ),
        (
            "retract: another radius",
            retract(sphere),
            retract(Manifold::Sphere { radius: 2.0 }),
            true,
        ),
        (
            "manifold step: Stiefel orientation",
            manifold_step(stiefel(false)),
            manifold_step(stiefel(true)),
            false,
        ),
        (
            "manifold step: spectral sphere → Stiefel",
            manifold_step(spectral),
            manifold_step(stiefel(false)),
            false,
        ),
    ];
    for (what, saved_chain, loading_chain, loads) in cases {
        let vm = model_of(SQUARES, DType::F32, 4);
        let mut saved = Driver::from_varmap(&vm, saved_chain, 0.01).unwrap();
        saved.backward_step(&loss_of(&vm, SQUARES, 0)).unwrap();
        let state = saved.state_dict().unwrap();
        let vm = model_of(SQUARES, DType::F32, 4);
        let mut opt = Driver::from_varmap(&vm, loading_chain, 0.01).unwrap();
        opt.backward_step(&loss_of(&vm, SQUARES, 0)).unwrap();
        let before = state_snapshot(&opt.state_dict().unwrap());
        let settings = opt.settings();
        let r = opt.load_state_dict(&state);
        if loads {
            r.unwrap_or_else(|e| panic!("{what}: {e}"));
            continue;
        }
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }), "{what}: {e}");
        assert!(e.to_string().contains("written for"), "{what}: {e}");
        assert_eq!(state_snapshot(&opt.state_dict().unwrap()), before, "{what}");
        assert_eq!(opt.settings(), settings, "{what}");
    }
}

/// A save into a directory that does not exist (or a path through a file)
/// is refused naming the checkpoint and that directory, not the temporary
/// file safetensors would have tried; nothing is created.
#[test]
fn a_save_into_a_missing_directory_names_the_directory() {
    let s = saved();
    let missing = s.dir.join("no").join("such");
    let err = s.opt.save_state(missing.join("opt.st")).unwrap_err();
    match &err {
        Error::Checkpoint { who, what } => {
            assert!(who.ends_with("opt.st"), "{err}");
            let expected = format!("the directory {} does not exist", missing.display());
            assert!(what.contains(&expected), "{err}");
        }
        e => panic!("expected Error::Checkpoint, got {e:?}"),
    }
    assert!(!s.dir.join("no").exists());
    std::fs::write(s.dir.join("afile"), b"x").unwrap();
    let err = s
        .opt
        .save_state(s.dir.join("afile").join("opt.st"))
        .unwrap_err();
    assert!(
        err.to_string().contains("afile is not a directory"),
        "{err}"
    );
}

/// Parameter names that differ from the checkpoint's are listed by side,
/// each side only when it has names: the model's extra parameter as
/// "missing from checkpoint", the checkpoint's extra one as "not in this
/// optimizer".
#[test]
fn mismatched_parameter_names_list_only_the_sides_that_differ() {
    let vm = model_of(TALL, DType::F32, 3);
    let mut opt = AdamW::from_varmap(&vm, AdamWConfig::default()).unwrap();
    opt.backward_step(&loss_of(&vm, TALL, 0)).unwrap();
    let state = opt.state_dict().unwrap();
    let load = |shapes: &Shapes| {
        let vm = model_of(shapes, DType::F32, 3);
        let mut other = AdamW::from_varmap(&vm, AdamWConfig::default()).unwrap();
        other.load_state_dict(&state).unwrap_err().to_string()
    };
    let extra: Vec<_> = TALL
        .iter()
        .copied()
        .chain([("z.weight", &[2, 2][..])])
        .collect();
    let e = load(&extra);
    assert!(e.contains(r#"missing from checkpoint ["z.weight"]"#), "{e}");
    assert!(!e.contains("not in this optimizer"), "{e}");
    let e = load(&TALL[..3]);
    assert!(
        e.contains(r#"not in this optimizer ["conv.weight"]"#),
        "{e}"
    );
    assert!(!e.contains("missing from"), "{e}");
    let renamed: Vec<_> = TALL[..3]
        .iter()
        .copied()
        .chain([("z.weight", TALL[3].1)])
        .collect();
    let e = load(&renamed);
    assert!(
        e.contains(
            r#"missing from checkpoint ["z.weight"], not in this optimizer ["conv.weight"]"#
        ),
        "{e}"
    );
}

/// A bare-variable checkpoint (`Optimizer::new`) loaded into a model whose
/// variables were created in another order fails on the first shape that
/// differs, and the error says bare variables are matched by creation
/// order; the same mismatch between named parameters carries no such hint.
#[test]
fn a_bare_variable_shape_mismatch_points_at_the_creation_order() {
    let cfg = AdamWConfig::default();
    let (first, second): (&Shapes, &Shapes) = (
        &[("a.weight", &[6, 4]), ("b.weight", &[4, 6])],
        &[("b.weight", &[4, 6]), ("a.weight", &[6, 4])],
    );
    let vm = model_of(first, DType::F32, 5);
    let mut opt = AdamW::new(vm.all_vars(), cfg.clone()).unwrap();
    opt.backward_step(&loss_of(&vm, first, 0)).unwrap();
    let state = opt.state_dict().unwrap();
    let vm2 = model_of(second, DType::F32, 5);
    let mut other = AdamW::new(vm2.all_vars(), cfg.clone()).unwrap();
    let before = snapshot(&vm2);
    let e = other.load_state_dict(&state).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
    let e = e.to_string();
    assert!(e.contains("param."), "{e}");
    assert!(e.contains("expected shape"), "{e}");
    assert!(
        e.contains("numbered in the order the model created them"),
        "{e}"
    );
    assert_eq!(snapshot(&vm2), before);

    let mut named = AdamW::from_varmap(&vm, cfg.clone()).unwrap();
    named.backward_step(&loss_of(&vm, first, 0)).unwrap();
    let state = named.state_dict().unwrap();
    let vm3 = model_of(
        &[("a.weight", &[4, 6]), ("b.weight", &[4, 6])],
        DType::F32,
        5,
    );
    let mut other = AdamW::from_varmap(&vm3, cfg).unwrap();
    let e = other.load_state_dict(&state).unwrap_err().to_string();
    assert!(e.contains("expected shape"), "{e}");
    assert!(!e.contains("creation") && !e.contains("bare"), "{e}");
}

/// Loading a directory is refused as such ("is a directory, not a
/// checkpoint file"), and one holding a `manifest.json` (a data-parallel
/// checkpoint's; here a stand-in file) points to `DataParallel::load_state`
/// and `distributed::load_union`; nothing is loaded.
#[test]
fn loading_a_directory_says_what_it_is() {
    let mut s = saved();
    let dir = s.dir.join("a_dir");
    std::fs::create_dir(&dir).unwrap();
    let before = s.opt.state_dict().unwrap();
    let e = s.opt.load_state(&dir).unwrap_err().to_string();
    assert!(e.contains("is a directory, not a checkpoint file"), "{e}");
    assert!(!e.contains("load_union"), "{e}");
    std::fs::write(dir.join("manifest.json"), b"{}").unwrap();
    let e = s.opt.load_state(&dir).unwrap_err().to_string();
    assert!(e.contains("distributed::load_union"), "{e}");
    assert!(e.contains("DataParallel::load_state"), "{e}");
    let after = s.opt.state_dict().unwrap();
    assert_eq!(state_snapshot(&after), state_snapshot(&before));
}
