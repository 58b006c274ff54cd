//! The harness of the GPU whole-step tests (`tests/kernels_emu/whole_steps.rs`,
//! used by `tests/gpu_kernels.rs`), run CPU against CPU: everything must
//! agree bit for bit, every parameter must move, the state keys must match.

#[path = "kernels_emu/cases.rs"]
mod cases;
#[path = "kernels_emu/whole_steps.rs"]
mod whole_steps;

use candle_core::Device;
use steepest::device::with_generic_ops;

#[test]
fn whole_steps_harness_cpu_against_cpu() {
    whole_steps::compare(&Device::Cpu, &Device::Cpu, true);
}

/// The same harness, the second run on candle's generic ops (the path of
/// Metal and of f64 on CUDA), within the GPU tolerances: what
/// `gpu_generic_ops_match_the_kernels` checks on a GPU. And it can tell the
/// paths apart: demanding every bit fails.
#[test]
fn whole_steps_harness_cpu_against_the_generic_path() {
    let generic = |name: &str| with_generic_ops(|| whole_steps::run(name, &Device::Cpu));
    whole_steps::compare_runs(|name| whole_steps::run(name, &Device::Cpu), generic, false);
    let exact = std::panic::catch_unwind(|| {
        whole_steps::compare_runs(|name| whole_steps::run(name, &Device::Cpu), generic, true)
    });
    assert!(
        exact.is_err(),
        "the generic path gave the CPU path's bits everywhere"
    );
}
