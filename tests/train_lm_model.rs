//! `examples/train_lm`'s model, batches, schedule and optimizers against
//! independent computations: the logits and the loss of the char-level GPT
//! against a forward pass written out in f64 loops from the formulas (RMS
//! norm, causal multi-head attention, ReLU MLP, cross-entropy), causality,
//! the (input, target) windows, the validation windows, the learning-rate
//! schedule against its stated shape, and which rate and which weight decay
//! each optimizer gives each parameter (one step with a zero gradient leaves
//! only the decay, checked against an f64 SVD).

mod common;
#[path = "../examples/train_lm/lm.rs"]
mod lm;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::AmaxNan;
use lm::{
    batch_at, build_optimizer, sample_greedy, schedule, train_starts, val_starts, Config, Data,
    Gpt, OptKind, Rng,
};
use nalgebra::DMatrix;

/// Two blocks, two heads of width 4, context 6, vocabulary 11.
fn small() -> Config {
    Config {
        layers: 2,
        d_model: 8,
        heads: 2,
        context: 6,
        ..Config::default()
    }
}

const VOCAB: usize = 11;

/// The model of `small()`, with its norm gains set to values away from 1
/// (they start at 1, where a forward pass that left them out would agree).
fn model(seed: u64) -> (VarMap, Gpt) {
    let varmap = VarMap::new();
    let gpt = Gpt::new(&varmap, &small(), VOCAB, seed, &Device::Cpu).unwrap();
    let mut rng = Rng::new(seed + 100);
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.contains("ln") {
            let n = var.dims()[0];
            let g: Vec<f32> = (0..n).map(|_| (0.5 + rng.unit()) as f32).collect();
            var.set(&Tensor::new(g, &Device::Cpu).unwrap()).unwrap();
        }
    }
    (varmap, gpt)
}

/// A variable as an f64 matrix of rows.
fn weight(varmap: &VarMap, name: &str) -> Vec<Vec<f64>> {
    let data = varmap.data().lock().unwrap();
    let t = data[name].as_tensor().to_dtype(DType::F64).unwrap();
    match t.rank() {
        1 => vec![t.to_vec1().unwrap()],
        _ => t.to_vec2().unwrap(),
    }
}

/// `x Wᵀ` for one row `x` and `W (out, in)`.
fn lin(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter()
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// `x·g/√(mean(x²) + 1e-5)`.
fn rms(x: &[f64], g: &[f64]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + 1e-5).sqrt();
    x.iter().zip(g).map(|(v, gi)| v * inv * gi).collect()
}

fn add(a: &mut [f64], b: &[f64]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// Logits `(t, vocab)` of one sequence, from the formulas: token plus
/// position embedding; per block `x += proj(attn(rms₁(x)))`,
/// `x += fc_proj(relu(fc(rms₂(x))))`, attention per head `softmax(q kᵀ/√hd)`
/// over positions `s ≤ t`; then `lm_head(rms_f(x))`.
fn reference_logits(varmap: &VarMap, cfg: &Config, tokens: &[u32]) -> Vec<Vec<f64>> {
    let (d, heads) = (cfg.d_model, cfg.heads);
    let hd = d / heads;
    let tok = weight(varmap, "tok_emb.weight");
    let pos = weight(varmap, "pos_emb.weight");
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .enumerate()
        .map(|(t, &c)| {
            let mut r = tok[c as usize].clone();
            add(&mut r, &pos[t]);
            r
        })
        .collect();
    for i in 0..cfg.layers {
        let w = |n: &str| weight(varmap, &format!("h.{i}.{n}.weight"));
        let (g1, qkv_w, proj_w) = (w("ln1"), w("attn.qkv"), w("attn.proj"));
        let (g2, fc_w, fc_proj_w) = (w("ln2"), w("mlp.fc"), w("mlp.proj"));
        let qkv: Vec<Vec<f64>> = x.iter().map(|r| lin(&qkv_w, &rms(r, &g1[0]))).collect();
        let mut y = vec![vec![0.0; d]; x.len()];
        for h in 0..heads {
            let q = |t: usize| &qkv[t][h * hd..(h + 1) * hd];
            let k = |t: usize| &qkv[t][d + h * hd..d + (h + 1) * hd];
            let v = |t: usize| &qkv[t][2 * d + h * hd..2 * d + (h + 1) * hd];
            for (t, yt) in y.iter_mut().enumerate() {
                let scores: Vec<f64> = (0..=t)
                    .map(|s| q(t).iter().zip(k(s)).map(|(a, b)| a * b).sum::<f64>())
                    .map(|a| a / (hd as f64).sqrt())
                    .collect();
                let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|a| (a - top).exp()).collect();
                let z: f64 = e.iter().sum();
                for (s, es) in e.iter().enumerate() {
                    for (yj, vj) in yt[h * hd..(h + 1) * hd].iter_mut().zip(v(s)) {
                        *yj += es / z * vj;
                    }
                }
            }
        }
        for (xt, yt) in x.iter_mut().zip(&y) {
            add(xt, &lin(&proj_w, yt));
            let f: Vec<f64> = lin(&fc_w, &rms(xt, &g2[0]))
                .into_iter()
                .map(|a| a.max(0.0))
                .collect();
            add(xt, &lin(&fc_proj_w, &f));
        }
    }
    let (gf, head) = (
        weight(varmap, "ln_f.weight"),
        weight(varmap, "lm_head.weight"),
    );
    x.iter().map(|r| lin(&head, &rms(r, &gf[0]))).collect()
}

/// Mean over positions of `logsumexp(logits) − logits[target]`.
fn reference_loss(logits: &[Vec<f64>], targets: &[u32]) -> f64 {
    let per: Vec<f64> = logits
        .iter()
        .zip(targets)
        .map(|(l, &y)| {
            let top = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = top + l.iter().map(|a| (a - top).exp()).sum::<f64>().ln();
            lse - l[y as usize]
        })
        .collect();
    per.iter().sum::<f64>() / per.len() as f64
}

fn random_tokens(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(VOCAB) as u32).collect()
}

#[test]
fn logits_and_loss_match_an_f64_forward_pass() {
    let cfg = small();
    for seed in [1, 2] {
        let (varmap, gpt) = model(seed);
        let mut rng = Rng::new(seed);
        let (b, t) = (3, cfg.context);
        let tokens = random_tokens(&mut rng, b * t);
        let targets = random_tokens(&mut rng, b * t);
        let x = Tensor::from_vec(tokens.clone(), (b, t), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(targets.clone(), (b, t), &Device::Cpu).unwrap();
        let logits: Vec<Vec<Vec<f32>>> = gpt.forward(&x).unwrap().to_vec3().unwrap();
        let mut want_all = Vec::new();
        for (i, seq) in logits.iter().enumerate() {
            let want = reference_logits(&varmap, &cfg, &tokens[i * t..(i + 1) * t]);
            for (row, want_row) in seq.iter().zip(&want) {
                for (got, want) in row.iter().zip(want_row) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "seed {seed}, sequence {i}: logit {got} vs f64 {want}"
                    );
                }
            }
            want_all.extend(want);
        }
        let loss = gpt.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = reference_loss(&want_all, &targets);
        assert!(
            (loss - want).abs() < 1e-5 * want,
            "seed {seed}: loss {loss} vs f64 {want}"
        );
    }
}

/// Shorter sequences than the context use the first positions (the forward
/// pass narrows the position embedding and the mask).
#[test]
fn a_shorter_sequence_matches_the_f64_forward_pass() {
    let cfg = small();
    let (varmap, gpt) = model(3);
    let tokens = random_tokens(&mut Rng::new(3), 4);
    let x = Tensor::from_vec(tokens.clone(), (1, 4), &Device::Cpu).unwrap();
    let got: Vec<Vec<f32>> = gpt
        .forward(&x)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let want = reference_logits(&varmap, &cfg, &tokens);
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
    }
}

/// Position `t`'s logits depend on tokens `0..=t` only, and on token `t`
/// itself (so the mask neither lets the future in nor shuts the present
/// out).
#[test]
fn the_model_is_causal() {
    let cfg = small();
    let (_, gpt) = model(4);
    let mut rng = Rng::new(4);
    let t = cfg.context;
    let logits = |tokens: &[u32]| -> Vec<Vec<f32>> {
        let x = Tensor::from_vec(tokens.to_vec(), (1, t), &Device::Cpu).unwrap();
        gpt.forward(&x)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let base = random_tokens(&mut rng, t);
    let before = logits(&base);
    for changed in 0..t {
        let mut other = base.clone();
        other[changed] = (base[changed] + 1 + rng.below(VOCAB - 1) as u32) % VOCAB as u32;
        let after = logits(&other);
        for pos in 0..t {
            let moved = before[pos]
                .iter()
                .zip(&after[pos])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            if pos < changed {
                assert_eq!(moved, 0.0, "token {changed} changed the logits at {pos}");
            } else {
                assert!(
                    moved > 1e-4,
                    "token {changed} left the logits at {pos} alone"
                );
            }
        }
    }
}

/// The target of each input position is the next token of the text.
#[test]
fn targets_are_the_next_tokens() {
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 % 13) as u32).collect();
    let starts = [0, 5, 29];
    let (x, y) = batch_at(&tokens, &starts, 10, &Device::Cpu).unwrap();
    let (x, y): (Vec<Vec<u32>>, Vec<Vec<u32>>) = (x.to_vec2().unwrap(), y.to_vec2().unwrap());
    for (b, &s) in starts.iter().enumerate() {
        for i in 0..10 {
            assert_eq!(x[b][i], tokens[s + i]);
            assert_eq!(y[b][i], tokens[s + i + 1]);
        }
    }
}

/// The training batches draw their windows from the whole training split
/// (first to last window that fits), and only from there.
#[test]
fn training_windows_come_from_the_whole_training_split() {
    let cfg = Config {
        batch: 8,
        ..small()
    };
    let text: String = (0..400)
        .map(|i| (b'a' + (i * 7 % 11) as u8) as char)
        .collect();
    let data = Data::from_text(&text, cfg.context).unwrap();
    let mut rng = Rng::new(5);
    let starts: Vec<usize> = (0..100)
        .flat_map(|_| train_starts(&mut rng, &data, &cfg))
        .collect();
    assert_eq!(starts.len(), 800);
    let span = data.train.len() - cfg.context - 1;
    let (lo, hi) = (*starts.iter().min().unwrap(), *starts.iter().max().unwrap());
    assert!(hi < span, "a window past the split: start {hi} of {span}");
    assert!(
        lo < span / 20 && hi >= span - span / 20,
        "starts only in {lo}..={hi} of 0..{span}"
    );
    assert!(batch_at(&data.train, &starts, cfg.context, &Device::Cpu).is_ok());
}

/// The validation windows: `eval_batches` batches of `batch` distinct
/// windows, in increasing order, spread from the start of the split to its
/// end, each with its target inside the split.
#[test]
fn validation_windows_are_distinct_and_spread_over_the_split() {
    let cfg = Config {
        context: 16,
        batch: 8,
        eval_batches: 4,
        ..Config::default()
    };
    let text: String = (0..4000)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    let data = Data::from_text(&text, cfg.context).unwrap();
    let windows = val_starts(&data, &cfg);
    assert_eq!(windows.len(), cfg.eval_batches);
    let all: Vec<usize> = windows.concat();
    assert_eq!(all.len(), cfg.eval_batches * cfg.batch);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    let span = data.val.len() - cfg.context - 1;
    assert_eq!(all[0], 0);
    let last = *all.last().unwrap();
    assert!(
        last < span && last >= span - span / all.len() - 1,
        "{last} of {span}"
    );
    assert!(batch_at(&data.val, &all, cfg.context, &Device::Cpu).is_ok());
}

/// `schedule(peak, steps)` is what its doc says: a linear warmup over the
/// first 5 % of the steps (at least one) to `peak`, then warmup–stable–decay
/// over the rest, its last 20 % (at least one step) falling linearly to 0.
#[test]
fn schedule_warms_up_over_5_percent_and_decays_over_the_last_20_percent() {
    let peak = 0.02;
    for steps in [7, 100, 300, 1001] {
        let w = (steps / 20).max(1);
        let rest = steps - w;
        let decay = (rest / 5).max(1);
        let stable = rest - decay;
        let want = |s: usize| -> f64 {
            if s < w {
                peak * (s + 1) as f64 / w as f64
            } else if s < w + stable {
                peak
            } else {
                peak * (1.0 - (s - w - stable) as f64 / decay as f64)
            }
        };
        let got = schedule(peak, steps).unwrap().rates(steps + 1);
        for (s, g) in got.iter().enumerate().take(steps) {
            assert!(
                (g - want(s)).abs() < 1e-12,
                "{steps} steps, step {s}: {g} vs {}",
                want(s)
            );
        }
        assert_eq!(
            got[steps], 0.0,
            "{steps} steps: the rate after the last step"
        );
    }
}

/// The f64 matrix of a tensor (rank 2) or a row (rank 1).
fn dmatrix(t: &Tensor) -> DMatrix<f64> {
    match t.rank() {
        1 => common::to_dmatrix(&t.unsqueeze(0).unwrap()),
        _ => common::to_dmatrix(t),
    }
}

/// One step of each run's optimizer with a zero gradient leaves only the
/// weight decay: the block matrices get the run's rate `η` and its decay
/// (`−ηλW` decoupled, `−ηλ·W v vᵀ` spectral: rank one, `‖·‖₂ ≤ ηλσ₁`), the
/// sphere run puts them on `‖W‖₂ = r` instead; the embeddings and the head
/// go to AdamW at AdamW's rate (scaled with an `lr` override) with the same
/// kind of decay; the norm gains are not decayed.
#[test]
fn each_optimizer_gives_each_parameter_its_rate_and_decay() {
    for lr in [None, Some(0.04)] {
        let cfg = Config { lr, ..small() };
        for kind in OptKind::ALL {
            let varmap = VarMap::new();
            Gpt::new(&varmap, &cfg, VOCAB, 7, &Device::Cpu).unwrap();
            let vars: Vec<(String, candle_core::Var)> = {
                let data = varmap.data().lock().unwrap();
                data.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
            };
            let before: Vec<DMatrix<f64>> =
                vars.iter().map(|(_, v)| dmatrix(v.as_tensor())).collect();
            let zero = vars
                .iter()
                // (× a zero tensor, not × 0.0: candle drops a scaling by 0 from the graph)
                .map(|(_, v)| {
                    let t = v.as_tensor();
                    (t * t.zeros_like().unwrap()).unwrap().sum_all().unwrap()
                })
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            let mut opt = build_optimizer(kind, &cfg, &varmap).unwrap();
            opt.step(&zero.backward().unwrap()).unwrap();

            let eta = cfg.lr.unwrap_or(kind.default_lr());
            let adamw_run = matches!(kind, OptKind::AdamW | OptKind::AdamWSpectral);
            let eta_adamw = if adamw_run {
                eta
            } else {
                OptKind::AdamW.default_lr() * eta / kind.default_lr()
            };
            let spectral = matches!(kind, OptKind::AdamWSpectral | OptKind::MuonSpectral);
            let lambda = cfg.weight_decay;
            for ((name, var), w) in vars.iter().zip(&before) {
                let what = format!("{} (lr {lr:?}), {name}", kind.name());
                let after = dmatrix(var.as_tensor());
                let delta = &after - w;
                if w.nrows() == 1 {
                    assert_eq!(delta.amax_nan(), 0.0, "{what}: a norm gain moved");
                    continue;
                }
                let block = name.starts_with("h.");
                if block && kind == OptKind::MuonSpectralSphere {
                    let s1 = common::singular_values(&after)[0];
                    assert!(
                        (s1 - cfg.radius).abs() < 1e-3 * cfg.radius,
                        "{what}: σ₁ {s1}"
                    );
                    continue;
                }
                let coeff = lambda * if block { eta } else { eta_adamw };
                if spectral {
                    let s_d = common::singular_values(&delta);
                    assert!(
                        s_d[1] < 1e-2 * s_d[0],
                        "{what}: the decay is not rank one: {s_d:?}"
                    );
                    let top = coeff * common::singular_values(w)[0];
                    assert!(
                        s_d[0] <= top * (1.0 + 1e-3) && s_d[0] >= 0.8 * top,
                        "{what}: ‖decay‖₂ {} vs ηλσ₁ {top}",
                        s_d[0]
                    );
                } else {
                    let err = (&delta + w * coeff).norm() / (w * coeff).norm();
                    assert!(
                        err < 1e-2,
                        "{what}: not −ηλW with ηλ = {coeff} (relative error {err})"
                    );
                }
            }
        }
    }
}

/// `sample_greedy` appends, one at a time, the most likely next character
/// under the f64 forward pass of (at most) the last `context` characters.
#[test]
fn greedy_sampling_follows_the_f64_argmax() {
    let cfg = small();
    let text: String = (0..400)
        .map(|i| (b'a' + (i * 7 % VOCAB) as u8) as char)
        .collect();
    let data = Data::from_text(&text, cfg.context).unwrap();
    assert_eq!(data.vocab.len(), VOCAB);
    let (varmap, gpt) = model(6);
    let prompt = "abcdefghij"; // longer than the context
    let got = sample_greedy(&gpt, &data, &cfg, prompt, 5, &Device::Cpu).unwrap();
    let mut tokens: Vec<u32> = prompt.bytes().map(|b| (b - b'a') as u32).collect();
    for _ in 0..5 {
        let ctx = &tokens[tokens.len().saturating_sub(cfg.context)..];
        let logits = reference_logits(&varmap, &cfg, ctx);
        let last = logits.last().unwrap();
        let next = (0..VOCAB)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap();
        tokens.push(next as u32);
    }
    assert_eq!(got, data.decode(&tokens));
}
