//! The harness of the GPU whole-step tests (`tests/kernels_emu/whole_steps.rs`,
//! used by `tests/gpu_kernels.rs`), run CPU against CPU: everything must
//! agree bit for bit, every parameter must move, the state keys must match.

#[path = "kernels_emu/cases.rs"]
mod cases;
#[path = "kernels_emu/whole_steps.rs"]
mod whole_steps;

use candle_core::Device;

#[test]
fn whole_steps_harness_cpu_against_cpu() {
    whole_steps::compare(&Device::Cpu, &Device::Cpu, true);
}
