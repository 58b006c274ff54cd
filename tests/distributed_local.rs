//! In-process ranks (`LocalGroup`): collective semantics against host
//! computations, the rank-order reduction, bf16 with f32 accumulation, errors
//! reported to every rank, and ranks that panic, return early or abort.

mod distributed_support;

use candle_core::{DType, Device, Result, Tensor};
use distributed_support::{bits, gvalues, host};
use half::bf16;
use steepest::distributed::{Collective, LocalComm, LocalGroup, ReduceOp};

fn input(rank: usize, n: usize) -> Vec<f32> {
    gvalues(100 + rank as u64, n)
}

fn fold(world: usize, n: usize, avg: bool) -> Vec<f32> {
    let mut acc = input(0, n);
    for r in 1..world {
        for (a, x) in acc.iter_mut().zip(input(r, n)) {
            *a += x;
        }
    }
    if avg {
        acc.iter_mut().for_each(|a| *a /= world as f32);
    }
    acc
}

/// The ranks' results of `LocalGroup::run` (the crate's error type).
type RankResults<T> = Vec<steepest::Result<T>>;

fn all_ok<T: std::fmt::Debug>(results: RankResults<T>) -> Vec<T> {
    results
        .into_iter()
        .map(|r| r.expect("rank failed"))
        .collect()
}

#[test]
fn collectives_match_host_computation_for_1_to_4_ranks() {
    for world in 1..=4 {
        let c = 3; // chunk per rank
        let n = world * c;
        let out = LocalGroup::run(world, |comm| {
            let r = comm.rank();
            let x = Tensor::from_vec(input(r, n), (world, c), &Device::Cpu)?;
            let sum = comm.all_reduce_sum(&x)?;
            let avg = comm.all_reduce_avg(&x)?;
            let rs_sum = comm.reduce_scatter(&x, ReduceOp::Sum)?;
            let rs_avg = comm.reduce_scatter(&x, ReduceOp::Avg)?;
            let mine = Tensor::from_vec(input(r, c), c, &Device::Cpu)?;
            let gathered = comm.all_gather(&mine)?;
            let bcast: Vec<Tensor> = (0..world)
                .map(|root| comm.broadcast(&x, root))
                .collect::<Result<_>>()?;
            comm.barrier()?;
            assert_eq!(sum.dims(), &[world, c]);
            assert_eq!(rs_sum.dims(), &[c]);
            assert_eq!(gathered.dims(), &[world * c]);
            Ok((
                r,
                host(&sum),
                host(&avg),
                host(&rs_sum),
                host(&rs_avg),
                host(&gathered),
                bcast.iter().map(host).collect::<Vec<_>>(),
            ))
        })
        .unwrap();
        let want_sum = fold(world, n, false);
        let want_avg = fold(world, n, true);
        let want_gather: Vec<f32> = (0..world).flat_map(|r| input(r, c)).collect();
        for (r, sum, avg, rs_sum, rs_avg, gathered, bcast) in all_ok(out) {
            assert_eq!(
                bits(&sum),
                bits(&want_sum),
                "world {world} rank {r}: all_reduce sum"
            );
            assert_eq!(
                bits(&avg),
                bits(&want_avg),
                "world {world} rank {r}: all_reduce avg"
            );
            assert_eq!(
                bits(&rs_sum),
                bits(&want_sum[r * c..(r + 1) * c]),
                "world {world} rank {r}: reduce_scatter sum"
            );
            assert_eq!(
                bits(&rs_avg),
                bits(&want_avg[r * c..(r + 1) * c]),
                "world {world} rank {r}: reduce_scatter avg"
            );
            assert_eq!(
                bits(&gathered),
                bits(&want_gather),
                "world {world} rank {r}: all_gather"
            );
            for (root, b) in bcast.iter().enumerate() {
                assert_eq!(
                    bits(b),
                    bits(&input(root, n)),
                    "world {world} rank {r}: broadcast from {root}"
                );
            }
        }
    }
}

#[test]
fn reduction_is_in_rank_order_whatever_the_arrival_order() {
    // ((1e8 + 1) − 1e8) + 1 = 1 in f32; any other order gives 0 or 2.
    let vals = [1e8f32, 1.0, -1e8, 1.0];
    let out = LocalGroup::run(4, |comm| {
        let x = Tensor::new(&[vals[comm.rank()]], &Device::Cpu)?;
        let mut got = Vec::new();
        for round in 0..25 {
            // Vary which rank arrives last from round to round.
            if comm.rank() == round % 4 {
                std::thread::yield_now();
            }
            got.push(comm.all_reduce_sum(&x)?.to_vec1::<f32>()?[0]);
        }
        Ok(got)
    })
    .unwrap();
    for got in all_ok(out) {
        assert!(got.iter().all(|&v| v == 1.0), "{got:?}");
    }
}

#[test]
fn bf16_reduces_with_f32_accumulation_and_one_rounding() {
    // 256 + 1 + 1 + 1: f32 sum 259 → bf16 260; summing in bf16 would stay at 256.
    let vals = [256f32, 1.0, 1.0, 1.0];
    let out = LocalGroup::run(4, |comm| {
        let x = Tensor::new(&[vals[comm.rank()]; 4], &Device::Cpu)?.to_dtype(DType::BF16)?;
        let s = comm.all_reduce_sum(&x)?;
        let a = comm.all_reduce_avg(&x)?;
        let rs = comm.reduce_scatter(&x, ReduceOp::Sum)?;
        let g = comm.all_gather(&x.narrow(0, 0, 1)?)?;
        assert_eq!(s.dtype(), DType::BF16);
        assert_eq!(rs.dtype(), DType::BF16);
        Ok((host(&s), host(&a), host(&rs), host(&g)))
    })
    .unwrap();
    for (s, a, rs, g) in all_ok(out) {
        assert_eq!(s, vec![260.0; 4]);
        assert_eq!(a, vec![bf16::from_f32(259.0 / 4.0).to_f32(); 4]);
        assert_eq!(rs, vec![260.0]);
        assert_eq!(g, vals.to_vec());
    }
}

fn expect_all_err(results: RankResults<()>, needles: &[&str]) {
    for (r, res) in results.into_iter().enumerate() {
        let e = res
            .expect_err(&format!("rank {r} should have failed"))
            .to_string();
        for n in needles {
            assert!(e.contains(n), "rank {r}: {e:?} lacks {n:?}");
        }
    }
}

#[test]
fn mismatches_fail_on_every_rank_and_the_group_stays_usable() {
    type Case = fn(&LocalComm) -> Result<()>;
    let cases: Vec<(Case, Vec<&str>)> = vec![
        (
            |c| {
                c.all_reduce_sum(&Tensor::zeros(4 + c.rank(), DType::F32, &Device::Cpu)?)
                    .map(|_| ())
            },
            vec!["all_reduce", "element counts differ", "[4, 5, 6]"],
        ),
        (
            |c| {
                let d = if c.rank() == 1 {
                    DType::BF16
                } else {
                    DType::F32
                };
                c.all_gather(&Tensor::zeros(2, d, &Device::Cpu)?)
                    .map(|_| ())
            },
            vec!["all_gather", "dtypes differ"],
        ),
        (
            |c| {
                let t = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
                if c.rank() == 2 {
                    c.all_gather(&t).map(|_| ())
                } else {
                    c.all_reduce_sum(&t).map(|_| ())
                }
            },
            vec![
                "different collectives",
                "rank 2: all_gather",
                "rank 0: all_reduce(sum)",
            ],
        ),
        (
            |c| {
                let d = if c.rank() == 0 {
                    DType::F64
                } else {
                    DType::F32
                };
                c.all_reduce_avg(&Tensor::zeros(2, d, &Device::Cpu)?)
                    .map(|_| ())
            },
            vec!["all_reduce", "rank 0: dtype F64 is not supported"],
        ),
        (
            |c| {
                c.reduce_scatter(&Tensor::zeros(7, DType::F32, &Device::Cpu)?, ReduceOp::Avg)
                    .map(|_| ())
            },
            vec![
                "reduce_scatter",
                "7 elements, not a multiple of the world size 3",
            ],
        ),
        (
            |c| {
                c.broadcast(&Tensor::zeros(2, DType::F32, &Device::Cpu)?, 3)
                    .map(|_| ())
            },
            vec!["broadcast", "root 3 is out of range"],
        ),
        (
            |c| {
                let shape: &[usize] = if c.rank() == 0 { &[2, 3] } else { &[3, 2] };
                c.broadcast(&Tensor::zeros(shape, DType::F32, &Device::Cpu)?, 0)
                    .map(|_| ())
            },
            vec!["broadcast", "shapes differ"],
        ),
    ];
    let out = LocalGroup::run(3, |comm| {
        let mut errors = Vec::new();
        for (case, _) in &cases {
            errors.push(case(&comm));
            // The group still works after a failed collective.
            let ok = comm.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?)?;
            assert_eq!(ok.to_vec1::<f32>()?, vec![3.0]);
        }
        Ok(errors)
    })
    .unwrap();
    let per_rank = all_ok(out);
    for (k, (_, needles)) in cases.iter().enumerate() {
        let results: RankResults<()> = per_rank
            .iter()
            .map(|errs| match &errs[k] {
                Ok(()) => Ok(()),
                Err(e) => Err(candle_core::Error::Msg(e.to_string()).into()),
            })
            .collect();
        expect_all_err(results, needles);
    }
}

#[test]
fn a_panicking_rank_fails_the_others_instead_of_deadlocking() {
    let out = LocalGroup::run(3, |comm| {
        if comm.rank() == 1 {
            panic!("boom on rank 1");
        }
        let x = Tensor::new(&[1f32], &Device::Cpu)?;
        comm.all_reduce_sum(&x)?;
        Ok(())
    })
    .unwrap();
    let e1 = out[1].as_ref().unwrap_err().to_string();
    assert!(e1.contains("rank 1 panicked: boom on rank 1"), "{e1}");
    for r in [0, 2] {
        let e = out[r].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("rank 1 left the group (it panicked)"),
            "rank {r}: {e}"
        );
        assert!(e.contains("all_reduce"), "rank {r}: {e}");
    }
}

#[test]
fn a_rank_that_returns_early_fails_the_others() {
    let out = LocalGroup::run(4, |comm| {
        let x = Tensor::new(&[1f32], &Device::Cpu)?;
        comm.all_reduce_sum(&x)?; // all four take part once
        if comm.rank() == 2 {
            return Err(candle_core::Error::Msg("rank 2 gives up".into()).into());
        }
        comm.barrier()?;
        Ok(())
    })
    .unwrap();
    assert!(out[2]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("gives up"));
    for r in [0, 1, 3] {
        let e = out[r].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("barrier")
                && e.contains("rank 2 left the group (its communicator was dropped)"),
            "rank {r}: {e}"
        );
    }
}

#[test]
fn abort_fails_waiting_and_later_collectives_on_every_rank() {
    let out = LocalGroup::run(3, |comm| {
        if comm.rank() == 0 {
            comm.abort("corrupt batch");
        }
        Ok(comm.barrier()?)
    })
    .unwrap();
    for (r, res) in out.iter().enumerate() {
        let e = res.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("rank 0 aborted the group: corrupt batch"),
            "rank {r}: {e}"
        );
    }
}

#[test]
fn ranks_finishing_at_different_times_do_not_fail_each_other() {
    // The last collective completes on every rank even though fast ranks drop
    // their communicators before slow ones have read the result.
    let out = LocalGroup::run(4, |comm| {
        let x = Tensor::new(&[comm.rank() as f32], &Device::Cpu)?;
        let mut last = 0.0;
        for _ in 0..50 {
            last = comm.all_reduce_sum(&x)?.to_vec1::<f32>()?[0];
        }
        Ok(last)
    })
    .unwrap();
    assert_eq!(all_ok(out), vec![6.0; 4]);
}

#[test]
fn an_empty_group_is_an_error() {
    let e = LocalGroup::new(0).unwrap_err().to_string();
    assert!(e.contains("LocalGroup::new") && e.contains("≥ 1"), "{e}");
}

#[test]
fn boxed_dyn_collective_works() {
    let out = LocalGroup::run(2, |comm| {
        let c: Box<dyn Collective> = Box::new(comm);
        let s = c.all_reduce_sum(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?)?;
        Ok((c.world_size(), host(&s)))
    })
    .unwrap();
    for (w, s) in all_ok(out) {
        assert_eq!(w, 2);
        assert_eq!(s, vec![2.0, 4.0]);
    }
}
