//! `msign(G) = U Vᵀ` (the polar factor) by Newton–Schulz iteration (docs/math.md §4).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{compute_dtype, frobenius_keepdim, matrix_dims, transpose_last};
use crate::error::{fail, Result};

/// Polar Express coefficients (arXiv 2505.16932, `l = 1e-3`, 8 iterations,
/// cushion 0.02), before the safety scaling.
const POLAR_EXPRESS: [[f64; 3]; 8] = [
    [8.28721201814563, -23.595886519098837, 17.300387312530933],
    [4.107059111542203, -2.9478499167379106, 0.5448431082926601],
    [3.9486908534822946, -2.908902115962949, 0.5518191394370137],
    [3.3184196573706015, -2.488488024314874, 0.51004894012372],
    [2.300652019954817, -1.6689039845747493, 0.4188073119525673],
    [1.891301407787398, -1.2679958271945868, 0.37680408948524835],
    [1.8750014808534479, -1.2500016453999487, 0.3750001645474248],
    [1.875, -1.25, 0.375],
];

/// Jiacheng You's 5-step quintic schedule.
const YOU: [[f64; 3]; 5] = [
    [4.0848, -6.8946, 2.9270],
    [3.9505, -6.3029, 2.6377],
    [3.7418, -5.5913, 2.3037],
    [2.8769, -3.1427, 1.2046],
    [2.8366, -3.0525, 1.2012],
];

/// A Newton–Schulz schedule: one `(a, b, c)` per step, each step mapping every
/// singular value `s ↦ a s + b s³ + c s⁵`.
///
/// The input is first scaled to `G / (‖G‖_F · norm_scale + eps)` so that every
/// singular value is at most 1. The iteration runs in f32 (f64 for f64 input);
/// [`NewtonSchulz::with_compute_dtype`] can give the matrix products bf16/f16
/// operands (as `torch.optim.Muon` does with bf16) while the sums stay in f32
/// (on the generic path each product's result is rounded too; see there).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewtonSchulz {
    coefficients: Vec<[f64; 3]>,
    eps: f64,
    norm_scale: f64,
    #[serde(with = "dtype_name")]
    compute_dtype: Option<DType>,
    /// Absent in checkpoints written before the Gram form existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gram: Option<GramNewtonSchulz>,
}

/// When and how [`msign`] iterates on the Gram matrix instead of `X`
/// (Gram Newton–Schulz; Zhang, Amsel, Chen and Dao, 2026).
///
/// For `X` on its short side (`s × l`, `s ≤ l`) every iterate is
/// `X_k = Q_k X_0` with `Q_k` a polynomial in `R_0 = X_0 X_0ᵀ`, so the steps
/// can run on `s × s` matrices only: with `p(R) = a I + b R + c R²`,
/// `Q ← Q p(R)` and `R ← p(R) R p(R)`, and `X = Q X_0` at the end. That costs
/// `2s²l` for `R_0` and for the final product plus at most `8s³` per step,
/// against `4s²l + 2s³` per step for the standard form: fewer operations
/// from `l ≈ 1.5·s` on (docs/math.md §4 counts them).
///
/// Rounding makes `R` drift from `X Xᵀ` (it can acquire small negative
/// eigenvalues that the polynomial then amplifies); a *restart* before a
/// given step forms `X = Q X_0` and recomputes `R = X Xᵀ` from it. Measured
/// on ill-conditioned inputs with bf16/f16 operands (docs/math.md §4), a
/// restart every two steps keeps the error within 1.2–1.7× of the standard
/// form's (the tests allow 3×); one restart in five steps is 2.3–5.1× worse,
/// and none diverges (4.6e4× and more with bf16 operands). In f32,
/// restarting every two steps, the Gram form stayed within 7× of the
/// standard form's rounding-level error on the tests' inputs (they allow
/// 8×); that is a measurement, not a bound: a numpy f32 emulation (of the
/// algorithm, not this code) of Polar
/// Express (3 steps, restart before step 2) on an 8×40 input with σ from 1
/// to 1e-4 came out 8–14× worse (4.4e-5 against 3.2e-6), still at f32's
/// rounding level. Without restarts a long table can overflow in f32 on a
/// low-rank input. [`NewtonSchulz::gram_form`] restarts every two steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GramNewtonSchulz {
    /// Use the Gram form when `long side ≥ min_aspect · short side`; other
    /// shapes take the standard form. Must be ≥ 1.
    pub min_aspect: f64,
    /// Steps (0-based, each in `1..steps`) before which `X` and `R` are
    /// recomputed.
    pub restarts: Vec<usize>,
}

impl GramNewtonSchulz {
    /// Gram form for aspect ratios ≥ 2, restarting before steps
    /// `period, 2·period, …` below `steps`.
    pub fn restart_every(period: usize, steps: usize) -> Self {
        Self {
            min_aspect: 2.0,
            restarts: (period.max(1)..steps).step_by(period.max(1)).collect(),
        }
    }
}

/// `Option<DType>` as its name (`"bf16"`) or null, for checkpoints.
mod dtype_name {
    use std::str::FromStr;

    use candle_core::DType;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<DType>, s: S) -> Result<S::Ok, S::Error> {
        d.map(|d| d.as_str()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DType>, D::Error> {
        let name: Option<String> = Option::deserialize(d)?;
        name.map(|n| {
            DType::from_str(&n)
                .map_err(|_| serde::de::Error::custom(format!("unknown dtype `{n}`")))
        })
        .transpose()
    }
}

impl Default for NewtonSchulz {
    /// [`NewtonSchulz::muon`].
    fn default() -> Self {
        Self::muon()
    }
}

impl NewtonSchulz {
    /// Keller Jordan's quintic `(3.4445, −4.7750, 2.0315)` × 5 steps, the
    /// Muon default. Fast, not exact: singular values land roughly in `[0.7, 1.2]`.
    pub fn muon() -> Self {
        Self::from_table(vec![[3.4445, -4.7750, 2.0315]; 5])
    }

    /// Polar Express (arXiv 2505.16932): per-step optimal coefficients, the
    /// last one repeated beyond 8 steps. As in the reference code, the first
    /// seven entries of the table are scaled by `(1/1.01, 1/1.01³, 1/1.01⁵)`
    /// and the input is normalised as `X / (‖X‖_F·1.01 + 1e-7)`.
    pub fn polar_express(steps: usize) -> Self {
        let last = POLAR_EXPRESS.len() - 1;
        let table = (0..steps)
            .map(|i| {
                let [a, b, c] = POLAR_EXPRESS[i.min(last)];
                if i < last {
                    [a / 1.01, b / 1.01f64.powi(3), c / 1.01f64.powi(5)]
                } else {
                    [a, b, c]
                }
            })
            .collect();
        Self {
            norm_scale: 1.01,
            ..Self::from_table(table)
        }
    }

    /// The cubic `(1.5, −0.5, 0)` for `steps` steps: converges to the exact
    /// polar factor, slowly for tiny singular values.
    pub fn cubic(steps: usize) -> Self {
        Self::from_table(vec![[1.5, -0.5, 0.0]; steps])
    }

    /// The exact quintic `(3, −16/5, 6/5)` for `steps` steps.
    pub fn quintic(steps: usize) -> Self {
        Self::from_table(vec![[3.0, -16.0 / 5.0, 6.0 / 5.0]; steps])
    }

    /// Jiacheng You's 5-step schedule.
    pub fn you() -> Self {
        Self::from_table(YOU.to_vec())
    }

    /// A user-supplied table of `(a, b, c)` per step. Errors on an empty table
    /// or a non-finite coefficient.
    pub fn custom(table: Vec<[f64; 3]>) -> Result<Self> {
        let ns = Self::from_table(table);
        ns.validate("NewtonSchulz::custom")?;
        Ok(ns)
    }

    /// Errors (naming `who`) on an empty table, a non-finite coefficient, a
    /// negative or non-finite `eps`, a non-positive `norm_scale`, or a compute
    /// dtype that is not a float.
    pub fn validate(&self, who: &str) -> Result<()> {
        if self.coefficients.is_empty() {
            fail!(Config, who, "the coefficient table is empty");
        }
        if let Some((i, c)) = self
            .coefficients
            .iter()
            .enumerate()
            .find(|(_, c)| c.iter().any(|x| !x.is_finite()))
        {
            fail!(Config, who, "step {i} has a non-finite coefficient {c:?}");
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            fail!(Config, who, "eps must be finite and ≥ 0, got {}", self.eps);
        }
        if !(self.norm_scale.is_finite() && self.norm_scale > 0.0) {
            fail!(
                Config,
                who,
                "norm_scale must be finite and > 0, got {}",
                self.norm_scale
            );
        }
        if let Some(d) = self.compute_dtype {
            // The dtypes candle multiplies matrices in (its 8-, 6- and 4-bit
            // floats convert or multiply on no device): refused here, not
            // part-way through a step.
            if !matches!(d, DType::BF16 | DType::F16 | DType::F32 | DType::F64) {
                fail!(
                    Config,
                    who,
                    "compute dtype must be bf16, f16, f32 or f64, got {d:?}"
                );
            }
        }
        if let Some(g) = &self.gram {
            if !(g.min_aspect.is_finite() && g.min_aspect >= 1.0) {
                fail!(
                    Config,
                    who,
                    "gram.min_aspect must be finite and ≥ 1, got {}",
                    g.min_aspect
                );
            }
            let steps = self.coefficients.len();
            if let Some(r) = g.restarts.iter().find(|&&r| r == 0 || r >= steps) {
                fail!(
                    Config,
                    who,
                    "gram.restarts: step {r} is not in 1..{steps} (a restart goes before a step other than the first)"
                );
            }
        }
        Ok(())
    }

    fn from_table(coefficients: Vec<[f64; 3]>) -> Self {
        Self {
            coefficients,
            eps: 1e-7,
            norm_scale: 1.0,
            compute_dtype: None,
            gram: None,
        }
    }

    /// Sets `eps` in the normalisation `G / (‖G‖_F·scale + eps)` (default 1e-7).
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Rounds the matrix products' operands to `dtype` (e.g. `DType::BF16`, as
    /// `torch.optim.Muon` does); accumulation and the polynomial's sums stay in
    /// f32. The output is still cast back to the input dtype.
    ///
    /// Where the product's result is rounded differs by path. The CUDA
    /// kernels' GEMMs write f32, so only the operands are rounded.
    /// [`msign_generic`](crate::linalg::msign_generic) multiplies in `dtype`,
    /// so each product's result is rounded to it as well. That path serves
    /// Metal and a CPU run with a compute dtype.
    ///
    /// The overall error is of the same order on Gaussian inputs (bf16,
    /// 256×1024: 1.8e-2 generic, 2.2e-2 kernels). It is not on
    /// ill-conditioned ones: see docs/math.md §4, "Restarts".
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = Some(dtype);
        self
    }

    /// The same schedule in the Gram form ([`GramNewtonSchulz`]) for shapes
    /// with aspect ratio ≥ 2, restarting every two steps: the same
    /// polynomial of `G` up to rounding, with fewer operations on
    /// rectangular matrices.
    pub fn gram_form(self) -> Self {
        let steps = self.coefficients.len();
        self.with_gram(GramNewtonSchulz::restart_every(2, steps))
    }

    /// Iterates on the Gram matrix for shapes with aspect ratio at least
    /// `gram.min_aspect` (see [`GramNewtonSchulz`]); validated with the rest
    /// of the schedule ([`NewtonSchulz::validate`]).
    pub fn with_gram(mut self, gram: GramNewtonSchulz) -> Self {
        self.gram = Some(gram);
        self
    }

    /// The Gram settings, if [`NewtonSchulz::with_gram`] set them.
    pub fn gram(&self) -> Option<&GramNewtonSchulz> {
        self.gram.as_ref()
    }

    /// The restart steps when an `(m, n)` matrix takes the Gram form, `None`
    /// when it takes the standard form (no Gram settings, or too square).
    pub fn gram_restarts(&self, m: usize, n: usize) -> Option<&[usize]> {
        let g = self.gram.as_ref()?;
        let (s, l) = (m.min(n) as f64, m.max(n) as f64);
        (l >= g.min_aspect * s).then_some(g.restarts.as_slice())
    }

    /// Sets the factor on `‖G‖_F` in the input normalisation.
    pub fn with_norm_scale(mut self, scale: f64) -> Self {
        self.norm_scale = scale;
        self
    }

    /// The operand dtype of the matrix products, if set.
    pub fn compute_dtype(&self) -> Option<DType> {
        self.compute_dtype
    }

    /// The per-step coefficients `(a, b, c)`.
    pub fn coefficients(&self) -> &[[f64; 3]] {
        &self.coefficients
    }

    /// The `eps` of the input normalisation.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The factor on `‖G‖_F` in the input normalisation (1, or 1.01 for Polar Express).
    pub fn norm_scale(&self) -> f64 {
        self.norm_scale
    }

    /// The singular-value map the whole schedule applies to a singular value
    /// `s` of the normalised input: useful for checking and for choosing tables.
    pub fn apply_scalar(&self, mut s: f64) -> f64 {
        for &[a, b, c] in &self.coefficients {
            let s2 = s * s;
            s = a * s + b * s * s2 + c * s * s2 * s2;
        }
        s
    }
}

/// The polar factor `msign(G) = U Vᵀ` of a matrix `(m, n)` or of each matrix
/// of a batch `(b, m, n)`, by Newton–Schulz iteration.
///
/// `X₀ = G / (‖G‖_F·scale + ε)`, then per step `A = X Xᵀ; X ← a X + (b A + c A²) X`,
/// on the short side (a tall input is transposed first and back at the end).
/// The output has the input's shape and dtype. A zero matrix gives zero.
/// A NaN or ±Inf anywhere in a matrix makes that matrix's output all NaN
/// (its `‖G‖_F` is not finite); the input is not checked, which would cost a
/// host synchronisation: the optimizers refuse non-finite gradients before.
///
/// Dispatched by [`crate::device::msign`]: on the CPU with f32/f64 arithmetic a
/// fused path (the polynomial folded into the GEMMs); on CUDA (feature `cuda`)
/// the cuBLAS sequence of `kernels/msign.cu`; elsewhere [`msign_generic`].
pub fn msign(g: &Tensor, ns: &NewtonSchulz) -> Result<Tensor> {
    matrix_dims("msign: g", g)?;
    ns.validate("msign")?;
    crate::device::msign(g, ns)
}

/// [`msign`] written with plain candle ops only, so it runs on every device
/// (CUDA, Metal, CPU): the reference the fused paths are tested against.
pub fn msign_generic(g: &Tensor, ns: &NewtonSchulz) -> Result<Tensor> {
    let (m, n) = matrix_dims("msign: g", g)?;
    ns.validate("msign")?;
    if g.elem_count() == 0 {
        return Ok(g.zeros_like()?);
    }
    // X and the polynomial's combinations stay in f32 (f64 for f64 input);
    // a lower `compute_dtype` only rounds the matrix products' operands.
    let acc = compute_dtype(g.dtype());
    let operands = ns.compute_dtype.unwrap_or(acc);
    let mm = |a: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> {
        if operands == acc {
            a.matmul(b)
        } else {
            a.to_dtype(operands)?
                .matmul(&b.to_dtype(operands)?)?
                .to_dtype(acc)
        }
    };
    let tall = m > n;
    let mut x = g.to_dtype(acc)?;
    if tall {
        x = transpose_last(&x)?;
    }
    let norm = frobenius_keepdim(&x)?;
    let denom = ((norm * ns.norm_scale)? + ns.eps)?;
    // G = 0 (with eps = 0: 0/0) gives X = 0, so zero in, zero out. Only a
    // zero is replaced: a NaN norm (an Inf or NaN in G) must stay, so that
    // the output is all NaN (replaced by 1, an Inf entry could come out Inf).
    let denom = denom.eq(0.0)?.where_cond(&denom.ones_like()?, &denom)?;
    x = x.broadcast_div(&denom)?;
    x = match ns.gram_restarts(m, n) {
        None => standard_steps(x, &ns.coefficients, &mm)?,
        Some(restarts) => gram_steps(x, &ns.coefficients, restarts, &mm)?,
    };
    if tall {
        x = transpose_last(&x)?;
    }
    Ok(x.contiguous()?.to_dtype(g.dtype())?)
}

type Product<'a> = dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + 'a;

/// The standard form: per step `A = X Xᵀ; X ← a X + (b A + c A²) X`.
fn standard_steps(mut x: Tensor, table: &[[f64; 3]], mm: &Product<'_>) -> Result<Tensor> {
    for &[a, b, c] in table {
        let gram = mm(&x, &transpose_last(&x)?)?;
        let poly = if c == 0.0 {
            (&gram * b)?
        } else {
            ((&gram * b)? + (mm(&gram, &gram)? * c)?)?
        };
        x = ((&x * a)? + mm(&poly, &x)?)?;
    }
    Ok(x)
}

/// The Gram form ([`GramNewtonSchulz`]): `R = X Xᵀ`, per step
/// `Z = b R + c R²`, `Q ← Q Z + a Q` (`Q = Z + a I` on a segment's first
/// step), and, unless the segment ends, `R ← (Z + aI) R (Z + aI)` as
/// `RZ = R Z + a R`, `R = Z·RZ + a RZ`. A restart before step `k` sets
/// `X ← Q X`, `R ← X Xᵀ` and starts a new segment; the result is `Q X`.
fn gram_steps(
    mut x: Tensor,
    table: &[[f64; 3]],
    restarts: &[usize],
    mm: &Product<'_>,
) -> Result<Tensor> {
    let s = x.dim(x.rank() - 2)?;
    let eye = Tensor::eye(s, x.dtype(), x.device())?;
    let mut r = mm(&x, &transpose_last(&x)?)?;
    let mut q: Option<Tensor> = None;
    for (k, &[a, b, c]) in table.iter().enumerate() {
        if restarts.contains(&k) {
            if let Some(q) = q.take() {
                x = mm(&q, &x)?;
                r = mm(&x, &transpose_last(&x)?)?;
            }
        }
        let z = if c == 0.0 {
            (&r * b)?
        } else {
            ((&r * b)? + (mm(&r, &r)? * c)?)?
        };
        q = Some(match q {
            None => z.broadcast_add(&(&eye * a)?)?,
            Some(q) => ((&q * a)? + mm(&q, &z)?)?,
        });
        let segment_ends = k + 1 == table.len() || restarts.contains(&(k + 1));
        if !segment_ends {
            let rz = ((&r * a)? + mm(&r, &z)?)?;
            r = ((&rz * a)? + mm(&z, &rz)?)?;
        }
    }
    match q {
        Some(q) => Ok(mm(&q, &x)?),
        None => Ok(x),
    }
}
