//! Every CUDA kernel of `kernels/*.cu`, run on the CPU by the crate's kernel
//! emulator (`steepest::device::emu`), against the CPU path: the fused
//! updates bit for bit, the reductions, power iteration and msign within
//! stated rounding tolerances. No GPU needed; part of every `cargo test`.
//! (One test binary, so that CI's sanitizer runs rebuild only this one.)
//! Needs feature `emu`, which the crate's dev-dependency on itself turns on.
#![cfg(feature = "emu")]

#[path = "kernels_emu/cases.rs"]
mod cases;
#[path = "kernels_emu/msign.rs"]
mod msign;
#[path = "kernels_emu/power.rs"]
mod power;
#[path = "kernels_emu/reduce.rs"]
mod reduce;
#[path = "kernels_emu/update.rs"]
mod update;
