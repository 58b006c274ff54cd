//! What the device path of `msign` issues, counted without running it: a
//! [`Backend`] whose launches and GEMMs do nothing but add up. The same
//! launch sequence as on the GPU (`launch::msign`), so the count is exact
//! for the CUDA path, with or without a GPU; a bench divides its time by the
//! issued FLOPs to get the rate the GEMMs actually ran at.

use std::cell::Cell;
use std::sync::Mutex;

use super::launch::{self, Backend, Elt, Gemm, Launch, MsignJob, TableCache};
use crate::error::{fail, Result};
use crate::linalg::NewtonSchulz;

/// The work of one device `msign`, from [`msign_device_work`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MsignWork {
    /// FLOPs of the GEMMs issued, 2 per multiply–add.
    pub gemm_flops: f64,
    /// GEMM calls (each strided-batched over the batch).
    pub gemms: usize,
    /// Kernel launches other than GEMMs.
    pub launches: usize,
}

/// A backend that allocates address ranges, runs nothing and counts.
struct Counter {
    next: Cell<u64>,
    work: Cell<MsignWork>,
    cache: Mutex<TableCache<u64>>,
}

impl Backend for Counter {
    type Buf = u64;

    fn addr(buf: &u64) -> u64 {
        *buf
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<u64> {
        let at = self.next.get();
        self.next
            .set(at + (bytes as u64).next_multiple_of(256).max(256));
        Ok(at)
    }

    fn alloc_uninit(&self, bytes: usize) -> Result<u64> {
        self.alloc_zeroed(bytes)
    }

    fn upload(&self, bytes: &[u8]) -> Result<u64> {
        self.alloc_zeroed(bytes.len())
    }

    fn download(&self, _addr: u64, out: &mut [u8]) -> Result<()> {
        out.fill(0);
        Ok(())
    }

    fn launch(&self, _l: &Launch) -> Result<()> {
        let mut w = self.work.get();
        w.launches += 1;
        self.work.set(w);
        Ok(())
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        let mut w = self.work.get();
        w.gemms += 1;
        w.gemm_flops += 2.0 * (g.m * g.n * g.k * g.batch) as f64;
        self.work.set(w);
        Ok(())
    }

    fn with_cache<R>(&self, f: impl FnOnce(&mut TableCache<u64>) -> R) -> R {
        f(&mut self.cache.lock().expect("table cache lock"))
    }

    /// (msign's launches do not size shared memory by the input: the count
    /// is the same on every GPU)
    fn shared_max(&self) -> u32 {
        launch::SHARED_MAX
    }
}

/// The GEMM FLOPs, GEMM calls and other launches of the CUDA path's `msign`
/// of a `(b, m, n)` f32 input under `ns` (operands in its compute dtype, the
/// standard or the Gram form as `ns` picks for the shape), with the
/// symmetric products cut into tiles of `tile` rows (`None`: the default the
/// CUDA path uses). Nothing runs; no GPU is needed.
pub fn msign_device_work(
    b: usize,
    m: usize,
    n: usize,
    ns: &NewtonSchulz,
    tile: Option<usize>,
) -> Result<MsignWork> {
    ns.validate("msign_device_work")?;
    let op = ns.compute_dtype().map_or(Some(Elt::F32), Elt::of);
    let Some(op) = op else {
        fail!(
            Config,
            "msign_device_work",
            "the device path has no {:?} operands",
            ns.compute_dtype()
        );
    };
    if !launch::msign_supported(b, m, n) {
        fail!(
            Device,
            "msign_device_work",
            "no kernel for shape ({b}, {m}, {n})"
        );
    }
    let counter = Counter {
        next: Cell::new(1 << 20),
        work: Cell::new(MsignWork::default()),
        cache: Mutex::new(TableCache::default()),
    };
    let g = counter.alloc_zeroed(b * m * n * 4)?;
    let out = counter.alloc_zeroed(b * m * n * 4)?;
    let job = MsignJob {
        g,
        out,
        elt: Elt::F32,
        b,
        m,
        n,
        table: ns.coefficients(),
        eps: ns.eps(),
        norm_scale: ns.norm_scale(),
        op,
        tile,
        gram: ns.gram_restarts(m, n),
    };
    launch::msign(&counter, &job)?;
    Ok(counter.work.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::GramNewtonSchulz;

    /// Issued FLOPs against the closed forms of docs/math.md §4 and
    /// docs/kernels.md, with `f = T(T+1)/2 / T²` the share of a symmetric
    /// product that `T` equal tiles compute.
    #[test]
    fn issued_flops_match_the_closed_forms() {
        let k = 5.0;
        // s = 128: one tile (f = 1), every product in full.
        let (s, l) = (128.0, 384.0);
        let w = msign_device_work(2, 128, 384, &NewtonSchulz::muon(), None).unwrap();
        assert_eq!(w.gemm_flops, 2.0 * k * (4.0 * s * s * l + 2.0 * s * s * s));
        // s = 768: four tiles of 192, f = 10/16 for X Xᵀ and A².
        let (s, l, f) = (768.0, 3072.0, 10.0 / 16.0);
        let w = msign_device_work(1, 3072, 768, &NewtonSchulz::muon(), None).unwrap();
        let standard = k * (f * 2.0 * s * s * l + 2.0 * s * s * l + f * 2.0 * s * s * s);
        assert_eq!(w.gemm_flops, standard);
        assert_eq!(w.gemms, 5 * (4 + 4 + 1));
        // Gram form, restarts [2, 4]: three R = X Xᵀ (tiled), three X ← Q X
        // (full), 11 symmetric s × s products (tiled).
        let gram_ns = NewtonSchulz::muon().gram_form();
        let w = msign_device_work(1, 768, 3072, &gram_ns, None).unwrap();
        let gram = 3.0 * f * 2.0 * s * s * l + 3.0 * 2.0 * s * s * l + 11.0 * f * 2.0 * s * s * s;
        assert_eq!(w.gemm_flops, gram);
        assert!(gram < standard / 1.3, "{gram} vs {standard}");
        // No restarts: one R, one Q X, 17 symmetric products.
        let none = NewtonSchulz::muon().with_gram(GramNewtonSchulz {
            min_aspect: 2.0,
            restarts: vec![],
        });
        let w = msign_device_work(1, 768, 3072, &none, None).unwrap();
        let expect = f * 2.0 * s * s * l + 2.0 * s * s * l + 17.0 * f * 2.0 * s * s * s;
        assert_eq!(w.gemm_flops, expect);
        // One tile: every symmetric product in full.
        let full = msign_device_work(1, 768, 3072, &NewtonSchulz::muon(), Some(768)).unwrap();
        assert_eq!(full.gemm_flops, k * (4.0 * s * s * l + 2.0 * s * s * s));
        assert_eq!(full.gemms, 5 * 3);
        // Batched: b times one.
        let one = msign_device_work(1, 64, 200, &gram_ns, None).unwrap();
        let six = msign_device_work(6, 64, 200, &gram_ns, None).unwrap();
        assert_eq!(six.gemm_flops, 6.0 * one.gemm_flops);
        assert_eq!((six.gemms, six.launches), (one.gemms, one.launches));
    }

    #[test]
    fn bad_requests_are_errors() {
        let e = msign_device_work(1, 0, 5, &NewtonSchulz::muon(), None).unwrap_err();
        assert!(e.to_string().contains("(1, 0, 5)"), "{e}");
        let f64_ops = NewtonSchulz::muon().with_compute_dtype(candle_core::DType::F64);
        let e = msign_device_work(1, 4, 5, &f64_ops, None).unwrap_err();
        assert!(e.to_string().contains("F64"), "{e}");
    }
}
