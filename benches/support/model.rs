//! The benches' parameter set: GPT-2-small matrix kinds scaled down by 4
//! (d = 192) for 4 layers — qkv 576×192, proj 192×192, fc 768×192, fc-proj
//! 192×768 — plus a bias per matrix (1.78 M f32 parameters), with fixed
//! Gaussian gradients.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use steepest::optim::NamedVar;

/// The parameters (named as in a GPT-2 block), their gradients, and the
/// number of parameters.
pub fn gpt2_quarter() -> (Vec<NamedVar>, GradStore, usize) {
    gpt2_quarter_as(DType::F32)
}

/// [`gpt2_quarter`] with parameters and gradients in `dtype`.
#[allow(dead_code)] // (not every bench that includes this file uses it)
pub fn gpt2_quarter_as(dtype: DType) -> (Vec<NamedVar>, GradStore, usize) {
    let dev = Device::Cpu;
    let mut vars = Vec::new();
    for layer in 0..4 {
        for (kind, (r, c)) in [
            ("qkv", (576, 192)),
            ("proj", (192, 192)),
            ("fc", (768, 192)),
            ("fc_proj", (192, 768)),
        ] {
            let w = Var::from_tensor(
                &(Tensor::randn(0f32, 1.0, (r, c), &dev).unwrap() * 0.02)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let b = Var::zeros(r, dtype, &dev).unwrap();
            vars.push(NamedVar {
                name: format!("h.{layer}.{kind}.weight"),
                var: w,
            });
            vars.push(NamedVar {
                name: format!("h.{layer}.{kind}.bias"),
                var: b,
            });
        }
    }
    let n = vars.iter().map(|v| v.var.elem_count()).sum();
    // Fixed gradients: d/dw Σ w⊙g = g.
    let mut loss = Tensor::new(0f32, &dev).unwrap().to_dtype(dtype).unwrap();
    for nv in &vars {
        let g = Tensor::randn(0f32, 1.0, nv.var.shape(), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        loss = (loss + (nv.var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    (vars, grads, n)
}
