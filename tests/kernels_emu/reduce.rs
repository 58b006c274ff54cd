//! The reduction kernels (`kernels/reduce.cu`) under the emulator: the
//! finite check against the CPU path (exact: a flag), the sums of squares
//! against an f64 reference.

use candle_core::{DType, Device, Tensor};
use steepest::device::{self, emu};

use super::cases::*;

/// A tensor of `shape` with `bad` written at flat index `at` (if any).
fn with_value(seed: u64, shape: &[usize], dtype: DType, at: Option<(usize, f32)>) -> Tensor {
    let mut r = rng(seed);
    let t = randn(&mut r, shape, DType::F32, &Device::Cpu);
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    if let Some((i, x)) = at {
        v[i] = x;
    }
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// One finite tensor of each shape of `UPDATE_SHAPES`, the dtypes in turn.
fn every_shape(seed: u64) -> Vec<Tensor> {
    UPDATE_SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| with_value(seed + i as u64, s, DTYPES[i % 3], None))
        .collect()
}

#[test]
fn finite_check_matches_cpu() {
    let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    for (i, shape) in UPDATE_SHAPES.iter().enumerate() {
        let n: usize = shape.iter().product();
        for (k, &dt) in DTYPES.iter().enumerate() {
            // the bad value in the first, the last (tail) or a middle element, or nowhere
            let at = match (i + k) % 4 {
                0 => None,
                1 => Some((n - 1, bad[i % 3])),
                2 => Some((0, bad[(i + 1) % 3])),
                _ => Some((n / 2, bad[(i + 2) % 3])),
            };
            let ts = [
                with_value(1, &[300], dt, None),
                with_value(2 + i as u64, shape, dt, at),
                with_value(3, &[5000], dt, None),
            ];
            let refs: Vec<&Tensor> = ts.iter().collect();
            let want = device::first_nonfinite(&refs).unwrap();
            assert_eq!(want, at.map(|_| 1), "cpu, {shape:?} {dt:?}");
            assert_eq!(
                emu::first_nonfinite(&refs).unwrap(),
                want,
                "{shape:?} {dt:?} {at:?}"
            );
        }
    }
}

/// Several flagged tensors of mixed dtypes in one call: the first is reported.
#[test]
fn finite_check_mixed_dtypes_reports_the_first() {
    let ts = [
        with_value(1, &[4097], DType::BF16, None),
        with_value(2, &[7, 9], DType::F32, None),
        with_value(3, &[4097], DType::F16, Some((4096, f32::INFINITY))),
        with_value(4, &[10], DType::F32, Some((3, f32::NAN))),
        with_value(5, &[1], DType::BF16, Some((0, f32::NAN))),
    ];
    let refs: Vec<&Tensor> = ts.iter().collect();
    assert_eq!(emu::first_nonfinite(&refs).unwrap(), Some(2));
    assert_eq!(emu::first_nonfinite(&refs[..2]).unwrap(), None);
    assert_eq!(emu::first_nonfinite(&refs[3..]).unwrap(), Some(0));
}

/// Sums of squares of all shapes and dtypes in one call (one launch per
/// dtype, one host copy) against an f64 sum of the same (rounded) values.
/// Both sum in f64 (the kernel 16 terms per thread, a tree of 256 per
/// 4096-element chunk, then the chunks; the CPU path candle's f64 sum):
/// relative error below n·2⁻⁵³ ≈ 1e-11 for 90 000 elements. 1e-10 fails an
/// f32 sum anywhere (≥ 1.5e-6 per 4096-element chunk).
#[test]
fn sum_squares_matches_f64_reference() {
    let ts = every_shape(50);
    let refs: Vec<&Tensor> = ts.iter().collect();
    let got = emu::sum_squares(&refs).unwrap();
    let cpu = device::sum_squares(&refs).unwrap();
    for (i, t) in ts.iter().enumerate() {
        let want: f64 = f64s(t).iter().map(|x| x * x).sum();
        for (path, sum) in [("kernels", got[i]), ("cpu", cpu[i])] {
            let rel = (sum - want).abs() / want;
            assert!(
                rel < 1e-10,
                "{path} {:?} {:?}: {sum} vs {want} ({rel:e})",
                t.dims(),
                t.dtype(),
            );
        }
    }
    // zero tensors sum to zero exactly
    let z = Tensor::zeros((3, 4097), DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(emu::sum_squares(&[&z]).unwrap(), vec![0.0]);
}

/// With the grid capped below the number of chunks and of tensors
/// (`emu::with_grid_cap`), each block walks several chunks (`finite_*`,
/// `sumsq_*`) or tensors (`sumsq_finish`): the same sums bit for bit (the
/// per-chunk partials are combined in a fixed order), and a NaN found in
/// whichever chunk of a 5-chunk tensor it is put.
#[test]
fn grid_stride_loops_give_the_full_grids_results() {
    let ts = every_shape(80);
    let refs: Vec<&Tensor> = ts.iter().collect();
    let full = emu::sum_squares(&refs).unwrap();
    let n = 5 * 4096;
    for cap in [1, 2, 3] {
        emu::with_grid_cap(cap, || {
            assert_eq!(
                emu::sum_squares(&refs).unwrap(),
                full,
                "grid capped at {cap}"
            );
            assert_eq!(emu::first_nonfinite(&refs).unwrap(), None, "cap {cap}");
            for chunk in 0..5 {
                let bad = with_value(90, &[n], DType::BF16, Some((chunk * 4096 + 7, f32::NAN)));
                let mut with_bad = refs.clone();
                with_bad.push(&bad);
                assert_eq!(
                    emu::first_nonfinite(&with_bad).unwrap(),
                    Some(refs.len()),
                    "cap {cap}, NaN in chunk {chunk}"
                );
            }
        });
    }
}

/// Entries whose squares overflow f32 (1e20, the largest f32) or underflow
/// it (1e-24, the smallest subnormal): the sums are the f64 sums of the
/// squares on both paths, not Inf or 0.
#[test]
fn sum_squares_of_entries_beyond_f32s_range_of_squares() {
    for x in [1e20f32, f32::MAX, 1e-24, f32::from_bits(1)] {
        for dt in [DType::F32, DType::BF16] {
            let t = Tensor::full(x, (3, 5000), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let e = f64s(&t)[0];
            let want = e * e * 15000.0;
            if want == 0.0 || want.is_infinite() {
                continue; // beyond bf16's range: rounded to 0 or Inf
            }
            let got = emu::sum_squares(&[&t]).unwrap()[0];
            let cpu = device::sum_squares(&[&t]).unwrap()[0];
            for (path, sum) in [("kernels", got), ("cpu", cpu)] {
                assert!(
                    ((sum - want) / want).abs() < 1e-12,
                    "{path} {x:e} {dt:?}: {sum:e} vs {want:e}"
                );
            }
        }
    }
}
