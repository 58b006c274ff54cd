//! The core of `train_lm`: a built-in corpus, a char-level GPT built with
//! candle-nn, and the training loop (schedule, clipping, optimizer step,
//! evaluation, σ₁ tracking). Included into `tests/train_lm_smoke.rs`,
//! `tests/train_lm_model.rs` and `tests/train_lm_cli.rs`.

#![allow(dead_code)]

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use steepest::clip::clip_grad_norm;
use steepest::distributed::{
    Collective, DataParallel, DataParallelConfig, LocalGroup, ParamGather, ReduceOp,
    ShardedOptimizer,
};
use steepest::optim::{AdamW, AdamWConfig, Driver, Muon, MuonConfig, ParamInfo, Partition};
use steepest::penalty::SpectralNormPenalty;
use steepest::schedule::{DecayShape, Schedule, Scheduled};
use steepest::{power_iteration, Manifold, NewtonSchulz, SteepestConfig, WeightDecay};

// ---------------------------------------------------------------- randomness

/// SplitMix64: a small deterministic generator (the corpus, the batches and
/// the initial weights depend only on the seed).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

// ---------------------------------------------------------------- the corpus

const NAMES: &[&str] = &[
    "ada", "bruno", "clara", "dmitri", "elena", "farid", "greta", "hugo", "ines", "jonas", "kira",
    "leon", "maya", "nils", "olga", "pablo",
];
const CITIES: &[&str] = &[
    "paris", "lagos", "lima", "oslo", "kyoto", "cairo", "quito", "perth",
];
const PETS: &[&str] = &["cat", "dog", "parrot", "turtle", "rabbit", "goat"];
const FOODS: &[&str] = &[
    "rice", "soup", "bread", "figs", "plums", "cheese", "noodles",
];
/// Nouns with their plural.
const NOUNS: &[(&str, &str)] = &[
    ("dog", "dogs"),
    ("child", "children"),
    ("bird", "birds"),
    ("farmer", "farmers"),
    ("mouse", "mice"),
    ("teacher", "teachers"),
];
/// Verbs: (singular, plural) present tense.
const VERBS: &[(&str, &str)] = &[
    ("runs", "run"),
    ("sleeps", "sleep"),
    ("sings", "sing"),
    ("waits", "wait"),
    ("eats", "eat"),
];
const ADJS: &[&str] = &["small", "old", "happy", "quiet", "tall"];
const WORDS: &[&str] = &[
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// A corpus with structure to learn, deterministic from `seed`, about
/// `n_chars` long. Sentences of four kinds, one per line group:
///
/// - facts about recurring named people, fixed per seed (who lives where,
///   owns which pet, likes which food): predicting the attribute needs the name;
/// - subject–verb agreement across an intervening phrase
///   ("the dogs near the farmer sleep."): the verb's number follows the
///   first noun, not the nearest one;
/// - arithmetic facts ("12 plus 7 is 19."), exact;
/// - digits spelled out ("4 is four.").
pub fn builtin_corpus(seed: u64, n_chars: usize) -> String {
    let mut rng = Rng::new(seed);
    // The fixed facts of this "world".
    let city: Vec<&str> = NAMES.iter().map(|_| rng.pick(CITIES)).collect();
    let pet: Vec<&str> = NAMES.iter().map(|_| rng.pick(PETS)).collect();
    let food: Vec<&str> = NAMES.iter().map(|_| rng.pick(FOODS)).collect();
    let mut out = String::with_capacity(n_chars + 128);
    let mut in_line = 0;
    while out.len() < n_chars {
        let s = match rng.below(10) {
            0..=3 => {
                let i = rng.below(NAMES.len());
                match rng.below(3) {
                    0 => format!("{} lives in {}.", NAMES[i], city[i]),
                    1 => format!("{} has a {}.", NAMES[i], pet[i]),
                    _ => format!("{} likes {}.", NAMES[i], food[i]),
                }
            }
            4..=6 => {
                let (n1, n1p) = NOUNS[rng.below(NOUNS.len())];
                let (n2, n2p) = NOUNS[rng.below(NOUNS.len())];
                let (vs, vp) = VERBS[rng.below(VERBS.len())];
                let plural = rng.below(2) == 1;
                let subj = if plural { n1p } else { n1 };
                let other = if rng.below(2) == 1 { n2p } else { n2 };
                let verb = if plural { vp } else { vs };
                let adj = if rng.below(2) == 1 {
                    format!("{} ", rng.pick(ADJS))
                } else {
                    String::new()
                };
                if rng.below(2) == 1 {
                    format!("the {adj}{subj} near the {other} {verb}.")
                } else {
                    format!("the {adj}{subj} {verb}.")
                }
            }
            7..=8 => {
                let (a, b) = (rng.below(20), rng.below(20));
                format!("{a} plus {b} is {}.", a + b)
            }
            _ => {
                let d = rng.below(10);
                format!("{d} is {}.", WORDS[d])
            }
        };
        out.push_str(&s);
        in_line += 1;
        if in_line == 4 {
            out.push('\n');
            in_line = 0;
        } else {
            out.push(' ');
        }
    }
    out
}

/// A tokenised text split into training and validation parts.
#[derive(Clone, Debug)]
pub struct Data {
    /// The characters of the vocabulary, sorted.
    pub vocab: Vec<char>,
    /// Training tokens (the first 90 %).
    pub train: Vec<u32>,
    /// Validation tokens (the last 10 %).
    pub val: Vec<u32>,
}

impl Data {
    /// Char-level tokenisation of `text`, split 90/10.
    pub fn from_text(text: &str, context: usize) -> Result<Self> {
        let mut vocab: Vec<char> = text.chars().collect();
        vocab.sort_unstable();
        vocab.dedup();
        let index: BTreeMap<char, u32> = vocab
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, i as u32))
            .collect();
        let tokens: Vec<u32> = text.chars().map(|c| index[&c]).collect();
        if !Self::long_enough(tokens.len(), context) {
            candle_core::bail!(
                "the text has {} characters: too short for context {context} (needs at least {})",
                tokens.len(),
                Self::min_chars(context)
            );
        }
        let split = Self::split(tokens.len());
        Ok(Self {
            vocab,
            train: tokens[..split].to_vec(),
            val: tokens[split..].to_vec(),
        })
    }

    /// Where a text of `n` tokens splits: the first 90 % train.
    fn split(n: usize) -> usize {
        n * 9 / 10
    }

    /// Whether both parts of a text of `n` characters hold a window of
    /// `context + 1` tokens and one more start (the batches' and the
    /// evaluation's windows start at `0..len - context - 1`).
    fn long_enough(n: usize, context: usize) -> bool {
        let split = Self::split(n);
        split > context + 1 && n - split > context + 1
    }

    /// The fewest characters [`Data::from_text`] accepts for `context` (it
    /// decides with the same test).
    pub fn min_chars(context: usize) -> usize {
        // `long_enough` grows with `n`: the first `n` that passes
        (0..)
            .find(|&n| Self::long_enough(n, context))
            .expect("a long enough text exists")
    }

    /// Decodes tokens back to text.
    pub fn decode(&self, tokens: &[u32]) -> String {
        tokens.iter().map(|&t| self.vocab[t as usize]).collect()
    }
}

/// `(inputs, targets)` of shape `(batch, context)`: windows starting at `starts`.
pub fn batch_at(
    tokens: &[u32],
    starts: &[usize],
    context: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(starts.len() * context);
    let mut y = Vec::with_capacity(starts.len() * context);
    for &s in starts {
        x.extend_from_slice(&tokens[s..s + context]);
        y.extend_from_slice(&tokens[s + 1..s + context + 1]);
    }
    let shape = (starts.len(), context);
    Ok((
        Tensor::from_vec(x, shape, device)?,
        Tensor::from_vec(y, shape, device)?,
    ))
}

// ---------------------------------------------------------------- the model

/// Model and training configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Transformer blocks.
    pub layers: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// Attention heads (`d_model` divisible by it).
    pub heads: usize,
    /// Context length (tokens).
    pub context: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Global gradient-norm clip.
    pub clip: f64,
    /// Weight decay `λ` (decoupled or spectral).
    pub weight_decay: f64,
    /// Learning-rate override (else the optimizer's default).
    pub lr: Option<f64>,
    /// Radius `r` of the spectral sphere `‖W‖₂ = r` (`muon-spectral-sphere`).
    pub radius: f64,
    /// Data-parallel ranks for [`train`] (1: one process, no communication;
    /// N > 1: N in-process ranks, each on `batch / N` sequences).
    pub ranks: usize,
    /// Length in characters of the built-in corpus `builtin_corpus(0, n)`
    /// (a longer corpus from the same generator starts with the shorter one).
    pub corpus_chars: usize,
    /// Stop after this many steps of the `steps`-step schedule (a check of
    /// the first steps of a configuration; `None`: train all of them).
    pub stop_after: Option<usize>,
    /// Fence every timed phase with `device.synchronize()`, so that work the
    /// GPU runs asynchronously is charged to the phase that queued it (see
    /// [`Timing`]). The phases are always timed; on the CPU, whose ops are
    /// synchronous, fencing changes nothing.
    pub timing: bool,
    /// Muon's (and the sphere's) Newton–Schulz in the Gram form
    /// ([`NewtonSchulz::gram_form`]) instead of the standard one.
    pub gram_ns: bool,
    /// Muon's (and the sphere's) Newton–Schulz iterations in bf16
    /// ([`NewtonSchulz::with_compute_dtype`]).
    pub ns_bf16: bool,
    /// The spectral sphere's dual solved per step with up to this many
    /// `msign`s ([`steepest::DualAscent::bracket`]); `None`: one dual step.
    pub sphere_bracket: Option<usize>,
    /// `μ` of the spectral norm penalty `μ/2 Σ σ₁(W)²` over the weight
    /// matrices added to the training loss ([`SpectralNormPenalty`]; `μ`, not
    /// `λ`, to keep it apart from the weight decay); 0: none.
    pub spectral_penalty: f64,
    /// With `ranks > 1`: the all-gather after the owners' step carries each
    /// owner's update rounded to bf16 instead of the f32 parameters
    /// ([`ParamGather::Bf16Updates`]: half its bytes).
    pub bf16_updates: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            layers: 2,
            d_model: 64,
            heads: 4,
            context: 64,
            batch: 16,
            steps: 300,
            eval_every: 20,
            eval_batches: 4,
            clip: 1.0,
            weight_decay: 0.1,
            lr: None,
            radius: DEFAULT_RADIUS,
            ranks: 1,
            corpus_chars: 400_000,
            stop_after: None,
            timing: false,
            gram_ns: false,
            ns_bf16: false,
            spectral_penalty: 0.0,
            sphere_bracket: None,
            bf16_updates: false,
        }
    }
}

impl Config {
    /// The Newton–Schulz schedule of the Muon runs: Muon's quintic, in the
    /// Gram form when [`Config::gram_ns`] is set, in bf16 when
    /// [`Config::ns_bf16`] is.
    pub fn newton_schulz(&self) -> NewtonSchulz {
        let ns = if self.gram_ns {
            NewtonSchulz::muon().gram_form()
        } else {
            NewtonSchulz::muon()
        };
        if self.ns_bf16 {
            ns.with_compute_dtype(DType::BF16)
        } else {
            ns
        }
    }

    /// The presets of `train_lm --preset`: `small` (the default) and `gpu`.
    pub const PRESETS: [&'static str; 2] = ["small", "gpu"];

    /// A preset by name.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "small" => Some(Self::default()),
            "gpu" => Some(Self::gpu()),
            _ => None,
        }
    }

    /// The `gpu` preset: 6 layers, d = 384, 6 heads, context 256 (10.75 M
    /// parameters with the built-in corpus's 39 characters), 600 steps × 64
    /// sequences (16 384 tokens a step, 9.8 M a run), on an 8 M-character
    /// built-in corpus (7.2 M training characters: each is seen about 1.4
    /// times a run).
    ///
    /// Sized for one H200 from FLOPs: a step is ≈ 6·N·tokens = 1.06 TFLOP for
    /// the weights plus 12·layers·context·d·tokens = 0.12 TFLOP for the
    /// attention scores, ≈ 1.17 TFLOP; at a pessimistic 20 TFLOP/s for
    /// candle's f32 path (plain FP32 cuBLAS, unfused element-wise ops) that is
    /// ≈ 60 ms a step, 35 s a run, ≈ 2 min for AdamW, Muon and Muon with
    /// spectral decay together (evaluations: 13 × 4 forward passes a run,
    /// ≈ 1 s); ≈ 3.6 min at 10 TFLOP/s. Not measured on a GPU yet.
    pub fn gpu() -> Self {
        Self {
            layers: 6,
            d_model: 384,
            heads: 6,
            context: 256,
            batch: 64,
            steps: 600,
            eval_every: 50,
            eval_batches: 4,
            corpus_chars: 8_000_000,
            ..Self::default()
        }
    }

    /// Parameters of the model for a vocabulary of `vocab` characters:
    /// token and position embeddings, 12d² + 2d per block (qkv, proj, MLP,
    /// two norm gains), the final norm and the head.
    pub fn param_count(&self, vocab: usize) -> usize {
        let d = self.d_model;
        2 * vocab * d + self.context * d + self.layers * (12 * d * d + 2 * d) + d
    }

    /// The steps a run takes: `steps`, or fewer with `stop_after`.
    pub fn steps_run(&self) -> usize {
        self.stop_after.map_or(self.steps, |n| n.min(self.steps))
    }
}

/// A plain linear map `x Wᵀ` (weights `(out, in)`), no bias.
struct Lin(Tensor);

impl Lin {
    fn new(vb: &VarBuilder, name: &str, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Self(vb.get((d_out, d_in), &format!("{name}.weight"))?))
    }

    /// `x (…, in) → (…, out)`, as one 2-D product (a broadcast product would
    /// materialise a per-batch copy of the weight gradient).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = dims[dims.len() - 1];
        let y = x.reshape(((), d_in))?.matmul(&self.0.t()?)?;
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = self.0.dim(0)?;
        y.reshape(out)
    }
}

/// RMS norm `x·g/√(mean(x²) + ε)` from differentiable ops (candle-nn's fused
/// norms have no backward on the CPU); cheaper than a layer norm.
struct Norm {
    weight: Tensor,
}

impl Norm {
    fn new(vb: &VarBuilder, name: &str, d: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(d, &format!("{name}.weight"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
            .sqrt()?
            .recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)
    }
}

/// Softmax over the last dimension; the max it subtracts is detached (the
/// result does not depend on it), which saves its backward pass.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mean cross-entropy of `logits (n, v)` against `targets (n,)`:
/// `mean(logsumexp(l) − l[target])`, with a detached max shift.
fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let lse = logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&m)?;
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.mean_all()
}

struct Block {
    ln1: Norm,
    qkv: Lin,
    proj: Lin,
    ln2: Norm,
    fc: Lin,
    fc_proj: Lin,
    heads: usize,
}

impl Block {
    fn new(vb: &VarBuilder, i: usize, d: usize, heads: usize) -> Result<Self> {
        let p = format!("h.{i}");
        Ok(Self {
            ln1: Norm::new(vb, &format!("{p}.ln1"), d)?,
            qkv: Lin::new(vb, &format!("{p}.attn.qkv"), d, 3 * d)?,
            proj: Lin::new(vb, &format!("{p}.attn.proj"), d, d)?,
            ln2: Norm::new(vb, &format!("{p}.ln2"), d)?,
            fc: Lin::new(vb, &format!("{p}.mlp.fc"), d, 4 * d)?,
            fc_proj: Lin::new(vb, &format!("{p}.mlp.proj"), 4 * d, d)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self.qkv.forward(&self.ln1.forward(x)?)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = softmax_last(&att.broadcast_add(mask)?)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let x = (x + self.proj.forward(&y)?)?;
        let h = self.fc.forward(&self.ln2.forward(&x)?)?.relu()?;
        x + self.fc_proj.forward(&h)?
    }
}

/// A char-level GPT: token + position embeddings, pre-norm blocks (RMS norm,
/// causal attention, ReLU MLP), final norm, untied output head. Parameter names: `tok_emb.weight`,
/// `pos_emb.weight`, `h.<i>.{ln1,attn.qkv,attn.proj,ln2,mlp.fc,mlp.proj}.weight`,
/// `ln_f.weight`, `lm_head.weight`.
pub struct Gpt {
    tok_emb: Tensor,
    pos_emb: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    head: Lin,
    mask: Tensor,
}

impl Gpt {
    /// Builds the model in `varmap`; weights are then set from `seed`
    /// (candle cannot seed its CPU generator): N(0, 0.02²) embeddings,
    /// U(±1/√fan_in) matrices, unit norm gains.
    pub fn new(
        varmap: &VarMap,
        cfg: &Config,
        vocab: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
        let d = cfg.d_model;
        if cfg.heads == 0 || !d.is_multiple_of(cfg.heads) {
            candle_core::bail!("d_model {d} must be divisible by heads {}", cfg.heads);
        }
        let tok_emb = vb.get((vocab, d), "tok_emb.weight")?;
        let pos_emb = vb.get((cfg.context, d), "pos_emb.weight")?;
        let blocks = (0..cfg.layers)
            .map(|i| Block::new(&vb, i, d, cfg.heads))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = Norm::new(&vb, "ln_f", d)?;
        let head = Lin::new(&vb, "lm_head", d, vocab)?;
        let t = cfg.context;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), device)?;
        init_weights(varmap, seed)?;
        Ok(Self {
            tok_emb,
            pos_emb,
            blocks,
            ln_f,
            head,
            mask,
        })
    }

    /// Logits `(batch, time, vocab)` for tokens `(batch, time)`, `time ≤ context`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        let tok = self.tok_emb.embedding(&tokens.flatten_all()?)?;
        let tok = tok.reshape((tokens.dim(0)?, t, ()))?;
        let mut x = tok.broadcast_add(&self.pos_emb.narrow(0, 0, t)?)?;
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        for b in &self.blocks {
            x = b.forward(&x, &mask)?;
        }
        self.head.forward(&self.ln_f.forward(&x)?)
    }

    /// Mean cross-entropy (nats per character) of next-token prediction.
    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let logits = self.forward(x)?;
        let v = logits.dim(2)?;
        cross_entropy(&logits.reshape(((), v))?, &y.flatten_all()?)
    }
}

/// Sets every variable of `varmap` deterministically from `seed`, by name.
fn init_weights(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("VarMap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = Rng::new(seed.wrapping_mul(7919).wrapping_add(1));
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = if name.ends_with("emb.weight") {
            (0..n).map(|_| (0.02 * rng.normal()) as f32).collect()
        } else if dims.len() == 1 {
            vec![1.0; n] // norm gains
        } else {
            let bound = 1.0 / (dims[1] as f64).sqrt();
            (0..n)
                .map(|_| (bound * (2.0 * rng.unit() - 1.0)) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(vals, dims, var.device())?)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- optimizers

/// Default radius of the spectral sphere for `muon-spectral-sphere` (from a
/// short sweep, see the README).
pub const DEFAULT_RADIUS: f64 = 2.0;

/// The optimizers `train_lm` compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptKind {
    /// AdamW with decoupled decay `W ← (1 − ηλ)W`.
    AdamW,
    /// AdamW with spectral decay `W ← W − ηλ·σ₁u₁v₁ᵀ`.
    AdamWSpectral,
    /// Muon (matrices) + AdamW (embeddings, head, vectors), decoupled decay.
    Muon,
    /// Muon with spectral decay.
    MuonSpectral,
    /// Muon on the spectral sphere `‖W‖₂ = r` ([`Steepest`] with
    /// `Manifold::SpectralSphere`, no weight decay) for the block matrices;
    /// AdamW as in `Muon` for the rest.
    MuonSpectralSphere,
}

impl OptKind {
    /// All of them, in display order.
    pub const ALL: [OptKind; 5] = [
        Self::AdamW,
        Self::AdamWSpectral,
        Self::Muon,
        Self::MuonSpectral,
        Self::MuonSpectralSphere,
    ];

    /// The CLI / CSV name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::AdamW => "adamw",
            Self::AdamWSpectral => "adamw-spectral",
            Self::Muon => "muon",
            Self::MuonSpectral => "muon-spectral",
            Self::MuonSpectralSphere => "muon-spectral-sphere",
        }
    }

    /// Parses a CLI name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether its updates run Newton–Schulz (`--gram-ns` applies to them).
    pub fn uses_newton_schulz(&self) -> bool {
        !matches!(self, Self::AdamW | Self::AdamWSpectral)
    }

    /// The peak learning rate used unless overridden (from a short sweep,
    /// see the README).
    pub fn default_lr(&self) -> f64 {
        match self {
            Self::AdamW | Self::AdamWSpectral => 3e-3,
            Self::Muon | Self::MuonSpectral => 0.02,
            Self::MuonSpectralSphere => DEFAULT_SPHERE_LR,
        }
    }

    /// The weight decay of the AdamW runs, of Muon's matrices and of the
    /// AdamW part of the Muon runs. `muon-spectral-sphere` uses it for its
    /// AdamW part only: its matrices get no decay (the sphere fixes their scale).
    fn decay(&self, lambda: f64) -> WeightDecay {
        match self {
            Self::AdamW | Self::Muon | Self::MuonSpectralSphere => WeightDecay::Decoupled(lambda),
            Self::AdamWSpectral | Self::MuonSpectral => WeightDecay::spectral(lambda),
        }
    }
}

/// Default peak `η` of `muon-spectral-sphere` (the spectral norm of a step).
pub const DEFAULT_SPHERE_LR: f64 = 0.02;

/// AdamW settings shared by the AdamW runs and Muon's internal AdamW.
fn adamw_config(lr: f64, decay: WeightDecay) -> AdamWConfig {
    AdamWConfig {
        lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: decay,
        decay_vectors: false,
    }
}

/// The schedule: 5 % linear warmup (at least one step), then
/// warmup–stable–decay over the rest, its last 20 % decaying linearly
/// towards 0 (the last step runs at `peak / decay`, the WSD schedule's last
/// decay step).
pub fn schedule(peak: f64, steps: usize) -> Result<Schedule> {
    let warmup = (steps / 20).max(1).min(steps);
    let rest = steps - warmup;
    let decay = (rest / 5).max(1);
    Ok(Schedule::wsd(
        peak,
        0.0,
        rest.saturating_sub(decay),
        decay,
        DecayShape::Linear,
    )?
    .with_warmup(warmup)?)
}

// ---------------------------------------------------------------- training

/// One evaluation point.
#[derive(Clone, Debug)]
pub struct Record {
    /// Steps taken.
    pub step: usize,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Mean training loss since the previous record.
    pub train_loss: f64,
    /// Validation loss (nats/char).
    pub val_loss: f64,
    /// σ₁ of each weight matrix, in the order of [`RunResult::matrices`].
    pub sigmas: Vec<f64>,
}

/// The outcome of one training run.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// Which optimizer.
    pub kind: OptKind,
    /// The seed.
    pub seed: u64,
    /// Names of the weight matrices whose σ₁ is tracked.
    pub matrices: Vec<String>,
    /// The evaluation points.
    pub records: Vec<Record>,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The training loss of every step (`losses[i]`: step `i + 1`; over
    /// data-parallel ranks, the mean over the whole batch).
    pub losses: Vec<f64>,
    /// Where the time of the training steps went.
    pub timing: Timing,
}

/// The time of a run's training steps by phase, summed over the timed steps:
/// every step but the first (which loads kernels and warms the allocator),
/// evaluations excluded; step 1 and the evaluations are timed apart. With
/// [`Config::timing`], each phase ends with `device.synchronize()`; reading
/// the loss back ends the forward phase in any case.
#[derive(Clone, Debug, Default)]
pub struct Timing {
    /// Steps timed.
    pub steps: usize,
    /// Tokens trained on in those steps (`steps · batch · context`).
    pub tokens: usize,
    /// Batch upload, forward pass, loss read back (over ranks: and averaged).
    pub forward_s: f64,
    /// `loss.backward()`, and the spectral norm penalty's gradient if any
    /// (its power iteration and rank-one terms, `add_to_grads`).
    pub backward_s: f64,
    /// `clip_grad_norm` (over ranks: 0, the clipping is inside the step).
    pub clip_s: f64,
    /// `opt.step` (over ranks: `DataParallel::step`, with the gradient
    /// averaging, clipping and parameter gathering).
    pub optimizer_s: f64,
    /// Whether the phases were fenced with `device.synchronize()`.
    pub synchronized: bool,
    /// Wall time of step 1, all phases (not in the sums above).
    pub first_step_s: f64,
    /// Seconds in evaluations (validation loss and the σ₁ of every matrix),
    /// the one before step 1 included.
    pub eval_s: f64,
    /// Evaluations done.
    pub evals: usize,
    /// Seconds of the first evaluation (before step 1: it loads the forward
    /// pass's kernels), included in `eval_s`.
    pub first_eval_s: f64,
}

impl Timing {
    /// Seconds of the timed steps, all phases.
    pub fn step_s(&self) -> f64 {
        self.forward_s + self.backward_s + self.clip_s + self.optimizer_s
    }

    /// Milliseconds per timed step, all phases; `None` when no step was
    /// timed.
    pub fn step_ms(&self) -> Option<f64> {
        (self.steps > 0).then(|| 1e3 * self.step_s() / self.steps as f64)
    }

    /// Training throughput over the timed steps; `None` when no step was
    /// timed (a run of one step: step 1 is not).
    pub fn tokens_per_s(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.tokens as f64 / self.step_s())
    }

    /// The optimizer's share of step time, in [0, 1]; `None` when no step
    /// was timed.
    pub fn optimizer_share(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.optimizer_s / self.step_s())
    }

    /// Adds one step's phases (step 1 is kept apart, in `first_step_s`).
    fn add(&mut self, step: usize, tokens: usize, phases: [f64; 4]) {
        if step == 1 {
            self.first_step_s = phases.iter().sum();
            return;
        }
        self.steps += 1;
        self.tokens += tokens;
        self.forward_s += phases[0];
        self.backward_s += phases[1];
        self.clip_s += phases[2];
        self.optimizer_s += phases[3];
    }

    /// Adds one evaluation's seconds.
    fn add_eval(&mut self, seconds: f64) {
        if self.evals == 0 {
            self.first_eval_s = seconds;
        }
        self.evals += 1;
        self.eval_s += seconds;
    }
}

/// Phase clock for [`Timing`]: `lap()` gives the seconds since the last lap,
/// after `device.synchronize()` when fencing.
struct Lap<'a> {
    device: &'a Device,
    fence: bool,
    last: std::time::Instant,
}

impl<'a> Lap<'a> {
    fn new(device: &'a Device, fence: bool) -> Result<Self> {
        if fence {
            device.synchronize()?;
        }
        Ok(Self {
            device,
            fence,
            last: std::time::Instant::now(),
        })
    }

    fn lap(&mut self) -> Result<f64> {
        if self.fence {
            self.device.synchronize()?;
        }
        let now = std::time::Instant::now();
        let s = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        Ok(s)
    }
}

impl RunResult {
    /// The last validation loss.
    pub fn final_val(&self) -> f64 {
        self.records.last().map(|r| r.val_loss).unwrap_or(f64::NAN)
    }
}

/// The runs of a queue as they end, in any order (several threads train
/// them): the finished ones in queue order, and the failed ones. A failure
/// does not lose the other runs: they are reported, then the failures.
#[derive(Debug, Default)]
pub struct Finished {
    /// Queue index of each of `runs`, ascending.
    order: Vec<usize>,
    runs: Vec<RunResult>,
    /// Queue index, `"optimizer seed S"`, the error; by index.
    failed: Vec<(usize, String, String)>,
}

impl Finished {
    /// Run `index` of the queue (`kind`, `seed`) ended with `outcome`.
    pub fn push(
        &mut self,
        index: usize,
        kind: OptKind,
        seed: u64,
        outcome: std::result::Result<RunResult, String>,
    ) {
        match outcome {
            Ok(run) => {
                let at = self.order.partition_point(|&i| i < index);
                self.order.insert(at, index);
                self.runs.insert(at, run);
            }
            Err(e) => {
                let at = self.failed.partition_point(|(i, ..)| *i < index);
                let name = format!("{} seed {seed}", kind.name());
                self.failed.insert(at, (index, name, e));
            }
        }
    }

    /// How many runs have ended (finished or failed).
    pub fn ended(&self) -> usize {
        self.runs.len() + self.failed.len()
    }

    /// The finished runs, in queue order.
    pub fn runs(&self) -> &[RunResult] {
        &self.runs
    }

    /// The failed runs, in queue order: `"optimizer seed S"`.
    pub fn failed_runs(&self) -> Vec<&str> {
        self.failed
            .iter()
            .map(|(_, name, _)| name.as_str())
            .collect()
    }

    /// One line naming every failed run and its error, `None` if none
    /// failed; `total`: the runs in the queue; `aside` follows "failed".
    pub fn error(&self, total: usize, aside: &str) -> Option<String> {
        if self.failed.is_empty() {
            return None;
        }
        let each: Vec<String> = self
            .failed
            .iter()
            .map(|(_, name, e)| format!("{name}: {e}"))
            .collect();
        Some(format!(
            "{} of {total} runs failed{aside}: {}",
            self.failed.len(),
            each.join("; ")
        ))
    }

    /// The finished runs, in queue order.
    pub fn into_runs(self) -> Vec<RunResult> {
        self.runs
    }
}

/// The starts of one training batch: `cfg.batch` starts drawn uniformly
/// from `0..train.len() − context − 1`, so that each window (`context`
/// inputs and their targets) lies in the training split.
pub fn train_starts(rng: &mut Rng, data: &Data, cfg: &Config) -> Vec<usize> {
    let span = data.train.len() - cfg.context - 1;
    (0..cfg.batch).map(|_| rng.below(span)).collect()
}

/// Fixed validation windows: `eval_batches` batches of `batch` window starts,
/// spread evenly over the validation split.
pub fn val_starts(data: &Data, cfg: &Config) -> Vec<Vec<usize>> {
    let span = data.val.len() - cfg.context - 1;
    let total = cfg.eval_batches * cfg.batch;
    (0..cfg.eval_batches)
        .map(|b| {
            (0..cfg.batch)
                .map(|i| (b * cfg.batch + i) * span / total.max(1))
                .collect()
        })
        .collect()
}

fn evaluate(model: &Gpt, data: &Data, cfg: &Config, device: &Device) -> Result<f64> {
    let mut sum = 0.0;
    let starts = val_starts(data, cfg);
    for s in &starts {
        let (x, y) = batch_at(&data.val, s, cfg.context, device)?;
        sum += model.loss(&x, &y)?.to_scalar::<f32>()? as f64;
    }
    Ok(sum / starts.len() as f64)
}

fn sigmas(varmap: &VarMap, names: &[String]) -> Result<Vec<f64>> {
    let data = varmap.data().lock().expect("VarMap lock");
    names
        .iter()
        .map(|n| {
            let w = data[n].as_tensor().detach();
            power_iteration(&w, None, 30)?
                .sigma
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()
        })
        .collect()
}

/// What a run reports after every step: `progress(step, record)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, Option<&Record>);

/// The optimizer of one run: the three types `train_lm` builds.
pub enum Opt {
    AdamW(AdamW),
    Muon(Muon),
    /// The sphere run's `Partition`.
    Driver(Driver),
}

/// Runs `$body` with `$o` bound to the optimizer inside an [`Opt`], whatever
/// its type (the training loops are generic over it).
macro_rules! with_opt {
    ($opt:expr, $o:ident => $body:expr) => {
        match $opt {
            Opt::AdamW($o) => $body,
            Opt::Muon($o) => $body,
            Opt::Driver($o) => $body,
        }
    };
}

impl Opt {
    /// One step of whichever optimizer this is, at its peak rate (the
    /// training loop steps it through [`Scheduled`] instead).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        with_opt!(self, o => o.step(grads))
    }
}

/// One run's seeded model, its optimizer and the learning-rate schedule.
fn model_and_optimizer(
    kind: OptKind,
    seed: u64,
    cfg: &Config,
    data: &Data,
    device: &Device,
) -> Result<(VarMap, Gpt, Opt, Schedule)> {
    let varmap = VarMap::new();
    let model = Gpt::new(&varmap, cfg, data.vocab.len(), seed, device)?;
    let sched = schedule(cfg.lr.unwrap_or(kind.default_lr()), cfg.steps)?;
    let opt = build_optimizer(kind, cfg, &varmap)?;
    Ok((varmap, model, opt, sched))
}

/// The optimizer of `kind` over `varmap`, at the configured (or default) peak rate.
pub fn build_optimizer(kind: OptKind, cfg: &Config, varmap: &VarMap) -> Result<Opt> {
    let lr = cfg.lr.unwrap_or(kind.default_lr());
    let decay = kind.decay(cfg.weight_decay);
    Ok(match kind {
        OptKind::AdamW | OptKind::AdamWSpectral => {
            Opt::AdamW(AdamW::from_varmap(varmap, adamw_config(lr, decay))?)
        }
        OptKind::Muon | OptKind::MuonSpectral => Opt::Muon(Muon::from_varmap(
            varmap,
            MuonConfig {
                lr,
                momentum: 0.95,
                weight_decay: decay,
                // The embeddings and the head go to AdamW, at AdamW's rate.
                adamw: adamw_config(OptKind::AdamW.default_lr() * lr / kind.default_lr(), decay),
                adamw_names: ADAMW_NAMES.iter().map(|s| s.to_string()).collect(),
                newton_schulz: cfg.newton_schulz(),
                ..MuonConfig::default()
            },
        )?),
        OptKind::MuonSpectralSphere => Opt::Driver(sphere_partition(
            varmap,
            SteepestConfig {
                lr,
                manifold: Manifold::SpectralSphere { radius: cfg.radius },
                weight_decay: WeightDecay::None,
                norm: steepest::Norm::Spectral(cfg.newton_schulz()),
                dual: steepest::DualAscent {
                    bracket: cfg.sphere_bracket,
                    ..Default::default()
                },
                ..SteepestConfig::default() // momentum 0.95 Nesterov
            },
            // As Muon's internal AdamW in the `muon` run: AdamW's rate.
            adamw_config(OptKind::AdamW.default_lr() * lr / kind.default_lr(), decay),
        )?),
    })
}

/// Trains one model with one optimizer and seed; `progress(step, record)` is
/// called after every step (`record` at evaluation points). With
/// `cfg.ranks > 1`, data-parallel over that many in-process ranks (threads,
/// see [`train_local_ranks`]).
pub fn train(
    kind: OptKind,
    seed: u64,
    cfg: &Config,
    data: &Data,
    device: &Device,
    progress: &mut dyn FnMut(usize, Option<&Record>),
) -> Result<RunResult> {
    if cfg.ranks > 1 {
        return train_local_ranks(kind, seed, cfg, data, device, progress);
    }
    let (varmap, model, opt, sched) = model_and_optimizer(kind, seed, cfg, data, device)?;
    with_opt!(opt, opt => run(
        Scheduled::new(opt, sched),
        kind,
        seed,
        &varmap,
        &model,
        cfg,
        data,
        device,
        progress,
    ))
}

/// [`train`] on `cfg.ranks` in-process ranks ([`LocalGroup`]: one thread
/// each, rank 0 on the calling thread, which reports `progress`): the same
/// algorithm as `cfg.ranks` processes over NCCL ([`train_rank`]), run on the
/// CPU as a check.
pub fn train_local_ranks(
    kind: OptKind,
    seed: u64,
    cfg: &Config,
    data: &Data,
    device: &Device,
    progress: &mut dyn FnMut(usize, Option<&Record>),
) -> Result<RunResult> {
    let mut comms = LocalGroup::new(cfg.ranks)?.into_iter();
    let first = comms.next().expect("ranks ≥ 1");
    std::thread::scope(|s| {
        let others: Vec<_> = comms
            .map(|c| s.spawn(move || train_rank(c, kind, seed, cfg, data, device, None)))
            .collect();
        // Rank 0's communicator is dropped when it returns, so an error
        // there fails the others' collectives instead of leaving them waiting.
        let mine = train_rank(first, kind, seed, cfg, data, device, Some(progress));
        let mut first_error = None;
        for (i, h) in others.into_iter().enumerate() {
            let r = h.join().unwrap_or_else(|panic| {
                candle_core::bail!("panicked: {}", panic_message(panic.as_ref()))
            });
            if let (Err(e), None) = (r, &first_error) {
                first_error = Some(candle_core::Error::Msg(format!("rank {}: {e}", i + 1)));
            }
        }
        match (mine, first_error) {
            (Ok(Some(r)), None) => Ok(r),
            // Rank 0 failed only because another rank left the group: that
            // rank's error is the cause.
            (Err(e), Some(other)) if left_the_group(&e) => Err(other),
            (Err(e), _) => Err(e),
            (Ok(_), Some(e)) => Err(e),
            (Ok(None), None) => unreachable!("rank 0 returns the run"),
        }
    })
}

/// A panic's message (a `&str` or `String` payload), else "(no message)".
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Whether `e` says that another rank left the group (its communicator
/// was dropped: it returned, failed or panicked), i.e. `e` is a consequence,
/// not a cause.
pub fn left_the_group(e: &candle_core::Error) -> bool {
    e.to_string().contains("left the group")
}

/// One rank's part of a data-parallel run over `comm` (in-process ranks or
/// NCCL): every rank builds the same model and optimizer (same seed), draws
/// the same global batch of `cfg.batch` windows and trains on its slice of
/// `cfg.batch / N` of them; [`DataParallel`] averages the gradients, clips
/// them at global norm `cfg.clip` across ranks, runs each owner's share of
/// the optimizer step (schedule included) and gathers the parameters. Rank 0
/// evaluates, calls `progress` and returns the [`RunResult`]; the other ranks
/// return `None`.
#[allow(clippy::too_many_arguments)]
pub fn train_rank<C: Collective>(
    comm: C,
    kind: OptKind,
    seed: u64,
    cfg: &Config,
    data: &Data,
    device: &Device,
    progress: Option<Progress<'_>>,
) -> Result<Option<RunResult>> {
    let world = comm.world_size();
    if !cfg.batch.is_multiple_of(world) {
        candle_core::bail!(
            "the batch ({}) must be divisible by the number of ranks ({world})",
            cfg.batch
        );
    }
    let (varmap, model, opt, sched) = model_and_optimizer(kind, seed, cfg, data, device)?;
    with_opt!(opt, opt => run_ranked(
        comm,
        Scheduled::new(opt, sched),
        kind,
        seed,
        &varmap,
        &model,
        cfg,
        data,
        device,
        progress,
    ))
}

/// Substrings of the names that the Muon runs route to AdamW (besides the
/// rank-1 norm gains).
const ADAMW_NAMES: [&str; 3] = ["tok_emb", "pos_emb", "lm_head"];

/// Whether `Muon` (with `adamw_names = ADAMW_NAMES`) updates this parameter
/// itself: a matrix that is not an embedding or the head.
fn is_block_matrix(p: &ParamInfo) -> bool {
    p.is_matrix() && !ADAMW_NAMES.iter().any(|s| p.name.contains(s))
}

/// Steepest on the spectral sphere for the block matrices and AdamW for the
/// embeddings, the head and the norm gains (the same split as `Muon`'s
/// internal routing), as one [`Partition`]: one atomic step, one checkpoint,
/// and `set_learning_rate` keeps AdamW's rate ratio.
fn sphere_partition(
    varmap: &VarMap,
    matrices: SteepestConfig,
    rest: AdamWConfig,
) -> Result<Driver> {
    matrices.validate()?;
    rest.validate()?;
    Ok(Partition::by(|p: &ParamInfo| {
        if is_block_matrix(p) {
            "sphere"
        } else {
            "adamw"
        }
    })
    .group("sphere", matrices.chain(), matrices.lr)
    .group("adamw", rest.chain(), rest.lr)
    .build_from_varmap(varmap)?)
}

/// What differs between one process and one rank of a data-parallel run:
/// the share of the batch, the loss reported, clipping and the step.
trait Stepper {
    /// This process's share of the batch's windows.
    fn share<'a>(&self, starts: &'a [usize]) -> &'a [usize];
    /// The whole batch's mean loss, from this share's.
    fn batch_loss(&self, loss: &Tensor) -> Result<f64>;
    /// The learning rate of the coming step.
    fn next_lr(&self) -> f64;
    /// Clips and steps; the seconds of clipping and of the optimizer step.
    fn step(&mut self, grads: GradStore, clock: &mut Lap<'_>) -> Result<[f64; 2]>;
}

/// One process: clip the batch's gradient, then step.
struct Local<O: Optimizer> {
    opt: Scheduled<O>,
    vars: Vec<Var>,
    clip: f64,
}

impl<O: Optimizer> Stepper for Local<O> {
    fn share<'a>(&self, starts: &'a [usize]) -> &'a [usize] {
        starts
    }

    fn batch_loss(&self, loss: &Tensor) -> Result<f64> {
        Ok(loss.to_scalar::<f32>()? as f64)
    }

    fn next_lr(&self) -> f64 {
        self.opt.next_lr()
    }

    fn step(&mut self, mut grads: GradStore, clock: &mut Lap<'_>) -> Result<[f64; 2]> {
        clip_grad_norm(&mut grads, &self.vars, self.clip)?;
        let t_clip = clock.lap()?;
        self.opt.step(&grads)?;
        Ok([t_clip, clock.lap()?])
    }
}

/// One rank of `N`: its `batch / N` windows; [`DataParallel`] averages,
/// clips across ranks and steps.
struct Ranked<C: Collective, O: Optimizer + ShardedOptimizer> {
    dp: DataParallel<C, Scheduled<O>>,
    rank: usize,
    micro: usize,
}

impl<C: Collective, O: Optimizer + ShardedOptimizer> Stepper for Ranked<C, O> {
    fn share<'a>(&self, starts: &'a [usize]) -> &'a [usize] {
        &starts[self.rank * self.micro..(self.rank + 1) * self.micro]
    }

    fn batch_loss(&self, loss: &Tensor) -> Result<f64> {
        // The mean of the equal-size micro-batches' means. The same value on
        // every rank, so all stop together.
        let mean = self
            .dp
            .comm()
            .all_reduce(&loss.detach().reshape(1)?, ReduceOp::Avg)?;
        Ok(mean.to_vec1::<f32>()?[0] as f64)
    }

    fn next_lr(&self) -> f64 {
        self.dp.optimizer().next_lr()
    }

    fn step(&mut self, grads: GradStore, clock: &mut Lap<'_>) -> Result<[f64; 2]> {
        self.dp.step(&grads)?;
        Ok([0.0, clock.lap()?])
    }
}

/// One run in one process.
#[allow(clippy::too_many_arguments)]
fn run<O: Optimizer>(
    opt: Scheduled<O>,
    kind: OptKind,
    seed: u64,
    varmap: &VarMap,
    model: &Gpt,
    cfg: &Config,
    data: &Data,
    device: &Device,
    progress: Progress<'_>,
) -> Result<RunResult> {
    let mut local = Local {
        opt,
        vars: varmap.all_vars(),
        clip: cfg.clip,
    };
    let r = train_loop(
        &mut local,
        kind,
        seed,
        varmap,
        model,
        cfg,
        data,
        device,
        Some(progress),
    )?;
    Ok(r.expect("a run with progress returns its result"))
}

/// The names of the model's matrices, sorted (their σ₁ are recorded).
fn matrix_names(varmap: &VarMap) -> Vec<String> {
    let d = varmap.data().lock().expect("VarMap lock");
    let mut names: Vec<String> = d
        .iter()
        .filter(|(_, v)| v.rank() == 2)
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    names
}

/// [`run`], data-parallel (see [`train_rank`]).
#[allow(clippy::too_many_arguments)]
fn run_ranked<C: Collective, O: Optimizer + ShardedOptimizer>(
    comm: C,
    opt: Scheduled<O>,
    kind: OptKind,
    seed: u64,
    varmap: &VarMap,
    model: &Gpt,
    cfg: &Config,
    data: &Data,
    device: &Device,
    progress: Option<Progress<'_>>,
) -> Result<Option<RunResult>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    // Clipping at the global norm of the averaged gradient, as clip_grad_norm
    // does on the whole batch's gradient in one process.
    let dp_config = DataParallelConfig {
        clip_grad_norm: Some(cfg.clip),
        param_gather: if cfg.bf16_updates {
            ParamGather::Bf16Updates
        } else {
            ParamGather::Parameters
        },
        ..DataParallelConfig::default()
    };
    let mut ranked = Ranked {
        dp: DataParallel::for_optimizer(comm, opt, dp_config)?,
        rank,
        micro: cfg.batch / world,
    };
    train_loop(
        &mut ranked,
        kind,
        seed,
        varmap,
        model,
        cfg,
        data,
        device,
        progress,
    )
}

/// The training loop. Every process draws the whole batch (the seed alone
/// fixes the sequence, so every optimizer and every rank count sees the same
/// data) and trains on its share. With `progress`, evaluates, reports and
/// returns the [`RunResult`]; without (ranks other than 0), `None`.
#[allow(clippy::too_many_arguments)]
fn train_loop(
    stepper: &mut impl Stepper,
    kind: OptKind,
    seed: u64,
    varmap: &VarMap,
    model: &Gpt,
    cfg: &Config,
    data: &Data,
    device: &Device,
    mut progress: Option<Progress<'_>>,
) -> Result<Option<RunResult>> {
    let start = std::time::Instant::now();
    let matrices = matrix_names(varmap);
    let mut rng = Rng::new(seed.wrapping_add(0xDA7A));
    let mut records = Vec::new();
    let (mut loss_sum, mut loss_n) = (0.0, 0usize);
    let record = |step: usize, lr: f64, train_loss: f64| -> Result<Record> {
        Ok(Record {
            step,
            lr,
            train_loss,
            val_loss: evaluate(model, data, cfg, device)?,
            sigmas: sigmas(varmap, &matrices)?,
        })
    };
    let mut timing = Timing {
        synchronized: cfg.timing,
        ..Timing::default()
    };
    if let Some(p) = progress.as_mut() {
        let t = std::time::Instant::now();
        let r0 = record(0, 0.0, f64::NAN)?;
        timing.add_eval(t.elapsed().as_secs_f64());
        p(0, Some(&r0));
        records.push(r0);
    }
    // Every rank adds the same penalty (the same weights, the same power
    // iteration), so the mean over ranks of its gradient is its gradient.
    let mut penalty = if cfg.spectral_penalty > 0.0 {
        Some(SpectralNormPenalty::from_varmap(
            varmap,
            cfg.spectral_penalty,
        )?)
    } else {
        None
    };
    let last = cfg.steps_run();
    let mut losses = Vec::with_capacity(last);
    for step in 1..=last {
        let mut clock = Lap::new(device, cfg.timing)?;
        let starts = train_starts(&mut rng, data, cfg);
        let (x, y) = batch_at(&data.train, stepper.share(&starts), cfg.context, device)?;
        let loss = model.loss(&x, &y)?;
        let loss_val = stepper.batch_loss(&loss)?;
        if !loss_val.is_finite() {
            candle_core::bail!(
                "{}: training loss is {loss_val} at step {step} (diverged)",
                kind.name()
            );
        }
        let t_forward = clock.lap()?;
        let mut grads = loss.backward()?;
        if let Some(p) = penalty.as_mut() {
            p.add_to_grads(&mut grads)?;
        }
        let t_backward = clock.lap()?;
        let lr = stepper.next_lr();
        let [t_clip, t_opt] = stepper.step(grads, &mut clock)?;
        timing.add(
            step,
            cfg.batch * cfg.context,
            [t_forward, t_backward, t_clip, t_opt],
        );
        losses.push(loss_val);
        loss_sum += loss_val;
        loss_n += 1;
        if let Some(p) = progress.as_mut() {
            if step % cfg.eval_every == 0 || step == last {
                let t = std::time::Instant::now();
                let r = record(step, lr, loss_sum / loss_n as f64)?;
                timing.add_eval(t.elapsed().as_secs_f64());
                (loss_sum, loss_n) = (0.0, 0);
                p(step, Some(&r));
                records.push(r);
            } else {
                p(step, None);
            }
        }
    }
    Ok(progress.map(|_| RunResult {
        kind,
        seed,
        matrices,
        records,
        seconds: start.elapsed().as_secs_f64(),
        losses,
        timing,
    }))
}

/// Greedy continuation of `prompt` (for a look at what the model learned).
pub fn sample_greedy(
    model: &Gpt,
    data: &Data,
    cfg: &Config,
    prompt: &str,
    n: usize,
    device: &Device,
) -> Result<String> {
    let index: BTreeMap<char, u32> = data
        .vocab
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, i as u32))
        .collect();
    let mut toks: Vec<u32> = prompt
        .chars()
        .filter_map(|c| index.get(&c).copied())
        .collect();
    if toks.is_empty() {
        candle_core::bail!(
            "sample_greedy: no character of the prompt {prompt:?} is in the vocabulary"
        );
    }
    for _ in 0..n {
        let ctx = &toks[toks.len().saturating_sub(cfg.context)..];
        let x = Tensor::new(ctx, device)?.unsqueeze(0)?;
        let logits = model.forward(&x)?;
        let last = logits.get(0)?.get(ctx.len() - 1)?;
        let next = last.argmax(0)?.to_scalar::<u32>()?;
        toks.push(next);
    }
    Ok(data.decode(&toks))
}
