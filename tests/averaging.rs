//! Iterate averaging: EMA / Polyak of known sequences (closed forms in f64),
//! WSM weights and their exact emulation of a decayed-rate run, swapping, and
//! save → load → continue.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use steepest::averaging::{wsm_weights, wsm_weights_for_shape, AverageKind, WeightAverage};
use steepest::optim::{NamedVar, OptimizerState, Sgd, SgdConfig};
use steepest::schedule::{DecayShape, Schedule};
use steepest::WeightDecay;

fn named(var: &Var, name: &str) -> NamedVar {
    NamedVar {
        name: name.into(),
        var: var.clone(),
    }
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A deterministic sequence of parameter values `x_n` (f64, length 3).
fn seq(n: usize) -> Vec<f64> {
    let n = n as f64;
    vec![n.sin(), 0.1 * n * n, -(n * 0.7).cos()]
}

#[test]
fn ema_and_polyak_of_a_known_sequence() {
    let beta = 0.9;
    let v = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let mut ema =
        WeightAverage::from_named(vec![named(&v, "w")], AverageKind::Ema { decay: beta }).unwrap();
    let mut pol = WeightAverage::from_named(vec![named(&v, "w")], AverageKind::Polyak).unwrap();
    assert!(
        ema.averaged().is_err(),
        "no average before the first update"
    );
    let n = 25;
    for i in 1..=n {
        v.set(&Tensor::new(seq(i).as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        ema.update().unwrap();
        pol.update().unwrap();
    }
    // closed forms: EMA = β^{n−1} x_1 + Σ_{i≥2} (1−β) β^{n−i} x_i; Polyak = mean
    for c in 0..3 {
        let mut e = beta.powi(n as i32 - 1) * seq(1)[c];
        for i in 2..=n {
            e += (1.0 - beta) * beta.powi((n - i) as i32) * seq(i)[c];
        }
        let m: f64 = (1..=n).map(|i| seq(i)[c]).sum::<f64>() / n as f64;
        let got_e = vals(&ema.averaged().unwrap()[0].1)[c];
        let got_m = vals(&pol.averaged().unwrap()[0].1)[c];
        assert!((got_e - e).abs() < 1e-12, "{got_e} vs {e}");
        assert!((got_m - m).abs() < 1e-12, "{got_m} vs {m}");
    }
    assert_eq!(ema.count(), n as u64);
}

#[test]
fn wsm_weights_sum_to_one_and_are_the_decrements() {
    let c = wsm_weights(&[1.0, 0.5, 0.25]).unwrap();
    assert_eq!(c, vec![0.0, 0.5, 0.25, 0.25]);
    for shape in [
        DecayShape::Linear,
        DecayShape::Cosine,
        DecayShape::OneMinusSqrt,
    ] {
        for k in [1, 4, 10] {
            let c = wsm_weights_for_shape(shape, k).unwrap();
            assert_eq!(c.len(), k + 1);
            assert!((c.iter().sum::<f64>() - 1.0).abs() < 1e-15);
            assert!(c.iter().all(|&x| x >= 0.0));
            // c_i summed from i+1 reproduces the decay factor f(i/k)
            for j in 0..k {
                let tail: f64 = c[j + 1..].iter().sum();
                assert!((tail - shape.factor(j as f64 / k as f64)).abs() < 1e-14);
            }
        }
    }
    // linear decay = uniform average of the last k checkpoints
    let c = wsm_weights_for_shape(DecayShape::Linear, 4).unwrap();
    for x in &c[1..] {
        assert!((x - 0.25).abs() < 1e-15);
    }
    assert!(wsm_weights(&[]).is_err());
    assert!(wsm_weights(&[0.5, 0.6])
        .unwrap_err()
        .to_string()
        .contains("non-increasing"));
    assert!(wsm_weights(&[1.5]).is_err());
}

/// On a linear loss `⟨a_t, w⟩` (gradients independent of `w`), merging the last
/// `k+1` checkpoints of a constant-rate SGD run with the WSM weights equals,
/// exactly, the iterate of SGD from the oldest checkpoint with the WSD cosine
/// decay schedule (rate constant within each checkpoint interval).
#[test]
fn wsm_merge_equals_the_decayed_run() {
    for interval in [1usize, 3] {
        let (d, k, eta, steps) = (5, 6, 0.05, 42); // steps: a multiple of each interval
        let mut rng = StdRng::seed_from_u64(7 + interval as u64);
        let grads: Vec<Vec<f64>> = (0..steps)
            .map(|_| (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let w0: Vec<f64> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let w = Var::from_vec(w0.clone(), d, &Device::Cpu).unwrap();
        let mut opt = Sgd::new(
            vec![w.clone()],
            SgdConfig {
                lr: eta,
                weight_decay: WeightDecay::None,
                ..Default::default()
            },
        )
        .unwrap();
        let weights = wsm_weights_for_shape(DecayShape::Cosine, k).unwrap();
        let mut avg =
            WeightAverage::from_named(vec![named(&w, "w")], AverageKind::Wsm { weights, interval })
                .unwrap();
        // the initial weights count as update 0's state only if steps align; we
        // take checkpoints after steps interval, 2·interval, …
        for g in &grads {
            let a = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
            let loss = (w.as_tensor() * &a).unwrap().sum_all().unwrap();
            opt.backward_step(&loss).unwrap();
            avg.update().unwrap();
        }
        // k + 1 weights, the oldest 1 − f(0) = 0: that checkpoint is not kept
        assert_eq!(avg.checkpoints(), k);
        let merged = vals(&avg.averaged().unwrap()[0].1);

        // independent f64 run: the oldest kept checkpoint is after step
        // s0 = steps − k·interval; from there the rate in interval j is
        // η·f(j/k) = Schedule::wsd(η, 0, 0, k, Cosine).lr(j).
        let s0 = steps - k * interval;
        let mut theta = w0.clone();
        for g in &grads[..s0] {
            for (x, gi) in theta.iter_mut().zip(g) {
                *x -= eta * gi;
            }
        }
        let decay = Schedule::wsd(eta, 0.0, 0, k, DecayShape::Cosine).unwrap();
        for (i, g) in grads[s0..].iter().enumerate() {
            let lr = decay.lr(i / interval);
            for (x, gi) in theta.iter_mut().zip(g) {
                *x -= lr * gi;
            }
        }
        for (m, t) in merged.iter().zip(&theta) {
            assert!((m - t).abs() < 1e-12, "interval {interval}: {m} vs {t}");
        }
        // and it differs from the constant-rate last iterate
        let last = vals(w.as_tensor());
        assert!(last.iter().zip(&theta).any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

/// Checkpoints of weight 0 are not kept: `wsm_weights_for_shape(Linear, 3)`
/// is `[0, ⅓, ⅓, ⅓]`, so the average is ready after 3 checkpoints (not 4)
/// and holds 3; a saved state holding the zero-weight one too (as written
/// before) loads, drops it, and averages the same.
#[test]
fn wsm_keeps_no_zero_weight_checkpoint() {
    let w = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let weights = wsm_weights_for_shape(DecayShape::Linear, 3).unwrap();
    assert_eq!(weights[0], 0.0);
    let kind = AverageKind::Wsm {
        weights,
        interval: 1,
    };
    let mut avg = WeightAverage::from_named(vec![named(&w, "w")], kind.clone()).unwrap();
    for i in 1..=5 {
        w.set(&Tensor::new(&[i as f32, -(i as f32)], &Device::Cpu).unwrap())
            .unwrap();
        avg.update().unwrap();
        assert_eq!(avg.averaged().is_ok(), i >= 3, "after {i} updates");
    }
    assert_eq!(avg.checkpoints(), 3);
    let want = vals(&avg.averaged().unwrap()[0].1);
    assert_eq!(want, vec![4.0, -4.0], "the mean of checkpoints 3, 4, 5");

    // The same state with a fourth, oldest checkpoint (weight 0) in front.
    let mut state = avg.state_dict().unwrap();
    let header_key = state.keys().find(|k| k.starts_with("__")).unwrap().clone();
    let text = state[&header_key].to_vec1::<u8>().unwrap();
    let mut header: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(header["body"]["held"], 3);
    header["body"]["held"] = 4.into();
    let bytes = serde_json::to_vec(&header).unwrap();
    let n = bytes.len();
    state.insert(
        header_key,
        Tensor::from_vec(bytes, n, &Device::Cpu).unwrap(),
    );
    for i in (0..3).rev() {
        let t = state.remove(&format!("w.ckpt{i}")).unwrap();
        state.insert(format!("w.ckpt{}", i + 1), t);
    }
    state.insert(
        "w.ckpt0".into(),
        Tensor::new(&[1e6f32, 1e6], &Device::Cpu).unwrap(),
    );
    let mut resumed = WeightAverage::from_named(vec![named(&w, "w")], kind).unwrap();
    resumed.load_state_dict(&state).unwrap();
    assert_eq!(resumed.checkpoints(), 3);
    assert_eq!(vals(&resumed.averaged().unwrap()[0].1), want);
}

/// A WSM checkpoint whose number of held checkpoints does not fit its
/// update count (one every `interval` updates, as many as have weight) is
/// refused, naming `held`, and the average is left as it was.
#[test]
fn wsm_checkpoint_counts_must_fit_the_updates() {
    let w = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let kind = AverageKind::Wsm {
        weights: vec![0.5, 0.3, 0.2],
        interval: 2,
    };
    let mut avg = WeightAverage::from_named(vec![named(&w, "w")], kind.clone()).unwrap();
    for i in 1..=5 {
        w.set(&Tensor::new(&[i as f32, 0.0], &Device::Cpu).unwrap())
            .unwrap();
        avg.update().unwrap();
    }
    assert_eq!(avg.checkpoints(), 2, "after updates 2 and 4");
    let state = avg.state_dict().unwrap();
    let edit = |held: usize, count: u64| {
        let mut st = state.clone();
        let key = st.keys().find(|k| k.starts_with("__")).unwrap().clone();
        let mut header: serde_json::Value =
            serde_json::from_slice(&st[&key].to_vec1::<u8>().unwrap()).unwrap();
        header["body"]["held"] = held.into();
        header["body"]["count"] = count.into();
        let bytes = serde_json::to_vec(&header).unwrap();
        let n = bytes.len();
        st.insert(key, Tensor::from_vec(bytes, n, &Device::Cpu).unwrap());
        st.retain(|k, _| !k.starts_with("w.ckpt"));
        for i in 0..held {
            st.insert(
                format!("w.ckpt{i}"),
                Tensor::new(&[i as f32, 0.0], &Device::Cpu).unwrap(),
            );
        }
        st
    };
    let mut fresh = WeightAverage::from_named(vec![named(&w, "w")], kind).unwrap();
    fresh.load_state_dict(&edit(2, 5)).unwrap();
    fresh.load_state_dict(&edit(3, 7)).unwrap();
    assert_eq!(fresh.checkpoints(), 3);
    for (held, count) in [(3, 5), (1, 5), (2, 3), (0, 2), (2, 100)] {
        let e = fresh
            .load_state_dict(&edit(held, count))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("held") && e.contains(&format!("{held} checkpoints")),
            "{held}/{count}: {e}"
        );
        assert_eq!(fresh.checkpoints(), 3, "unchanged after ({held}, {count})");
        assert_eq!(fresh.count(), 7);
    }
}

#[test]
fn swap_in_and_out() {
    let v = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let mut avg = WeightAverage::from_named(vec![named(&v, "w")], AverageKind::Polyak).unwrap();
    // Nothing to swap in yet: the error names the call made.
    let err = avg.swap_in().unwrap_err().to_string();
    assert!(
        err.contains("WeightAverage::swap_in") && err.contains("no update yet"),
        "{err}"
    );
    for i in 1..=4 {
        v.set(
            &Tensor::new(seq(i).as_slice(), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
        avg.update().unwrap();
    }
    let training = vals(v.as_tensor());
    avg.swap_in().unwrap();
    assert!(avg.is_swapped_in());
    let mean: Vec<f64> = (0..3)
        .map(|c| (1..=4).map(|i| seq(i)[c]).sum::<f64>() / 4.0)
        .collect();
    for (a, m) in vals(v.as_tensor()).iter().zip(&mean) {
        assert!((a - m).abs() < 1e-5, "{a} vs {m}");
    }
    assert!(avg.swap_in().is_err());
    assert!(avg.update().is_err(), "no update while swapped in");
    avg.swap_out().unwrap();
    assert_eq!(vals(v.as_tensor()), training);
    assert!(avg.swap_out().is_err());
}

/// An optimizer step taken while the average is swapped in would be lost at
/// `swap_out`: it is refused, changing nothing (the stepped weights stay,
/// still swapped in), and `swap_out_discarding` puts the training weights
/// back. The check is exact, per variable, in the variables' dtype (bf16
/// here), and a NaN in the average does not read as a change.
#[test]
fn a_step_while_swapped_in_is_caught_at_swap_out() {
    for dtype in [DType::F32, DType::BF16] {
        let a = Var::zeros(3, dtype, &Device::Cpu).unwrap();
        let b = Var::zeros(2, dtype, &Device::Cpu).unwrap();
        let mut avg = WeightAverage::from_named(
            vec![named(&a, "a"), named(&b, "b")],
            AverageKind::Ema { decay: 0.9 },
        )
        .unwrap();
        for i in 1..=3 {
            let x = Tensor::new(&[i as f32, -0.3, 1e-3], &Device::Cpu).unwrap();
            a.set(&x.to_dtype(dtype).unwrap()).unwrap();
            b.set(
                &Tensor::new(&[0.7f32 * i as f32, f32::NAN], &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            avg.update().unwrap();
        }
        // (as bits: NaN = NaN)
        let both = || -> Vec<u64> {
            [vals(a.as_tensor()), vals(b.as_tensor())]
                .concat()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        let training = both();
        // No change: swap_out works (b's average holds a NaN).
        avg.swap_in().unwrap();
        avg.swap_out().unwrap();
        assert_eq!(both(), training);
        // A step on `a` while swapped in.
        let mut opt = Sgd::new(
            vec![a.clone()],
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        avg.swap_in().unwrap();
        opt.backward_step(
            &a.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap(),
        )
        .unwrap();
        let stepped = vals(a.as_tensor());
        let e = avg.swap_out().unwrap_err().to_string();
        assert!(
            e.contains("1 variable(s) (a) changed while the average was swapped in"),
            "{e}"
        );
        assert!(avg.is_swapped_in(), "{dtype:?}: still swapped in");
        assert_eq!(vals(a.as_tensor()), stepped, "{dtype:?}: nothing changed");
        avg.swap_out_discarding().unwrap();
        assert_eq!(both(), training);
        assert!(avg.swap_out_discarding().is_err());
    }
}

/// An f32 EMA follows the f64 EMA of the same (f32) values: each update
/// moves the average by `(1 − β)(x − a)`, so its error is rounding only
/// (9e-6 relative here). Written as `βa + (1 − β)x`, with β and 1 − β
/// rounded to f32 apart (their sum is 1 − 1.7e-8 at β = 0.9999), the
/// average settled 1.7e-4 low: 1.4e-4 on this slowly drifting ramp.
#[test]
fn an_f32_ema_has_no_bias_from_rounding_beta() {
    let beta = 0.9999;
    let n = 30_000;
    let ramp = |i: usize| -> Vec<f32> {
        let t = i as f32 / n as f32;
        vec![1.0 + 0.5 * t, -3.0 + t, 0.25 - 0.1 * t]
    };
    let v = Var::new(ramp(0).as_slice(), &Device::Cpu).unwrap();
    let mut ema =
        WeightAverage::from_named(vec![named(&v, "w")], AverageKind::Ema { decay: beta }).unwrap();
    let mut want: Vec<f64> = ramp(0).iter().map(|&x| x as f64).collect();
    ema.update().unwrap();
    for i in 1..n {
        let x = ramp(i);
        v.set(&Tensor::new(x.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        ema.update().unwrap();
        for (w, &xi) in want.iter_mut().zip(&x) {
            *w = beta * *w + (1.0 - beta) * xi as f64;
        }
    }
    let got = vals(&ema.averaged().unwrap()[0].1);
    for (g, w) in got.iter().zip(&want) {
        assert!(((g - w) / w).abs() < 4e-5, "{g} vs {w}: {:e}", (g - w) / w);
    }
}

/// An f32 Polyak average keeps following the mean after many updates. Plain
/// f32 additions of `(x − θ̄)/n` stopped moving the average once the
/// increment fell below half an ulp of `θ̄`: here iterates `1e-4` above a
/// base for 10 000 updates, then `1e-4` below it, have the base as mean, but
/// the uncompensated average stayed at the first plateau (error 1e-4).
#[test]
fn an_f32_polyak_average_keeps_moving_after_many_updates() {
    let n = 20_000;
    let base = [1.0f32, -3.0, 0.25];
    let iterate = |i: usize| -> Vec<f32> {
        let d = if i < n / 2 { 1e-4 } else { -1e-4 };
        base.iter().map(|b| b + d * b.abs()).collect()
    };
    let v = Var::new(iterate(0).as_slice(), &Device::Cpu).unwrap();
    let mut pol = WeightAverage::from_named(vec![named(&v, "w")], AverageKind::Polyak).unwrap();
    let mut sum = vec![0.0f64; 3];
    for i in 0..n {
        let x = iterate(i);
        v.set(&Tensor::new(x.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        pol.update().unwrap();
        for (s, &xi) in sum.iter_mut().zip(&x) {
            *s += xi as f64;
        }
    }
    let got = vals(&pol.averaged().unwrap()[0].1);
    for (g, s) in got.iter().zip(&sum) {
        let want = s / n as f64;
        assert!(
            ((g - want) / want).abs() < 1e-6,
            "{g} vs {want}: {:e}",
            (g - want) / want
        );
    }
}

/// Polyak's compensation is saved as `<param>.avg_comp`; a checkpoint
/// without it (saved before it was kept) loads with zero compensation, one
/// with it for some parameters only is refused, and so is an EMA checkpoint
/// carrying one.
#[test]
fn polyak_compensation_is_saved_and_optional_on_load() {
    let vm = varmap(3, &["a.weight", "b.weight"]);
    let mut pol = WeightAverage::from_varmap(&vm, AverageKind::Polyak).unwrap();
    let mut ema = WeightAverage::from_varmap(&vm, AverageKind::Ema { decay: 0.9 }).unwrap();
    for s in 0..5 {
        perturb(&vm, s);
        pol.update().unwrap();
        ema.update().unwrap();
    }
    let state = pol.state_dict().unwrap();
    assert!(
        state.contains_key("a.weight.avg_comp"),
        "{:?}",
        state.keys()
    );
    let mut partial = state.clone();
    let comp = partial.remove("a.weight.avg_comp").unwrap();
    let mut fresh = WeightAverage::from_varmap(&vm, AverageKind::Polyak).unwrap();
    let e = fresh.load_state_dict(&partial).unwrap_err().to_string();
    assert!(
        e.contains("a.weight.avg_comp") && e.contains("missing"),
        "{e}"
    );
    assert!(
        fresh.averaged().is_err(),
        "the refused load changed nothing"
    );
    let mut old = partial.clone();
    old.remove("b.weight.avg_comp").unwrap();
    fresh.load_state_dict(&old).unwrap();
    let want = vals(&old["a.weight.avg"]);
    assert_eq!(vals(&fresh.averaged().unwrap()[0].1), want);
    assert!(vals(&fresh.state_dict().unwrap()["a.weight.avg_comp"])
        .iter()
        .all(|c| *c == 0.0));

    let mut ema_state = ema.state_dict().unwrap();
    ema_state.insert("a.weight.avg_comp".into(), comp);
    let before = snapshot(&ema.state_dict().unwrap());
    let e = ema.load_state_dict(&ema_state).unwrap_err().to_string();
    assert!(e.contains("a.weight.avg_comp"), "{e}");
    assert_eq!(snapshot(&ema.state_dict().unwrap()), before);
}

/// swap_out's check of unchanged variables is exact beyond 2²⁴ entries (a
/// count of equal entries summed in f32 lost the last ones there, and an
/// unchanged variable was refused as changed); one changed entry among as
/// many is still caught.
#[test]
fn swap_out_checks_variables_beyond_f32_counting() {
    let n = (1 << 24) + 7;
    let v = Var::from_tensor(&Tensor::ones(n, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let mut avg = WeightAverage::from_named(vec![named(&v, "big")], AverageKind::Polyak).unwrap();
    avg.update().unwrap();
    avg.swap_in().unwrap();
    avg.swap_out().unwrap();
    avg.swap_in().unwrap();
    let mut changed = vec![1f32; n];
    changed[n - 1] = 2.0;
    v.set(&Tensor::from_vec(changed, n, &Device::Cpu).unwrap())
        .unwrap();
    let e = avg.swap_out().unwrap_err().to_string();
    assert!(e.contains("1 variable(s) (big) changed"), "{e}");
}

/// `swap_out` counts changed entries exactly: a change of a single entry of
/// one variable (the smallest change a step can make) is refused, naming
/// that variable only, and nothing changes.
#[test]
fn a_change_of_one_entry_is_caught_at_swap_out() {
    let a = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
    let b = Var::new(&[4f32, 5.0], &Device::Cpu).unwrap();
    let mut avg =
        WeightAverage::from_named(vec![named(&a, "a"), named(&b, "b")], AverageKind::Polyak)
            .unwrap();
    avg.update().unwrap();
    avg.swap_in().unwrap();
    b.set(&Tensor::new(&[4f32, 5.5], &Device::Cpu).unwrap())
        .unwrap();
    let e = avg.swap_out().unwrap_err();
    assert!(matches!(e, steepest::Error::Config { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("1 variable(s) (b) changed"), "{e}");
    assert!(avg.is_swapped_in());
    assert_eq!(vals(b.as_tensor()), [4.0, 5.5], "nothing changed");
    assert_eq!(vals(a.as_tensor()), [1.0, 2.0, 3.0]);
}

fn varmap(seed: u64, names: &[&str]) -> VarMap {
    let vm = VarMap::new();
    let mut rng = StdRng::seed_from_u64(seed);
    {
        let mut data = vm.data().lock().unwrap();
        for n in names {
            let x: Vec<f32> = (0..6).map(|_| rng.gen_range(-1.0..1.0)).collect();
            data.insert(
                n.to_string(),
                Var::from_vec(x, (2, 3), &Device::Cpu).unwrap(),
            );
        }
    }
    vm
}

/// Moves every var of `vm` deterministically (a stand-in for a training step).
fn perturb(vm: &VarMap, step: usize) {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort(); // HashMap order differs between VarMaps
    for (i, v) in names.iter().map(|n| &data[*n]).enumerate() {
        let d = Tensor::full(((step * 7 + i) as f32 * 0.37).sin(), (2, 3), &Device::Cpu).unwrap();
        v.set(&(v.as_tensor() + d).unwrap()).unwrap();
    }
}

fn snapshot(state: &HashMap<String, Tensor>) -> Vec<(String, Vec<f64>)> {
    let mut v: Vec<_> = state.iter().map(|(k, t)| (k.clone(), vals(t))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn save_load_continue_is_identical() {
    let dir = std::env::temp_dir().join(format!("steepest-avg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kinds = [
        AverageKind::Ema { decay: 0.8 },
        AverageKind::Polyak,
        AverageKind::Wsm {
            weights: wsm_weights_for_shape(DecayShape::OneMinusSqrt, 3).unwrap(),
            interval: 2,
        },
    ];
    for (ki, kind) in kinds.iter().enumerate() {
        let names = ["a.weight", "b.weight"];
        let vm = varmap(1, &names);
        let mut avg = WeightAverage::from_varmap(&vm, kind.clone()).unwrap();
        for s in 0..7 {
            perturb(&vm, s);
            avg.update().unwrap();
        }
        let path = dir.join(format!("avg{ki}.safetensors"));
        avg.save_state(&path).unwrap();
        for s in 7..15 {
            perturb(&vm, s);
            avg.update().unwrap();
        }
        let want = snapshot(&avg.state_dict().unwrap());
        let want_avg: Vec<Vec<f64>> = avg
            .averaged()
            .unwrap()
            .iter()
            .map(|(_, t)| vals(t))
            .collect();

        // resume: same model state at step 7, fresh averager with another
        // hyperparameter (restored from the checkpoint)
        let vm2 = varmap(1, &names);
        for s in 0..7 {
            perturb(&vm2, s);
        }
        let other = match kind {
            AverageKind::Ema { .. } => AverageKind::Ema { decay: 0.5 },
            AverageKind::Polyak => AverageKind::Polyak,
            AverageKind::Wsm { .. } => AverageKind::Wsm {
                weights: vec![0.5, 0.5],
                interval: 1,
            },
        };
        let mut avg2 = WeightAverage::from_varmap(&vm2, other).unwrap();
        avg2.load_state(&path).unwrap();
        assert_eq!(avg2.kind(), kind);
        for s in 7..15 {
            perturb(&vm2, s);
            avg2.update().unwrap();
        }
        assert_eq!(snapshot(&avg2.state_dict().unwrap()), want);
        let got_avg: Vec<Vec<f64>> = avg2
            .averaged()
            .unwrap()
            .iter()
            .map(|(_, t)| vals(t))
            .collect();
        assert_eq!(got_avg, want_avg);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn mismatched_checkpoints_are_refused_without_change() {
    let vm = varmap(2, &["a.weight", "b.weight"]);
    let mut ema = WeightAverage::from_varmap(&vm, AverageKind::Ema { decay: 0.9 }).unwrap();
    let mut pol = WeightAverage::from_varmap(&vm, AverageKind::Polyak).unwrap();
    for s in 0..3 {
        perturb(&vm, s);
        ema.update().unwrap();
        pol.update().unwrap();
    }
    let ema_state = ema.state_dict().unwrap();
    let before = snapshot(&pol.state_dict().unwrap());
    // another kind
    let e = pol.load_state_dict(&ema_state).unwrap_err().to_string();
    assert!(e.contains("average_ema"), "{e}");
    assert_eq!(snapshot(&pol.state_dict().unwrap()), before);

    // another model (different parameter names)
    let vm_other = varmap(2, &["a.weight", "c.weight"]);
    let mut other = WeightAverage::from_varmap(&vm_other, AverageKind::Ema { decay: 0.9 }).unwrap();
    perturb(&vm_other, 0);
    other.update().unwrap();
    let before = snapshot(&ema.state_dict().unwrap());
    let e = ema
        .load_state_dict(&other.state_dict().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("parameter names"), "{e}");
    assert_eq!(snapshot(&ema.state_dict().unwrap()), before);

    // a slot of the wrong shape
    let mut bad = ema_state.clone();
    bad.insert(
        "a.weight.avg".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = ema.load_state_dict(&bad).unwrap_err().to_string();
    assert!(e.contains("a.weight.avg") && e.contains("shape"), "{e}");
    assert_eq!(snapshot(&ema.state_dict().unwrap()), before);

    // an optimizer's checkpoint is not an averaging checkpoint
    let sgd = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    assert!(ema.load_state_dict(&sgd.state_dict().unwrap()).is_err());
    assert_eq!(snapshot(&ema.state_dict().unwrap()), before);
}

/// The EMA decay is in `[0, 1)` (`AverageKind::Ema`'s docs): `β = 1` would
/// never move the average off the first iterate and is refused, as are
/// negative and non-finite decays; `β = 0` (the last iterate) is accepted.
#[test]
fn ema_decay_outside_zero_to_one_is_refused() {
    let v = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let make =
        |decay: f64| WeightAverage::from_named(vec![named(&v, "w")], AverageKind::Ema { decay });
    for bad in [1.0, 1.5, -0.1, f64::NAN] {
        let e = make(bad).unwrap_err().to_string();
        assert!(e.contains("Ema.decay"), "decay {bad}: {e}");
    }
    assert!(make(0.0).is_ok());
}

/// WSM's settings (`AverageKind::Wsm`'s docs): an interval of 0, no
/// weights, a negative or non-finite weight, and weights that do not sum to 1
/// (a merge that would scale the parameters) are refused, naming the field;
/// weights summing to 1 within rounding are accepted.
#[test]
fn wsm_settings_outside_their_range_are_refused() {
    let v = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let make = |weights: Vec<f64>, interval: usize| {
        WeightAverage::from_named(vec![named(&v, "w")], AverageKind::Wsm { weights, interval })
    };
    for (weights, interval, says) in [
        (vec![0.5, 0.5], 0, "Wsm.interval"),
        (vec![], 1, "is empty"),
        (vec![1.5, -0.5], 1, "finite and ≥ 0"),
        (vec![f64::NAN, 1.0], 1, "finite and ≥ 0"),
        (vec![0.5, 0.45], 1, "must sum to 1"),
        (vec![0.6, 0.6], 1, "must sum to 1"),
    ] {
        let e = make(weights.clone(), interval).unwrap_err().to_string();
        assert!(e.contains(says), "{weights:?}, interval {interval}: {e}");
    }
    assert!(make(vec![0.1, 0.2, 0.7], 2).is_ok());
    assert!(make(vec![1.0 / 3.0; 3], 1).is_ok());
}

/// An average that is not ready names the call made: `averaged` itself, and
/// `swap_in` for WSM too (not only for EMA / Polyak), changing nothing.
#[test]
fn an_average_not_ready_names_the_call_made() {
    let v = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let pol = WeightAverage::from_named(vec![named(&v, "w")], AverageKind::Polyak).unwrap();
    let e = pol.averaged().unwrap_err().to_string();
    assert!(
        e.contains("WeightAverage::averaged") && e.contains("no update yet"),
        "{e}"
    );
    let kind = AverageKind::Wsm {
        weights: vec![0.5, 0.5],
        interval: 1,
    };
    let mut wsm = WeightAverage::from_named(vec![named(&v, "w")], kind).unwrap();
    wsm.update().unwrap();
    let e = wsm.averaged().unwrap_err().to_string();
    assert!(
        e.contains("WeightAverage::averaged") && e.contains("WSM holds 1 of the 2"),
        "{e}"
    );
    let e = wsm.swap_in().unwrap_err().to_string();
    assert!(
        e.contains("WeightAverage::swap_in") && e.contains("WSM holds 1 of the 2"),
        "{e}"
    );
    assert!(!wsm.is_swapped_in());
}
