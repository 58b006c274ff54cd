//! gpu_bench: the steepest side of issue #11's GPU benchmark, as JSON.
//!
//! Measures, on the GPT-2-small matrix set (12 layers of 768×2304, 768×768,
//! 768×3072, 3072×768) and a 1B-class set (d = 2048, 16 layers, MLP 8192:
//! 2048×6144, 2048×2048, 2048×8192, 8192×2048), parameters in f32:
//!
//! - `msign_bf16/<n>`: [`msign`] alone on a bf16 square `n×n` (1024, 4096,
//!   8192), Newton–Schulz with Keller Jordan's quintic × 5 and bf16 operands;
//! - `ns_set/<set>`: [`msign`] over the set, one `(b, m, n)` batch per shape
//!   (f32 input, bf16 operands: what a Muon step orthogonalises);
//! - `muon_step/<set>`: one full [`Muon`] step (momentum, Newton–Schulz with
//!   bf16 operands, decoupled decay 0.1, update) through
//!   `candle_nn::Optimizer::step` with a fixed `GradStore`;
//! - `ns_set_gram/<set>`, `muon_step_gram/<set>`: the same in the Gram form
//!   of Newton–Schulz (`NewtonSchulz::gram_form`; the square matrices keep
//!   the standard form), with the standard form's FLOPs as the floor;
//! - `ns_set_tiles{1,2,8}/<set>` (CUDA only): `ns_set` with the symmetric
//!   products cut into 1, 2 or 8 tile rows instead of the default (about
//!   4), to choose the default on the GPU at hand;
//! - `power_iteration_x10/<set>`: [`power_iteration`] with 10 iterations on
//!   each same-shape batch `(b, m, n)`, started from a fixed random vector;
//! - `adamw/<set>`, `adamw_spectral/<set>`: one [`AdamW`] step with decoupled
//!   decay 0.1, and with spectral decay 0.1 (one warm-started power iteration
//!   per matrix per step);
//! - `ceiling/matmul_bf16` (8192³) and `ceiling/copy` (1 GiB) through candle,
//!   for reference (the PyTorch script measures the ceilings the targets use).
//!
//! Each rep is timed on the host clock around the call and a
//! `Device::synchronize` (the device is idle when a rep starts); the JSON has
//! the median, min, mean and every rep's time. Standard FLOPs, bytes and the
//! conventions are written into the JSON (see `CONVENTIONS`). The file is
//! rewritten after every workload, so a crash keeps what was measured.
//! `bench/torch_reference.py` measures PyTorch on the same shapes with the
//! same schema; `scripts/gpu_bench_table.py` turns both into the table.
//!
//!     cargo run --release --features cuda --example gpu_bench -- --out gpu_bench_steepest.json
//!     cargo run --example gpu_bench -- --device cpu --quick --out /tmp/q.json   # smoke run, seconds
//!
//! `--quick` uses tiny shapes (same workload names) and 3 reps. Without
//! feature `cuda` only `--device cpu` works. Exit status 2: `--out` cannot
//! be written (checked before anything is measured) or `--only` matches no
//! workload; 1: a write of `--out` failed during the run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use clap::Parser;
use serde_json::{json, Value};
use steepest::device::msign_device_work;
use steepest::linalg::{msign, power_iteration, NewtonSchulz};
use steepest::optim::NamedVar;
use steepest::{AdamW, AdamWConfig, Muon, MuonConfig, WeightDecay};

/// How the derived numbers are counted; copied into the JSON.
const CONVENTIONS: &[(&str, &str)] = &[
    (
        "timing",
        "per rep: host clock around the call and a device synchronize (the device is idle \
         when a rep starts); warm-up calls first; median over the reps",
    ),
    (
        "ns_flops",
        "standard FLOPs of Newton-Schulz: per step and per m x n matrix with s = min(m,n), \
         l = max(m,n): X X^T 2 s^2 l + A A 2 s^3 + (bA + cA^2) X 2 s^2 l = 4 s^2 l + 2 s^3; \
         times steps (5) and batch; elementwise work not counted",
    ),
    (
        "flops_issued",
        "GEMM FLOPs the CUDA path actually issues for the msign part (steepest::device::\
         msign_device_work: symmetric products on one triangle of tiles, the Gram form's \
         products); tflops_issued = flops_issued / median, the rate the GEMMs ran at",
    ),
    (
        "pi_bytes",
        "power iteration: one read of W per iteration: iters * sum(b m n) * bytes per element",
    ),
    (
        "pi_bytes_read",
        "power iteration: every pass over W the kernels make: iters + 1 (the final sigma/u pass) \
         per tall or square matrix, iters + 2 (the first u = W v too) per wide one; \
         gbps_read = bytes_read / median",
    ),
    (
        "adamw_bytes",
        "AdamW, f32: read w, g, m, v and write w, m, v: 28 bytes per parameter",
    ),
    (
        "copy_gbps",
        "copy: (bytes read + bytes written) / time, i.e. 2 x buffer size / time",
    ),
    ("matmul_tflops", "2 n^3 / time for an n x n x n product"),
    (
        "optimizer_steps",
        "muon_step, adamw and adamw_spectral time whole steps of steepest's optimizers, \
         which check every gradient for NaN/Inf before changing anything (one more read of \
         each gradient and one host sync per step: 4 more bytes per parameter for f32 AdamW, \
         on top of the 28 counted); torch.optim's steps make no such check",
    ),
];

/// The check of an msign output `(m, n)` or `(b, m, n)`: the largest
/// singular value of its first matrix, by 30 power iterations. Keller
/// Jordan's quintic leaves the singular values in about [0.7, 1.2], so one
/// outside [0.5, 1.5] (or not finite) is a wrong output, not a slow one.
fn check_msign(out: &Tensor) -> Result<String> {
    let x = out.to_dtype(DType::F32)?;
    let x = if x.rank() == 3 { x.get(0)? } else { x };
    let (m, n) = x.dims2()?;
    let sigma = power_iteration(&x, None, 30)?
        .sigma
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if !(0.5..=1.5).contains(&sigma) {
        bail!("σ_max of the first {m}×{n} output is {sigma}, outside [0.5, 1.5]");
    }
    Ok(format!("{m}×{n}: σ_max {sigma:.3}"))
}

/// Keller Jordan's quintic × 5 (`NewtonSchulz::muon`), as in torch.optim.Muon.
const NS_STEPS: usize = 5;

/// gpu_bench — time steepest's Muon, msign, power iteration and AdamW on the
/// GPT-2-small and 1B-class matrix sets; JSON out
#[derive(Parser, Debug)]
#[command(name = "gpu_bench")]
struct Cli {
    /// Device (cuda needs `--features cuda`)
    #[arg(long, value_name = "DEV", default_value = "cuda", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Tiny shapes and 3 reps (unless --reps): a smoke run in seconds
    #[arg(long)]
    quick: bool,
    /// Write the JSON here (rewritten after every workload; checked writable
    /// before anything is measured)
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Timed repetitions per workload [default: 20, 3 with --quick]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    reps: Option<u64>,
    /// Untimed warm-up calls per workload [default: 3, 1 with --quick]
    #[arg(long, value_name = "N")]
    warmup: Option<u64>,
    /// Only the workloads whose name contains one of these (comma-separated)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    only: Vec<String>,
    /// Leave the CUDA memory pool as candle sets it (freed memory goes back to
    /// the driver at every synchronisation) instead of
    /// `steepest::device::cuda::retain_freed_memory`
    #[arg(long)]
    release_freed_memory: bool,
}

/// A set of weight matrices: `layers` copies of each `(rows, cols)`.
struct MatSet {
    name: &'static str,
    layers: usize,
    kinds: [(&'static str, (usize, usize)); 4],
}

impl MatSet {
    fn gpt2_small(quick: bool) -> Self {
        let (layers, d) = if quick { (2, 32) } else { (12, 768) };
        Self::transformer("gpt2_small", layers, d)
    }

    fn one_b(quick: bool) -> Self {
        let (layers, d) = if quick { (2, 64) } else { (16, 2048) };
        Self::transformer("1b", layers, d)
    }

    /// A transformer block's four matrix kinds at width `d` (MLP 4d), `layers` times.
    fn transformer(name: &'static str, layers: usize, d: usize) -> Self {
        Self {
            name,
            layers,
            kinds: [
                ("qkv", (d, 3 * d)),
                ("proj", (d, d)),
                ("fc", (d, 4 * d)),
                ("fc_proj", (4 * d, d)),
            ],
        }
    }

    /// `[b, m, n]` per same-shape group.
    fn shapes(&self) -> Vec<[usize; 3]> {
        self.kinds
            .iter()
            .map(|&(_, (m, n))| [self.layers, m, n])
            .collect()
    }

    fn params(&self) -> usize {
        self.shapes().iter().map(|[b, m, n]| b * m * n).sum()
    }
}

/// Standard FLOPs of `NS_STEPS` Newton–Schulz steps on a batch `(b, m, n)`.
fn ns_flops(&[b, m, n]: &[usize; 3]) -> f64 {
    let (s, l) = (m.min(n) as f64, m.max(n) as f64);
    NS_STEPS as f64 * (4.0 * s * s * l + 2.0 * s * s * s) * b as f64
}

/// One workload's result.
struct Rec {
    name: String,
    shapes: Vec<[usize; 3]>,
    dtype: &'static str,
    notes: String,
    flops: Option<f64>,
    /// GEMM FLOPs the CUDA path issues (`steepest::device::msign_device_work`).
    flops_issued: Option<f64>,
    bytes_read: Option<f64>,
    bytes: Option<f64>,
    times: Vec<f64>,
    error: Option<String>,
    /// What the check of the workload's output found (`Bench::run_checked`).
    check: Option<String>,
}

impl Rec {
    fn new(name: String, shapes: Vec<[usize; 3]>, dtype: &'static str) -> Self {
        Self {
            name,
            shapes,
            dtype,
            notes: String::new(),
            flops: None,
            flops_issued: None,
            bytes_read: None,
            bytes: None,
            times: Vec::new(),
            error: None,
            check: None,
        }
    }

    fn notes(mut self, s: &str) -> Self {
        self.notes = s.to_string();
        self
    }

    fn flops(mut self, f: f64) -> Self {
        self.flops = Some(f);
        self
    }

    /// The GEMM FLOPs the CUDA path issues for msign under `ns` on `shapes`
    /// (only when the bench runs on CUDA: the CPU path runs other products),
    /// with `tiles` tile rows per symmetric product (`None`: the default).
    fn issued(mut self, ns: &NewtonSchulz, cuda: bool, tiles: Option<usize>) -> Self {
        if !cuda {
            return self;
        }
        self.flops_issued = self
            .shapes
            .iter()
            .map(|&[b, m, n]| {
                let tile = tiles.map(|t| tile_rows(m.min(n), t));
                msign_device_work(b, m, n, ns, tile).map(|w| w.gemm_flops)
            })
            .sum::<steepest::Result<f64>>()
            .ok();
        self
    }

    fn bytes(mut self, b: f64) -> Self {
        self.bytes = Some(b);
        self
    }

    /// Bytes of W the power-iteration kernels read for `iters` iterations
    /// of f32 matrices (see `pi_bytes_read`).
    fn power_bytes_read(mut self, iters: usize) -> Self {
        let read = |&[b, m, n]: &[usize; 3]| {
            let passes = iters + 1 + usize::from(n > m);
            (passes * b * m * n * 4) as f64
        };
        self.bytes_read = Some(self.shapes.iter().map(read).sum());
        self
    }

    fn to_json(&self) -> Value {
        let mut sorted = self.times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = (!sorted.is_empty()).then(|| {
            let k = sorted.len();
            if k % 2 == 1 {
                sorted[k / 2]
            } else {
                0.5 * (sorted[k / 2 - 1] + sorted[k / 2])
            }
        });
        let mean = (!sorted.is_empty()).then(|| sorted.iter().sum::<f64>() / sorted.len() as f64);
        let (workload, set) = self.name.split_once('/').unwrap_or((&self.name, ""));
        json!({
            "name": self.name,
            "workload": workload,
            "set": set,
            "impl": "steepest",
            "shapes": self.shapes,
            "dtype": self.dtype,
            "notes": self.notes,
            "reps": self.times.len(),
            "median_s": median,
            "min_s": sorted.first(),
            "mean_s": mean,
            "times_s": self.times,
            "check": self.check,
            "flops": self.flops,
            "flops_issued": self.flops_issued,
            "tflops_issued": match (self.flops_issued, median) { (Some(f), Some(t)) => Some(f / t / 1e12), _ => None },
            "bytes": self.bytes,
            "bytes_read": self.bytes_read,
            "gbps_read": match (self.bytes_read, median) { (Some(b), Some(t)) => Some(b / t / 1e9), _ => None },
            "tflops": match (self.flops, median) { (Some(f), Some(t)) => Some(f / t / 1e12), _ => None },
            "gbps": match (self.bytes, median) { (Some(b), Some(t)) => Some(b / t / 1e9), _ => None },
            "error": self.error,
        })
    }
}

/// The run: device, settings, results so far.
struct Bench {
    dev: Device,
    reps: usize,
    warmup: usize,
    quick: bool,
    only: Vec<String>,
    out: Option<PathBuf>,
    device_name: String,
    /// Whether `retain_freed_memory` was called (CUDA, no --release-freed-memory).
    pool_keeps_freed_memory: bool,
    records: Vec<Value>,
    /// Every workload name met, wanted or not (for an `--only` that matches none).
    seen: Vec<String>,
    /// Writes of `out` that failed, and whether the latest one succeeded.
    writes_failed: usize,
    last_write_ok: bool,
}

impl Bench {
    fn wanted(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| name.contains(s.as_str()))
    }

    /// Times `f` (after `prepare` builds its state), records the result or
    /// the error, prints one line and rewrites the JSON.
    fn run<S>(
        &mut self,
        rec: Rec,
        prepare: impl FnOnce(&Device) -> Result<S>,
        f: impl FnMut(&mut S) -> Result<()>,
    ) {
        self.run_checked(rec, prepare, f, |_| Ok(None));
    }

    /// [`Bench::run`], then `check` on the state (outside the timed
    /// region): its note goes into the record's `check`, and its error
    /// fails the record, so that a fast but wrong output is not reported
    /// as a time.
    fn run_checked<S>(
        &mut self,
        rec: Rec,
        prepare: impl FnOnce(&Device) -> Result<S>,
        mut f: impl FnMut(&mut S) -> Result<()>,
        check: impl FnOnce(&mut S) -> Result<Option<String>>,
    ) {
        self.seen.push(rec.name.clone());
        if !self.wanted(&rec.name) {
            return;
        }
        let mut rec = rec;
        let mut check_note = None;
        let res = prepare(&self.dev).and_then(|mut state| {
            for _ in 0..self.warmup {
                f(&mut state)?;
            }
            self.dev.synchronize()?;
            let mut times = Vec::with_capacity(self.reps);
            for _ in 0..self.reps {
                let t = Instant::now();
                f(&mut state)?;
                self.dev.synchronize()?;
                times.push(t.elapsed().as_secs_f64());
            }
            check_note = check(&mut state).context("output check failed")?;
            Ok(times)
        });
        rec.check = check_note;
        match res {
            Ok(times) => rec.times = times,
            Err(e) => rec.error = Some(format!("{e:#}")),
        }
        let v = rec.to_json();
        match (&rec.error, v["median_s"].as_f64()) {
            (Some(e), _) => println!("{:<32} ERROR {e}", rec.name),
            (None, Some(t)) => {
                let mut line = format!("{:<32} {:>10.3} ms", rec.name, t * 1e3);
                if let Some(x) = v["tflops"].as_f64() {
                    line += &format!("  {x:>8.1} TFLOP/s");
                }
                if let Some(x) = v["gbps"].as_f64() {
                    line += &format!("  {x:>8.1} GB/s");
                }
                println!("{line}");
            }
            (None, None) => println!("{:<32} (no reps)", rec.name),
        }
        self.records.push(v);
        match self.write() {
            Ok(()) => self.last_write_ok = true,
            Err(e) => {
                eprintln!("gpu_bench: writing the JSON: {e:#}");
                self.writes_failed += 1;
                self.last_write_ok = false;
            }
        }
    }

    fn write(&self) -> Result<()> {
        let Some(path) = &self.out else {
            return Ok(());
        };
        let conventions: serde_json::Map<String, Value> = CONVENTIONS
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let doc = json!({
            "schema": "steepest-gpu-bench/1",
            "tool": "steepest",
            "version": env!("CARGO_PKG_VERSION"),
            "device": self.device_name,
            "pool_keeps_freed_memory": self.pool_keeps_freed_memory,
            "quick": self.quick,
            "reps": self.reps,
            "warmup": self.warmup,
            "ns": {"coefficients": [3.4445, -4.7750, 2.0315], "steps": NS_STEPS, "operands": "bf16", "accumulate": "f32"},
            "conventions": conventions,
            "records": self.records,
        });
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }
}

/// Fails unless `--out` can be written the way [`Bench::write`] writes it
/// (a temporary file next to it, renamed over it), so that a bad path stops
/// the run before anything is measured. Leaves `path` itself untouched.
fn check_out_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("is a directory");
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    Ok(())
}

/// `steepest::device::cuda::retain_freed_memory` (feature `cuda`).
#[cfg(feature = "cuda")]
fn retain_freed_memory(dev: &Device) -> Result<()> {
    Ok(steepest::device::cuda::retain_freed_memory(dev)?)
}

#[cfg(not(feature = "cuda"))]
fn retain_freed_memory(_dev: &Device) -> Result<()> {
    Ok(())
}

fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device cuda: this binary was built without CUDA; build with \
                     `--features cuda` or pass `--device cpu`"
                );
            }
            Ok(Device::new_cuda(0).context("opening CUDA device 0")?)
        }
        other => bail!("--device: unknown `{other}`; use cpu or cuda"),
    }
}

/// The set's matrices as named f32 variables `N(0, 0.02²)`, and a `GradStore`
/// holding a fixed `N(0, 1)` gradient for each.
fn vars_and_grads(set: &MatSet, dev: &Device) -> Result<(Vec<NamedVar>, GradStore)> {
    // An empty GradStore (its only public constructor is `backward`).
    let root = Tensor::zeros((), DType::F32, dev)?;
    let mut grads = root.backward()?;
    grads.remove(&root);
    let mut vars = Vec::new();
    for layer in 0..set.layers {
        for &(kind, (r, c)) in &set.kinds {
            let var = Var::from_tensor(&Tensor::randn(0f32, 0.02, (r, c), dev)?)?;
            grads.insert(var.as_tensor(), Tensor::randn(0f32, 1.0, (r, c), dev)?);
            vars.push(NamedVar {
                name: format!("h.{layer}.{kind}.weight"),
                var,
            });
        }
    }
    Ok((vars, grads))
}

/// One `(b, m, n)` f32 batch per shape of the set.
fn batches(set: &MatSet, dev: &Device, std: f32) -> Result<Vec<Tensor>> {
    set.shapes()
        .iter()
        .map(|&[b, m, n]| Ok(Tensor::randn(0f32, std, (b, m, n), dev)?))
        .collect()
}

/// What the `_gram` workloads change (their `flops` stay the standard form's,
/// so "× floor" compares both forms with the same floor).
const GRAM_NOTE: &str =
    "; Gram form (NewtonSchulz::gram_form: aspect >= 2, restart every 2 steps; \
                         square matrices keep the standard form); flops: the standard form's";

/// Rows per tile when a short side `s` is cut into `tiles` tile rows
/// (multiples of 32; one tile: the whole product in one GEMM).
fn tile_rows(s: usize, tiles: usize) -> usize {
    s.div_ceil(tiles.max(1)).next_multiple_of(32).min(s)
}

fn muon_ns() -> NewtonSchulz {
    NewtonSchulz::muon().with_compute_dtype(DType::BF16)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(p) = &cli.out {
        if let Err(e) = check_out_writable(p) {
            eprintln!("gpu_bench: --out {}: cannot write: {e:#}", p.display());
            std::process::exit(2);
        }
    }
    let dev = device(&cli.device)?;
    let quick = cli.quick;
    let cuda = dev.is_cuda();
    let mut pool_keeps_freed_memory = cuda && !cli.release_freed_memory;
    if pool_keeps_freed_memory {
        // A benchmark without it still measures (with the driver's frees in
        // the timed region): warn, record it in the JSON, go on.
        if let Err(e) = retain_freed_memory(&dev) {
            eprintln!("warning: retain_freed_memory failed ({e}); the pool releases freed memory");
            pool_keeps_freed_memory = false;
        }
    }
    let mut bench = Bench {
        pool_keeps_freed_memory,
        device_name: match &dev {
            Device::Cpu => "cpu".to_string(),
            _ => format!("{} (ordinal 0)", cli.device),
        },
        dev,
        reps: cli.reps.unwrap_or(if quick { 3 } else { 20 }) as usize,
        warmup: cli.warmup.unwrap_or(if quick { 1 } else { 3 }) as usize,
        quick,
        only: cli.only,
        out: cli.out,
        records: Vec::new(),
        seen: Vec::new(),
        writes_failed: 0,
        last_write_ok: false,
    };
    println!(
        "gpu_bench (steepest {}): device {}, {} warm-up + {} timed reps each{}{}",
        env!("CARGO_PKG_VERSION"),
        bench.device_name,
        bench.warmup,
        bench.reps,
        if quick { ", --quick shapes" } else { "" },
        if pool_keeps_freed_memory {
            "; CUDA pool keeps freed memory"
        } else {
            ""
        }
    );

    // msign alone: bf16 squares.
    let squares: &[usize] = if quick {
        &[64, 128, 256]
    } else {
        &[1024, 4096, 8192]
    };
    for &n in squares {
        let shape = [1, n, n];
        bench.run_checked(
            Rec::new(
                format!("msign_bf16/{n}"),
                vec![shape],
                "bf16 in/out, bf16 operands, f32 accumulate",
            )
            .notes(
                "msign(G) of one n x n bf16 matrix, NewtonSchulz::muon() with bf16 compute dtype",
            )
            .flops(ns_flops(&shape))
            .issued(&muon_ns(), cuda, None),
            |dev| {
                let g = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(DType::BF16)?;
                Ok((g, muon_ns()))
            },
            |(g, ns)| {
                msign(g, ns)?;
                Ok(())
            },
            |(g, ns)| check_msign(&msign(g, ns)?).map(Some),
        );
    }

    for set in [MatSet::gpt2_small(quick), MatSet::one_b(quick)] {
        let shapes = set.shapes();
        let n_params = set.params() as f64;
        let ns_total: f64 = shapes.iter().map(ns_flops).sum();
        let layers = set.layers;

        for (form, ns, note) in [
            ("ns_set", muon_ns(), ""),
            ("ns_set_gram", muon_ns().gram_form(), GRAM_NOTE),
        ] {
            bench.run_checked(
                Rec::new(format!("{form}/{}", set.name), shapes.clone(), "f32 in/out, bf16 operands, f32 accumulate")
                    .notes(&format!(
                        "msign on each same-shape batch (b, m, n) of the set: the Newton-Schulz part of a Muon step{note}"
                    ))
                    .flops(ns_total)
                    .issued(&ns, cuda, None),
                |dev| Ok((batches(&set, dev, 1.0)?, ns.clone())),
                |(gs, ns)| {
                    for g in gs.iter() {
                        msign(g, ns)?;
                    }
                    Ok(())
                },
                |(gs, ns)| {
                    let notes = gs
                        .iter()
                        .map(|g| check_msign(&msign(g, ns)?))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(Some(notes.join("; ")))
                },
            );
        }

        for (form, ns, note) in [
            ("muon_step", muon_ns(), ""),
            ("muon_step_gram", muon_ns().gram_form(), GRAM_NOTE),
        ] {
            bench.run(
                Rec::new(format!("{form}/{}", set.name), shapes.clone(), "f32 params/grads/momentum, bf16 NS operands")
                    .notes(&format!(
                        "Muon::step over {} matrices: momentum 0.95 nesterov, NewtonSchulz::muon() bf16 operands, \
                         lr 0.02, LrAdjust::Original, decoupled decay 0.1; same-shape matrices batched{note}",
                        4 * layers
                    ))
                    .flops(ns_total)
                    .issued(&ns, cuda, None),
                |dev| {
                    let (vars, grads) = vars_and_grads(&set, dev)?;
                    let opt = Muon::from_named(
                        vars,
                        MuonConfig {
                            lr: 0.02,
                            momentum: 0.95,
                            nesterov: true,
                            newton_schulz: ns.clone(),
                            weight_decay: WeightDecay::Decoupled(0.1),
                            ..MuonConfig::default()
                        },
                    )?;
                    Ok((opt, grads))
                },
                |(opt, grads)| Ok(opt.step(grads)?),
            );
        }

        const PI_ITERS: usize = 10;
        bench.run(
            Rec::new(format!("power_iteration_x10/{}", set.name), shapes.clone(), "f32")
                .notes("power_iteration(W, Some(start), 10) on each same-shape batch (b, m, n); start: a fixed \
                        random (b, n); includes the final sigma/u (one more pass)")
                .bytes(PI_ITERS as f64 * n_params * 4.0)
                .power_bytes_read(PI_ITERS),
            |dev| {
                let ws = batches(&set, dev, 0.02)?;
                let starts = shapes
                    .iter()
                    .map(|&[b, _, n]| Ok(Tensor::randn(0f32, 1.0, (b, n), dev)?))
                    .collect::<Result<Vec<_>>>()?;
                Ok((ws, starts))
            },
            |(ws, starts)| {
                for (w, s) in ws.iter().zip(starts.iter()) {
                    power_iteration(w, Some(s), PI_ITERS)?;
                }
                Ok(())
            },
        );

        for (name, decay, note) in [
            ("adamw", WeightDecay::Decoupled(0.1), "decoupled decay 0.1"),
            (
                "adamw_spectral",
                WeightDecay::spectral(0.1),
                "spectral decay 0.1 (one warm-started power iteration per matrix per step)",
            ),
        ] {
            bench.run(
                Rec::new(
                    format!("{name}/{}", set.name),
                    shapes.clone(),
                    "f32 params/grads/moments",
                )
                .notes(&format!(
                    "AdamW::step over {} matrices: lr 1e-3, betas (0.9, 0.999), eps 1e-8, {note}",
                    4 * layers
                ))
                .bytes(28.0 * n_params),
                |dev| {
                    let (vars, grads) = vars_and_grads(&set, dev)?;
                    let opt = AdamW::from_named(
                        vars,
                        AdamWConfig {
                            lr: 1e-3,
                            beta1: 0.9,
                            beta2: 0.999,
                            eps: 1e-8,
                            weight_decay: decay,
                            decay_vectors: false,
                        },
                    )?;
                    Ok((opt, grads))
                },
                |(opt, grads)| Ok(opt.step(grads)?),
            );
        }
    }

    // Ceilings through candle (the PyTorch script's are the ones the targets use).
    let n = if quick { 256 } else { 8192 };
    bench.run(
        Rec::new("ceiling/matmul_bf16".into(), vec![[1, n, n]], "bf16")
            .notes("candle a.matmul(&b), n x n x n, allocates its output")
            .flops(2.0 * (n as f64).powi(3)),
        |dev| {
            let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(DType::BF16)?;
            let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(DType::BF16)?;
            Ok((a, b))
        },
        |(a, b)| {
            a.matmul(b)?;
            Ok(())
        },
    );
    let elems: usize = if quick { 1 << 20 } else { 1 << 28 };
    bench.run(
        Rec::new("ceiling/copy".into(), vec![[1, 1, elems]], "f32")
            .notes("candle Tensor::copy (allocation + device-to-device copy) of a 1 GiB f32 buffer (4 MiB with --quick)")
            .bytes(2.0 * 4.0 * elems as f64),
        |dev| Ok(Tensor::zeros(elems, DType::F32, dev)?),
        |t| {
            t.copy()?;
            Ok(())
        },
    );

    // The tile size of the symmetric products (X Xᵀ, A²), CUDA only, last:
    // an optional sweep, after every workload the issue asks for (under a
    // time limit it is what a timeout cuts off).
    #[cfg(feature = "cuda")]
    if cuda {
        for set in [MatSet::gpt2_small(quick), MatSet::one_b(quick)] {
            let shapes = set.shapes();
            let ns_total: f64 = shapes.iter().map(ns_flops).sum();
            for tiles in [1, 2, 8] {
                bench.run(
                    Rec::new(
                        format!("ns_set_tiles{tiles}/{}", set.name),
                        shapes.clone(),
                        "f32 in/out, bf16 operands, f32 accumulate",
                    )
                    .notes(&format!(
                        "as ns_set, the symmetric products cut into {tiles} tile row(s) \
                             (steepest::device::cuda::msign_tiled; the default is about 4)"
                    ))
                    .flops(ns_total)
                    .issued(&muon_ns(), cuda, Some(tiles)),
                    |dev| Ok((batches(&set, dev, 1.0)?, muon_ns())),
                    |(gs, ns)| {
                        for g in gs.iter() {
                            let (_, m, n) = g.dims3()?;
                            let tile = tile_rows(m.min(n), tiles);
                            steepest::device::cuda::msign_tiled(g, ns, tile)?;
                        }
                        Ok(())
                    },
                );
            }
        }
    }

    if bench.records.is_empty() && !bench.only.is_empty() {
        eprintln!(
            "gpu_bench: --only {} matched no workload; the workloads: {}",
            bench.only.join(","),
            bench.seen.join(", ")
        );
        std::process::exit(2);
    }
    if let Some(p) = &bench.out {
        if bench.last_write_ok {
            println!("wrote {}", p.display());
        }
        if bench.writes_failed > 0 {
            eprintln!(
                "gpu_bench: {} of {} writes of {} failed{}",
                bench.writes_failed,
                bench.records.len(),
                p.display(),
                if bench.last_write_ok {
                    " (the last one succeeded: the file has every record)"
                } else {
                    ""
                }
            );
            std::process::exit(1);
        }
    }
    Ok(())
}
