//! The taped dfdx op: gradients through `loss.backward()` against dfdx's own dense
//! attention (matmul + softmax), against the float64 oracle on dilated schedules, and
//! against finite differences; `NoneTape`, mixed tapes and strided inputs.

mod common;

use common::{assert_close, normal};
use dfdx::shapes::{Axes4, Axis};
use dfdx::tensor::{Cpu, NoneTape, OwnedTape, Trace};
use dfdx::tensor_ops::SumTo;
use dfdx::tensor_ops::{Backward, BroadcastTo, PermuteTo, TryMatMul};
use dilated_attention::ops::reference;
use dilated_attention::prelude::*;

type T4<const B: usize, const N: usize, const H: usize, const D: usize, E> =
    Tensor<Rank4<B, N, H, D>, E, Cpu>;

fn tensor<
    const B: usize,
    const N: usize,
    const H: usize,
    const D: usize,
    E: Element + dfdx::shapes::Dtype,
>(
    dev: &Cpu,
    seed: u64,
) -> T4<B, N, H, D, E> {
    let v: Vec<E> = normal(seed, B * N * H * D).into_iter().map(E::of).collect();
    dev.tensor_from_vec(v, (Const, Const, Const, Const))
}

fn f64s<E: Element>(v: Vec<E>) -> Vec<f64> {
    v.into_iter().map(Element::f64).collect()
}

/// dfdx's own attention: permute to `(B, H, N, D)`, `softmax(q kᵀ · scale + mask) v`.
fn dfdx_dense<const B: usize, const N: usize, const H: usize, const D: usize>(
    q: Tensor<Rank4<B, N, H, D>, f64, Cpu, OwnedTape<f64, Cpu>>,
    k: Tensor<Rank4<B, N, H, D>, f64, Cpu, OwnedTape<f64, Cpu>>,
    v: Tensor<Rank4<B, N, H, D>, f64, Cpu, OwnedTape<f64, Cpu>>,
    causal: bool,
) -> Tensor<Rank4<B, N, H, D>, f64, Cpu, OwnedTape<f64, Cpu>> {
    let dev = Cpu::default();
    let q = q.permute::<_, Axes4<0, 2, 1, 3>>();
    let k = k.permute::<_, Axes4<0, 2, 3, 1>>();
    let v = v.permute::<_, Axes4<0, 2, 1, 3>>();
    let s = q.matmul(k) * (1.0 / (D as f64).sqrt());
    let mut bias = vec![0.0f64; N * N];
    if causal {
        for p in 0..N {
            for kk in p + 1..N {
                bias[p * N + kk] = f64::NEG_INFINITY;
            }
        }
    }
    let bias: Tensor<Rank2<N, N>, f64, Cpu> = dev.tensor_from_vec(bias, (Const, Const));
    let s = s + bias.broadcast::<Rank4<B, H, N, N>, _>();
    let p = s.softmax::<Axis<3>>();
    p.matmul(v).permute::<_, Axes4<0, 2, 1, 3>>()
}

#[test]
fn dense_schedule_matches_dfdx_matmul_softmax() {
    const B: usize = 2;
    const N: usize = 24;
    const H: usize = 3;
    const D: usize = 5;
    let dev = Cpu::default();
    for causal in [false, true] {
        let seed = 11 + causal as u64;
        let (q, k, v) = (
            tensor::<B, N, H, D, f64>(&dev, seed),
            tensor::<B, N, H, D, f64>(&dev, seed + 100),
            tensor::<B, N, H, D, f64>(&dev, seed + 200),
        );
        let w = tensor::<B, N, H, D, f64>(&dev, seed + 300);

        let ours = DilatedAttention::<Seg<N, 1>>::new()
            .causal(causal)
            .forward_taped(q.leaky_trace(), k.leaky_trace(), v.leaky_trace());
        let ours_out = ours.as_vec();
        let g1 = (ours * w.clone()).sum().backward();

        let theirs = dfdx_dense(q.leaky_trace(), k.leaky_trace(), v.leaky_trace(), causal);
        let theirs_out = theirs.as_vec();
        let g2 = (theirs * w.clone()).sum().backward();

        let ctx = format!("dense causal={causal} seed={seed}");
        assert_close("out", &ours_out, &theirs_out, 1e-12, 0.0, &ctx);
        for (name, t) in [("dq", &q), ("dk", &k), ("dv", &v)] {
            assert_close(
                name,
                &g1.get(t).as_vec(),
                &g2.get(t).as_vec(),
                1e-12,
                0.0,
                &ctx,
            );
        }
    }
}

/// Taped op in `E` vs the oracle's gradients, loss `Σ out ⊙ w`.
fn check_vs_oracle<S: Schedule, C: CombineKind, E>(
    attn: DilatedAttention<S, C>,
    with_mask: bool,
    seed: u64,
    tol: f64,
) where
    E: Element + dfdx::shapes::Dtype,
    Cpu: dfdx::tensor_ops::Device<E>,
{
    const B: usize = 2;
    const N: usize = 32;
    const H: usize = 4;
    const HKV: usize = 2;
    const D: usize = 6;
    let dev = Cpu::default();
    let q = tensor::<B, N, H, D, E>(&dev, seed);
    let k = tensor::<B, N, HKV, D, E>(&dev, seed + 1);
    let v = tensor::<B, N, HKV, D, E>(&dev, seed + 2);
    let w = tensor::<B, N, H, D, E>(&dev, seed + 3);
    let mask_v: Vec<bool> = (0..B * N)
        .map(|i| !(i * 7 + seed as usize).is_multiple_of(5))
        .collect();
    let mask: KeyMask<Const<B>, N> = dev.tensor_from_vec(mask_v.clone(), (Const, Const));
    let mask = with_mask.then_some(&mask);

    let out = attn
        .try_forward_taped(q.leaky_trace(), k.leaky_trace(), v.leaky_trace(), mask)
        .unwrap();
    let got_out = f64s(out.as_vec());
    let grads = (out * w.clone()).sum().backward();

    let plan = attn.plan::<N, H, HKV, D>(B).unwrap();
    let (qd, kd, vd, wd) = (
        f64s(q.as_vec()),
        f64s(k.as_vec()),
        f64s(v.as_vec()),
        f64s(w.as_vec()),
    );
    let m = with_mask.then_some(&mask_v[..]);
    let fwd = reference::forward(&plan, &qd, &kd, &vd, m).unwrap();
    let want = reference::backward(&plan, &qd, &kd, &vd, m, &wd).unwrap();
    let ctx = format!(
        "{:?} {} mask={with_mask} seed={seed}",
        plan.options(),
        E::NAME
    );
    assert_close("out", &got_out, &fwd.out, tol, 0.0, &ctx);
    assert_close(
        "dq",
        &f64s(grads.get(&q).as_vec()),
        &want.dq,
        tol,
        0.0,
        &ctx,
    );
    assert_close(
        "dk",
        &f64s(grads.get(&k).as_vec()),
        &want.dk,
        tol,
        0.0,
        &ctx,
    );
    assert_close(
        "dv",
        &f64s(grads.get(&v).as_vec()),
        &want.dv,
        tol,
        0.0,
        &ctx,
    );
}

type Sched = (Seg<8, 1>, Seg<16, 2>, Seg<32, 4>);

#[test]
fn dilated_schedules_match_oracle_gradients() {
    let base = DilatedAttention::<Sched>::new();
    for (i, with_mask) in [false, true].into_iter().enumerate() {
        let s = 40 + 10 * i as u64;
        check_vs_oracle::<_, _, f64>(base, with_mask, s, 1e-11);
        check_vs_oracle::<_, _, f64>(base.causal(true), with_mask, s + 1, 1e-11);
        check_vs_oracle::<_, _, f64>(base.detach_weights(true), with_mask, s + 2, 1e-11);
        check_vs_oracle::<_, _, f32>(base.causal(true).scale(0.3), with_mask, s + 3, 2e-5);
        let groups = DilatedAttention::<Sched, HeadGroupCombine>::new().causal(true);
        check_vs_oracle::<_, _, f64>(groups, with_mask, s + 4, 1e-11);
        check_vs_oracle::<_, _, f32>(groups, with_mask, s + 5, 2e-5);
    }
}

#[test]
fn finite_differences() {
    const N: usize = 8;
    const H: usize = 2;
    const HKV: usize = 1;
    const D: usize = 3;
    let dev = Cpu::default();
    let attn = DilatedAttention::<(Seg<4, 1>, Seg<8, 2>)>::new().causal(true);
    let q = tensor::<1, N, H, D, f64>(&dev, 7);
    let k = tensor::<1, N, HKV, D, f64>(&dev, 8);
    let v = tensor::<1, N, HKV, D, f64>(&dev, 9);
    let w = tensor::<1, N, H, D, f64>(&dev, 10);
    let mask: KeyMask<Const<1>, N> =
        dev.tensor_from_vec((0..N).map(|i| i != 2).collect(), (Const, Const));

    let loss = |q: &T4<1, N, H, D, f64>, k: &T4<1, N, HKV, D, f64>, v: &T4<1, N, HKV, D, f64>| {
        let (out, _) = attn.try_forward(q, k, v, Some(&mask)).unwrap();
        out.as_vec()
            .iter()
            .zip(w.as_vec())
            .map(|(o, w)| o * w)
            .sum::<f64>()
    };
    let out = attn
        .try_forward_taped(
            q.leaky_trace(),
            k.leaky_trace(),
            v.leaky_trace(),
            Some(&mask),
        )
        .unwrap();
    let grads = (out * w.clone()).sum().backward();

    let eps = 1e-6;
    let bump = |x: &Vec<f64>, i: usize, d: f64| {
        let mut y = x.clone();
        y[i] += d;
        y
    };
    let (qv, kv, vv) = (q.as_vec(), k.as_vec(), v.as_vec());
    let fd = |which: usize, n: usize| -> Vec<f64> {
        (0..n)
            .map(|i| {
                let f = |d: f64| match which {
                    0 => loss(
                        &dev.tensor_from_vec(bump(&qv, i, d), (Const, Const, Const, Const)),
                        &k,
                        &v,
                    ),
                    1 => loss(
                        &q,
                        &dev.tensor_from_vec(bump(&kv, i, d), (Const, Const, Const, Const)),
                        &v,
                    ),
                    _ => loss(
                        &q,
                        &k,
                        &dev.tensor_from_vec(bump(&vv, i, d), (Const, Const, Const, Const)),
                    ),
                };
                (f(eps) - f(-eps)) / (2.0 * eps)
            })
            .collect()
    };
    let ctx = "finite differences, causal, masked key 2";
    assert_close(
        "dq",
        &grads.get(&q).as_vec(),
        &fd(0, qv.len()),
        1e-7,
        1e-8,
        &ctx,
    );
    assert_close(
        "dk",
        &grads.get(&k).as_vec(),
        &fd(1, kv.len()),
        1e-7,
        1e-8,
        &ctx,
    );
    assert_close(
        "dv",
        &grads.get(&v).as_vec(),
        &fd(2, vv.len()),
        1e-7,
        1e-8,
        &ctx,
    );
}

#[test]
fn none_tape_and_mixed_tapes() {
    const N: usize = 16;
    let dev = Cpu::default();
    let attn = DilatedAttention::<(Seg<4, 1>, Seg<16, 4>)>::new();
    let q = tensor::<2, N, 2, 4, f64>(&dev, 1);
    let k = tensor::<2, N, 2, 4, f64>(&dev, 2);
    let v = tensor::<2, N, 2, 4, f64>(&dev, 3);
    // NoneTape everywhere: the plain forward, no tape.
    let out: Tensor<_, f64, Cpu, NoneTape> = attn.forward_taped(q.clone(), k.clone(), v.clone());
    let (plain, _) = attn.forward(&q, &k, &v);
    assert_eq!(out.as_vec(), plain.as_vec());
    // Tape on q only: dq equals dq with all three traced.
    let g_q = attn
        .forward_taped(q.leaky_trace(), k.clone(), v.clone())
        .square()
        .sum()
        .backward();
    let g_all = attn
        .forward_taped(q.leaky_trace(), k.leaky_trace(), v.leaky_trace())
        .square()
        .sum()
        .backward();
    assert_eq!(g_q.get(&q).as_vec(), g_all.get(&q).as_vec());
    // Same tensor as q, k and v (self-attention on raw inputs): gradients add up.
    let g_self = attn
        .forward_taped(q.leaky_trace(), q.clone(), q.clone())
        .square()
        .sum()
        .backward();
    // Distinct tensors holding the same values as q: dq + dk + dv.
    let (a, b, c) = (
        tensor::<2, N, 2, 4, f64>(&dev, 1),
        tensor::<2, N, 2, 4, f64>(&dev, 1),
        tensor::<2, N, 2, 4, f64>(&dev, 1),
    );
    let g = attn
        .forward_taped(a.leaky_trace(), b.leaky_trace(), c.leaky_trace())
        .square()
        .sum()
        .backward();
    let (ga, gb, gc) = (g.get(&a).as_vec(), g.get(&b).as_vec(), g.get(&c).as_vec());
    let parts: Vec<f64> = (0..ga.len()).map(|i| ga[i] + gb[i] + gc[i]).collect();
    assert_close(
        "d(self)",
        &g_self.get(&q).as_vec(),
        &parts,
        1e-12,
        0.0,
        &"self-attention",
    );
}

#[test]
fn strided_and_broadcast_inputs() {
    const B: usize = 2;
    const N: usize = 16;
    const H: usize = 2;
    const D: usize = 4;
    let dev = Cpu::default();
    let attn = DilatedAttention::<(Seg<8, 2>, Seg<16, 1>)>::new().causal(true);
    // q as a permuted view of a (B, H, N, D) tensor; k shared across the batch.
    let x: Tensor<Rank4<B, H, N, D>, f64, Cpu> =
        dev.tensor_from_vec(normal(5, B * H * N * D), (Const, Const, Const, Const));
    let k3: Tensor<Rank3<N, H, D>, f64, Cpu> =
        dev.tensor_from_vec(normal(6, N * H * D), (Const, Const, Const));
    let v = tensor::<B, N, H, D, f64>(&dev, 7);

    let out = attn.forward_taped(
        x.leaky_trace()
            .permute::<Rank4<B, N, H, D>, Axes4<0, 2, 1, 3>>(),
        k3.leaky_trace().broadcast::<Rank4<B, N, H, D>, _>(),
        v.clone(),
    );
    let g = out.square().sum().backward();

    // The same with contiguous copies.
    let q = dev.tensor_from_vec(
        x.clone()
            .permute::<Rank4<B, N, H, D>, Axes4<0, 2, 1, 3>>()
            .as_vec(),
        (Const, Const, Const, Const),
    );
    let k = dev.tensor_from_vec(
        k3.clone().broadcast::<Rank4<B, N, H, D>, _>().as_vec(),
        (Const, Const, Const, Const),
    );
    let g2 = attn
        .forward_taped(q.leaky_trace(), k.leaky_trace(), v.clone())
        .square()
        .sum()
        .backward();
    let want_dx = g2
        .get(&q)
        .permute::<Rank4<B, H, N, D>, Axes4<0, 2, 1, 3>>()
        .as_vec();
    let dk = g2.get(&k).as_vec();
    let want_dk3: Vec<f64> = (0..N * H * D).map(|i| dk[i] + dk[N * H * D + i]).collect();
    assert_close(
        "dx",
        &g.get(&x).as_vec(),
        &want_dx,
        1e-12,
        0.0,
        &"permuted q",
    );
    assert_close(
        "dk3",
        &g.get(&k3).as_vec(),
        &want_dk3,
        1e-12,
        0.0,
        &"broadcast k",
    );
}
