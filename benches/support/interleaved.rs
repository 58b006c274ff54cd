//! Timing helpers of the interleaved benches (`msign_share`, `msign_gram`,
//! `vs_candle_nn`): one call timed on the host clock, and the median of many
//! rounds.

use std::time::Instant;

use candle_core::Result;

/// The median of `v` (the upper one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Seconds taken by `f`.
pub fn seconds(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}
