//! NCCL at world size 1 on one GPU (feature `nccl`). NCCL refuses two ranks on
//! one GPU, so this is what a one-GPU device session can run: the collectives'
//! shapes, dtypes and values (identities at N = 1), the id's file and
//! environment paths, and `DataParallel` against the single-process stand-in
//! optimizer, bit for bit (gathering parameters, or bf16 updates against a
//! host-rounded reference).
//!
//! Build (no GPU needed): `source /opt/cuda-13.0/env.sh && source
//! /opt/nccl-2.30/env.sh && CARGO_TARGET_DIR=target-cuda cargo test --features
//! nccl --test distributed_nccl --no-run`. Not run where it was written (no
//! GPU there).
#![cfg(feature = "nccl")]

mod distributed_support;

use candle_core::{DType, Device, Tensor, Var};
use distributed_support::{bits, grad, host, rank_order_avg, MomentumSgd};
use steepest::distributed::{
    Collective, DataParallel, DataParallelConfig, NcclComm, NcclId, ParamGather, ReduceOp,
    ShardedStep,
};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

#[test]
fn id_round_trips_through_hex_and_a_file() {
    let id = NcclId::new().unwrap();
    let hex = id.to_hex();
    assert_eq!(hex.len(), 256);
    assert_eq!(NcclId::from_hex(&hex).unwrap().to_hex(), hex);
    let path = std::env::temp_dir().join(format!("steepest-nccl-id-{}", std::process::id()));
    id.write_file(&path).unwrap();
    let back = NcclId::read_file(&path, std::time::Duration::from_secs(1)).unwrap();
    assert_eq!(back.to_hex(), hex);
    std::fs::remove_file(&path).unwrap();
    assert!(NcclId::from_hex("abc").is_err());
}

#[test]
fn collectives_at_world_size_1_are_identities() {
    let dev = gpu();
    let comm = NcclComm::new(&dev, 0, 1, &NcclId::new().unwrap()).unwrap();
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    for dtype in [DType::F32, DType::BF16] {
        let x = grad(0, 0, 0, &[3, 4])
            .to_dtype(dtype)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        let want = host(&x);
        for op in [ReduceOp::Sum, ReduceOp::Avg] {
            let y = comm.all_reduce(&x, op).unwrap();
            assert_eq!((y.dims(), y.dtype()), (&[3usize, 4][..], dtype));
            assert_eq!(bits(&host(&y)), bits(&want), "all_reduce {op:?} {dtype:?}");
            let y = comm.reduce_scatter(&x, op).unwrap();
            assert_eq!(y.dims(), &[12]);
            assert_eq!(
                bits(&host(&y)),
                bits(&want),
                "reduce_scatter {op:?} {dtype:?}"
            );
        }
        let y = comm.all_gather(&x).unwrap();
        assert_eq!(y.dims(), &[12]);
        assert_eq!(bits(&host(&y)), bits(&want));
        // A non-contiguous input is read in logical order.
        let xt = x.t().unwrap();
        assert_eq!(
            bits(&host(&comm.all_gather(&xt).unwrap())),
            bits(&host(&xt))
        );
        let y = comm.broadcast(&x, 0).unwrap();
        assert_eq!(bits(&host(&y)), bits(&want));
    }
    comm.barrier().unwrap();
    let e = comm
        .all_reduce_sum(&Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("NcclComm::all_reduce"), "{e}");
    let e = comm
        .all_reduce_sum(&Tensor::zeros(2, DType::F64, &dev).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("F64 is not supported"), "{e}");
    let e = comm
        .broadcast(&Tensor::zeros(2, DType::F32, &dev).unwrap(), 1)
        .unwrap_err();
    assert!(e.to_string().contains("root 1 is out of range"), "{e}");
}

#[test]
fn from_env_with_an_id_file() {
    let path = std::env::temp_dir().join(format!("steepest-nccl-env-{}", std::process::id()));
    std::env::set_var("RANK", "0");
    std::env::set_var("WORLD_SIZE", "1");
    std::env::remove_var("STEEPEST_NCCL_ID");
    std::env::set_var("STEEPEST_NCCL_ID_FILE", &path);
    let comm = NcclComm::from_env(&gpu()).unwrap();
    assert!(path.exists());
    let s = comm
        .all_reduce_sum(&Tensor::new(&[2f32], &gpu()).unwrap())
        .unwrap();
    assert_eq!(host(&s), vec![2.0]);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn data_parallel_on_one_gpu_equals_the_single_process_optimizer() {
    let dev = gpu();
    let shapes: Vec<Vec<usize>> = vec![vec![6, 4], vec![6, 4], vec![3, 7], vec![5], vec![]];
    let make = || -> Vec<Var> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Var::from_tensor(&(grad(99, 0, i, d) * 0.01).unwrap().to_device(&dev).unwrap())
                    .unwrap()
            })
            .collect()
    };
    for (grad_dtype, gather) in [
        (DType::F32, ParamGather::Parameters),
        (DType::BF16, ParamGather::Parameters),
        (DType::F32, ParamGather::Bf16Updates),
    ] {
        let vars = make();
        let comm = NcclComm::new(&dev, 0, 1, &NcclId::new().unwrap()).unwrap();
        let named = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("p{i}"), v.clone()))
            .collect();
        let cfg = DataParallelConfig {
            grad_dtype,
            param_gather: gather,
            ..Default::default()
        };
        let mut dp = DataParallel::new(comm, named, MomentumSgd::new(vars.clone()), cfg).unwrap();
        let ref_vars = make();
        let mut reference = MomentumSgd::new(ref_vars.clone());
        for step in 0..10 {
            let g: Vec<Option<Tensor>> = shapes
                .iter()
                .enumerate()
                .map(|(i, d)| Some(grad(step, 0, i, d).to_device(&dev).unwrap()))
                .collect();
            dp.step_grads(&g).unwrap();
            let bf16 = grad_dtype == DType::BF16;
            let list: Vec<(usize, Tensor)> = shapes
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let avg = rank_order_avg(&[Some(grad(step, 0, i, d))], d, bf16);
                    (i, avg.to_device(&dev).unwrap())
                })
                .collect();
            let old: Vec<Vec<f32>> = ref_vars.iter().map(|v| host(v.as_tensor())).collect();
            reference.step_subset(&list).unwrap();
            if gather == ParamGather::Bf16Updates {
                // The update rounded to bf16 on the host, added in f32.
                for (v, w0) in ref_vars.iter().zip(&old) {
                    let w: Vec<f32> = w0
                        .iter()
                        .zip(host(v.as_tensor()))
                        .map(|(&a, b)| a + half::bf16::from_f32(b - a).to_f32())
                        .collect();
                    v.set(&Tensor::from_vec(w, v.dims(), &dev).unwrap())
                        .unwrap();
                }
            }
        }
        for (i, (a, b)) in vars.iter().zip(&ref_vars).enumerate() {
            assert_eq!(
                bits(&host(a.as_tensor())),
                bits(&host(b.as_tensor())),
                "{grad_dtype:?} {gather:?} param {i}"
            );
        }
        // A NaN is refused and changes nothing.
        let before: Vec<Vec<f32>> = vars.iter().map(|v| host(v.as_tensor())).collect();
        let mut g: Vec<Option<Tensor>> = shapes
            .iter()
            .map(|d| Some(Tensor::zeros(d.as_slice(), DType::F32, &dev).unwrap()))
            .collect();
        g[2] = Some((Tensor::ones((3, 7), DType::F32, &dev).unwrap() * f64::NAN).unwrap());
        match dp.step_grads(&g) {
            Err(steepest::Error::NonFiniteGradient { param }) => assert_eq!(param, "p2"),
            other => panic!("expected NonFiniteGradient, got {other:?}"),
        }
        let after: Vec<Vec<f32>> = vars.iter().map(|v| host(v.as_tensor())).collect();
        assert_eq!(before, after);
    }
}
