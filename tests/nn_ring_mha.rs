//! `RingMultiheadDilatedAttention` (the module over a ring of loopback ranks) vs the
//! single-device `MultiheadDilatedAttention` with the same parameters: for random world
//! sizes 1–4, local lengths, schedules, causal or not, both layouts, GQA, both combines,
//! key padding masks and batches, every rank's output rows and input-gradient rows equal
//! the single-device ones, the per-rank parameter gradients sum to the single-device
//! gradients, and after `try_all_reduce_grads` every rank holds exactly those (f64).
//!
//! Replay: the panic message prints the whole case; `PROPTEST_CASES=500 cargo test
//! --test nn_ring_mha` runs a longer search.

mod common;

use std::rc::Rc;

use common::{assert_close, cases, normal};
use dfdx::nn::DeviceBuildExt;
use dfdx::tensor::{Gradients, Trace};
use dfdx::tensor_ops::{Backward, SumTo};
use dilated_attention::nn::{builder, magneto_gamma, Causality, RingMultiheadDilatedAttention};
use dilated_attention::prelude::*;
use dilated_attention::ring::{loopback, try_all_reduce_sum};
use proptest::prelude::*;

/// The random part of a case; the shapes and the schedule come from `config`.
#[derive(Debug, Clone)]
struct Draw {
    config: usize,
    causal: bool,
    zigzag: bool,
    batch: usize,
    masked: bool,
    seed: u64,
}

impl Draw {
    fn layout(&self) -> Layout {
        if self.zigzag {
            Layout::Zigzag
        } else {
            Layout::Contiguous
        }
    }
}

type Mhda<const M: usize, const H: usize, const HKV: usize, const HD: usize, S, A, C> =
    MultiheadDilatedAttention<M, H, HKV, HD, S, f64, Cpu, A, C>;

/// Every parameter gradient of the module, in a fixed order, flattened.
fn param_grads<const M: usize, const H: usize, const HKV: usize, const HD: usize, S, A, C>(
    m: &Mhda<M, H, HKV, HD, S, A, C>,
    g: &Gradients<f64, Cpu>,
) -> Vec<(&'static str, Vec<f64>)>
where
    S: Schedule,
    A: Causality,
    C: CombineKind,
{
    vec![
        ("w_q.weight", g.get(&m.w_q.weight).as_vec()),
        ("w_q.bias", g.get(&m.w_q.bias).as_vec()),
        ("w_k.weight", g.get(&m.w_k.weight).as_vec()),
        ("w_k.bias", g.get(&m.w_k.bias).as_vec()),
        ("w_v.weight", g.get(&m.w_v.weight).as_vec()),
        ("w_v.bias", g.get(&m.w_v.bias).as_vec()),
        ("norm.gamma", g.get(&m.norm.gamma).as_vec()),
        ("norm.beta", g.get(&m.norm.beta).as_vec()),
        ("w_o.weight", g.get(&m.w_o.weight).as_vec()),
        ("w_o.bias", g.get(&m.w_o.bias).as_vec()),
    ]
}

type Xs<const N: usize, const M: usize> = Tensor<(usize, Const<N>, Const<M>), f64, Cpu>;
type Mask<const N: usize> = KeyMask<usize, N>;

/// One rank's results: output rows, input-gradient rows, its own parameter gradients,
/// the all-reduced parameter gradients.
type RankOut = (
    Vec<f64>,
    Vec<f64>,
    Vec<(&'static str, Vec<f64>)>,
    Vec<(&'static str, Vec<f64>)>,
);

fn check<
    const M: usize,
    const H: usize,
    const HKV: usize,
    const HD: usize,
    S: Schedule + Sync,
    A: Causality,
    C: CombineKind,
    const LOCAL: usize,
    const WORLD: usize,
    const N: usize,
>(
    d: &Draw,
) {
    assert_eq!(N, LOCAL * WORLD, "test table: N = LOCAL * WORLD");
    let (b, layout) = (d.batch, d.layout());
    let dev = Cpu::seed_from_u64(d.seed);
    let mut mha: Mhda<M, H, HKV, HD, S, A, C> =
        dev.build_module::<builder::MultiheadDilatedAttention<M, H, HKV, HD, S, A, C>, f64>();
    mha.try_reset_magneto(magneto_gamma(2)).unwrap();
    // Non-trivial biases and LayerNorm, so that every gradient path carries signal.
    mha.w_q.bias.copy_from(&normal(d.seed ^ 1, H * HD));
    mha.w_k.bias.copy_from(&normal(d.seed ^ 2, HKV * HD));
    mha.w_v.bias.copy_from(&normal(d.seed ^ 3, HKV * HD));
    mha.norm.gamma.copy_from(&normal(d.seed ^ 4, M));
    mha.norm.beta.copy_from(&normal(d.seed ^ 5, M));
    mha.w_o.bias.copy_from(&normal(d.seed ^ 6, M));

    let xv = normal(d.seed ^ 7, b * N * M);
    let wv = normal(d.seed ^ 8, b * N * M);
    let mv: Option<Vec<bool>> = d.masked.then(|| {
        let r = normal(d.seed ^ 9, b * N);
        r.iter().map(|&z| z > -0.8).collect()
    });

    // One device, the whole sequence.
    let x: Xs<N, M> = dev.tensor_from_vec(xv.clone(), (b, Const, Const));
    let w: Xs<N, M> = dev.tensor_from_vec(wv.clone(), (b, Const, Const));
    let mask: Option<Mask<N>> = mv
        .as_ref()
        .map(|m| dev.tensor_from_vec(m.clone(), (b, Const)));
    let y = mha
        .try_forward_masked(x.leaky_trace(), mask.as_ref())
        .unwrap();
    let y_single = y.as_vec();
    let g = (y * w).sum().backward();
    let dx_single = g.get(&x).as_vec();
    let p_single = param_grads(&mha, &g);

    // The ring: the sequence split by the layout *before* the module.
    let xs = layout.split(&xv, b, M, WORLD).unwrap();
    let ws = layout.split(&wv, b, M, WORLD).unwrap();
    let ms = mv.as_ref().map(|m| layout.split(m, b, 1, WORLD).unwrap());
    let mha = &mha;
    let outs = loopback::run(WORLD, CommConfig::default(), |comm| -> Result<RankOut> {
        let ring = RingMultiheadDilatedAttention::<_, _, LOCAL, WORLD>::try_new(
            mha,
            Rc::new(comm),
            layout,
        )?;
        let r = ring.comm().rank();
        let dev = Cpu::default();
        let x: Xs<LOCAL, M> = dev.tensor_from_vec(xs[r].clone(), (b, Const, Const));
        let w: Xs<LOCAL, M> = dev.tensor_from_vec(ws[r].clone(), (b, Const, Const));
        let mask: Option<Mask<LOCAL>> = ms
            .as_ref()
            .map(|m| dev.tensor_from_vec(m[r].clone(), (b, Const)));
        let y = ring.try_forward_masked(x.leaky_trace(), mask.as_ref())?;
        let yv = y.as_vec();
        let mut g = (y * w).sum().backward();
        let st = ring.take_stats().expect("forward and backward ran");
        assert_eq!((st.rank, st.world), (r, WORLD));
        assert!(WORLD > 1 || st.bytes_sent == 0, "{st:?}");
        assert!(ring.take_stats().is_none() && ring.take_backward_error().is_none());
        // Inference (NoneTape) gives the same rows and records nothing.
        let y_inf = ring.try_forward_masked(x.clone(), mask.as_ref())?.as_vec();
        let diff = y_inf
            .iter()
            .zip(&yv)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff <= 1e-13, "inference vs training forward: {diff:e}");
        let own = param_grads(mha, &g);
        ring.try_all_reduce_grads(&mut g)?;
        Ok((yv, g.get(&x).as_vec(), own, param_grads(mha, &g)))
    })
    .unwrap();
    let outs: Vec<RankOut> = outs
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("rank failed: {e}; case {d:?}")))
        .collect();

    let (rel, abs) = (1e-11, 1e-12);
    let gather = |f: &dyn Fn(&RankOut) -> Vec<f64>| {
        layout
            .gather(&outs.iter().map(f).collect::<Vec<_>>(), b, M)
            .unwrap()
    };
    assert_close("out", &gather(&|o| o.0.clone()), &y_single, rel, abs, d);
    assert_close("dx", &gather(&|o| o.1.clone()), &dx_single, rel, abs, d);
    for (i, (name, want)) in p_single.iter().enumerate() {
        let mut sum = vec![0.0; want.len()];
        for o in &outs {
            sum.iter_mut().zip(&o.2[i].1).for_each(|(s, g)| *s += g);
        }
        assert_close(&format!("sum of rank {name}"), &sum, want, rel, abs, d);
        for o in &outs {
            assert_close(&format!("all-reduced {name}"), &o.3[i].1, want, rel, abs, d);
            assert_eq!(
                o.3[i].1, outs[0].3[i].1,
                "{name}: ranks disagree; case {d:?}"
            );
        }
    }
}

/// The table of typed configurations a case picks from:
/// `(M, H, HKV, HD, schedule, combine, LOCAL, WORLD, N = LOCAL·WORLD)`, each run causal
/// or not. Segments within a rank, across ranks (not aligned to chunks) and longer than
/// the sequence; GQA; `HeadGroups`.
macro_rules! dispatch {
    ($d:expr; $($i:literal => ($m:literal, $h:literal, $hkv:literal, $hd:literal, $s:ty, $c:ty,
                              $l:literal, $w:literal, $n:literal)),* $(,)?) => {
        match $d.config {
            $($i => if $d.causal {
                check::<$m, $h, $hkv, $hd, $s, Causal, $c, $l, $w, $n>(&$d)
            } else {
                check::<$m, $h, $hkv, $hd, $s, NonCausal, $c, $l, $w, $n>(&$d)
            },)*
            other => unreachable!("config {other}"),
        }
    };
}

const CONFIGS: usize = 8;

fn run_case(d: &Draw) {
    dispatch!(d;
        0 => (8, 2, 1, 4, (Seg<4, 1>, Seg<8, 2>), LseCombine, 8, 1, 8),
        1 => (8, 2, 2, 4, (Seg<2, 1>, Seg<8, 4>), LseCombine, 4, 2, 8),
        2 => (12, 4, 2, 3, (Seg<3, 1>, Seg<12, 2>), LseCombine, 6, 2, 12),
        3 => (8, 2, 1, 4, (Seg<6, 2>, Seg<12, 3>), LseCombine, 4, 3, 12),
        4 => (6, 3, 3, 2, (Seg<3, 1>, Seg<6, 3>), HeadGroupCombine, 2, 3, 6),
        5 => (8, 4, 2, 2, (Seg<2, 1>, Seg<8, 2>, Seg<16, 4>), LseCombine, 4, 4, 16),
        6 => (8, 2, 2, 4, (Seg<4, 1>, Seg<32, 4>), LseCombine, 2, 4, 8),
        7 => (8, 2, 1, 4, (Seg<6, 1>, Seg<24, 3>), LseCombine, 6, 4, 24),
    );
}

fn draw() -> impl Strategy<Value = Draw> {
    (
        0..CONFIGS,
        any::<bool>(),
        any::<bool>(),
        1usize..=2,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(config, causal, zigzag, batch, masked, seed)| Draw {
            config,
            causal,
            zigzag,
            batch,
            masked,
            seed,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    /// Outputs, input gradients and (summed) parameter gradients of the ring module equal
    /// the single-device module's.
    #[test]
    fn ring_module_matches_single_device(d in draw()) {
        run_case(&d);
    }
}

/// Every configuration of the table, both causalities and layouts, at least once.
#[test]
fn every_configuration() {
    for config in 0..CONFIGS {
        for (causal, zigzag) in [(false, false), (true, true)] {
            run_case(&Draw {
                config,
                causal,
                zigzag,
                batch: 2,
                masked: config % 2 == 0,
                seed: 1000 + config as u64,
            });
        }
    }
}

/// The fused-projection module over a ring vs on one device: outputs, input gradients
/// and all-reduced parameter gradients.
fn check_fused<
    const M: usize,
    const H: usize,
    const HD: usize,
    S: Schedule + Sync,
    A: Causality,
    const LOCAL: usize,
    const WORLD: usize,
    const N: usize,
>(
    layout: Layout,
    masked: bool,
    seed: u64,
) {
    use dilated_attention::nn::{FusedBuilder, FusedMultiheadDilatedAttention};
    type F<const M: usize, const H: usize, const HD: usize, S, A> =
        FusedMultiheadDilatedAttention<M, H, HD, S, f64, Cpu, A>;
    assert_eq!(N, LOCAL * WORLD);
    let ctx = (layout, masked, seed, WORLD, LOCAL);
    let dev = Cpu::seed_from_u64(seed);
    let mut m: F<M, H, HD, S, A> = dev.build_module::<FusedBuilder<M, H, HD, S, A>, f64>();
    m.w_qkv.bias.copy_from(&normal(seed ^ 1, 3 * H * HD));
    m.norm.gamma.copy_from(&normal(seed ^ 2, M));
    let b = 2;
    let xv = normal(seed ^ 3, b * N * M);
    let wv = normal(seed ^ 4, b * N * M);
    let mv: Option<Vec<bool>> =
        masked.then(|| normal(seed ^ 5, b * N).iter().map(|&z| z > -0.8).collect());
    let grads_of = |m: &F<M, H, HD, S, A>, g: &Gradients<f64, Cpu>| {
        [
            g.get(&m.w_qkv.weight).as_vec(),
            g.get(&m.w_qkv.bias).as_vec(),
            g.get(&m.norm.gamma).as_vec(),
            g.get(&m.norm.beta).as_vec(),
            g.get(&m.w_o.weight).as_vec(),
            g.get(&m.w_o.bias).as_vec(),
        ]
        .concat()
    };

    let x: Xs<N, M> = dev.tensor_from_vec(xv.clone(), (b, Const, Const));
    let w: Xs<N, M> = dev.tensor_from_vec(wv.clone(), (b, Const, Const));
    let mask: Option<Mask<N>> = mv
        .as_ref()
        .map(|v| dev.tensor_from_vec(v.clone(), (b, Const)));
    let y = m
        .try_forward_masked(x.leaky_trace(), mask.as_ref())
        .unwrap();
    let y_single = y.as_vec();
    let g = (y * w).sum().backward();
    let (dx_single, p_single) = (g.get(&x).as_vec(), grads_of(&m, &g));

    let xs = layout.split(&xv, b, M, WORLD).unwrap();
    let ws = layout.split(&wv, b, M, WORLD).unwrap();
    let ms = mv.as_ref().map(|v| layout.split(v, b, 1, WORLD).unwrap());
    let m = &m;
    let outs = loopback::run(WORLD, CommConfig::default(), |comm| {
        let ring = RingMultiheadDilatedAttention::<_, _, LOCAL, WORLD>::try_new_fused(
            m,
            Rc::new(comm),
            layout,
        )?;
        let r = ring.comm().rank();
        let dev = Cpu::default();
        let x: Xs<LOCAL, M> = dev.tensor_from_vec(xs[r].clone(), (b, Const, Const));
        let w: Xs<LOCAL, M> = dev.tensor_from_vec(ws[r].clone(), (b, Const, Const));
        let mask: Option<Mask<LOCAL>> = ms
            .as_ref()
            .map(|v| dev.tensor_from_vec(v[r].clone(), (b, Const)));
        let y = ring.try_forward_masked(x.leaky_trace(), mask.as_ref())?;
        let yv = y.as_vec();
        let mut g = (y * w).sum().backward();
        ring.try_all_reduce_grads(&mut g)?;
        Ok((yv, g.get(&x).as_vec(), grads_of(m, &g)))
    })
    .unwrap();
    let outs: Vec<_> = outs.into_iter().map(|r| r.unwrap()).collect();
    let (rel, abs) = (1e-11, 1e-12);
    let ys: Vec<Vec<f64>> = outs.iter().map(|o| o.0.clone()).collect();
    let dxs: Vec<Vec<f64>> = outs.iter().map(|o| o.1.clone()).collect();
    let ctx = &ctx;
    assert_close(
        "fused out",
        &layout.gather(&ys, b, M).unwrap(),
        &y_single,
        rel,
        abs,
        ctx,
    );
    assert_close(
        "fused dx",
        &layout.gather(&dxs, b, M).unwrap(),
        &dx_single,
        rel,
        abs,
        ctx,
    );
    for o in &outs {
        assert_close("fused params", &o.2, &p_single, rel, abs, ctx);
    }
}

#[test]
fn fused_module_over_a_ring() {
    for (i, layout) in [Layout::Contiguous, Layout::Zigzag].into_iter().enumerate() {
        for masked in [false, true] {
            let seed = 40 + 2 * i as u64 + masked as u64;
            check_fused::<8, 2, 4, (Seg<2, 1>, Seg<8, 2>), Causal, 4, 2, 8>(layout, masked, seed);
            check_fused::<6, 3, 2, (Seg<6, 2>, Seg<12, 3>), NonCausal, 4, 3, 12>(
                layout, masked, seed,
            );
            check_fused::<8, 2, 4, Seg<32, 4>, Causal, 2, 4, 8>(layout, masked, seed);
        }
    }
}

/// A schedule every length satisfies (for the construction checks).
type Small = builder::MultiheadDilatedAttention<8, 2, 1, 4, Seg<1, 1>, Causal>;
/// Segments of 8 across both ranks of `2 x 4` (so the ranks must talk).
type Cross = builder::MultiheadDilatedAttention<8, 2, 1, 4, Seg<8, 2>, Causal>;

#[test]
fn wrong_world_size_and_odd_zigzag_are_errors() {
    let mha = Cpu::default().build_module::<Small, f64>();
    let comm = Rc::new(Loopback::ring(3, CommConfig::default()).unwrap().remove(0));
    let e = RingMultiheadDilatedAttention::<_, _, 4, 2>::try_new(
        &mha,
        comm.clone(),
        Layout::Contiguous,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("world of 2 ranks, the communicator has 3"),
        "{e}"
    );
    let e =
        RingMultiheadDilatedAttention::<_, _, 3, 3>::try_new(&mha, comm.clone(), Layout::Zigzag)
            .unwrap_err();
    assert!(e.to_string().contains("even local length"), "{e}");
    assert!(
        RingMultiheadDilatedAttention::<_, _, 3, 3>::try_new(&mha, comm, Layout::Contiguous)
            .is_ok()
    );
}

/// A rank that leaves after the forward: the others' backward fails with the ring's error
/// (which rank, which step), never a hang or zero gradients.
#[test]
fn backward_fault_is_reported() {
    let mha = Cpu::default().build_module::<Cross, f64>();
    let cfg = CommConfig::default().timeout(std::time::Duration::from_secs(20));
    let outs = loopback::run(2, cfg, |comm| {
        let ring = RingMultiheadDilatedAttention::<_, _, 4, 2>::try_new(
            &mha,
            Rc::new(comm),
            Layout::Contiguous,
        )?;
        let x: Tensor<Rank3<1, 4, 8>, f64, _> = Cpu::default().sample_normal();
        let y = ring.try_forward_masked(x.leaky_trace(), None)?;
        if ring.comm().rank() == 1 {
            return Ok(None); // drops its end of the ring
        }
        let r = y.sum().try_backward();
        Ok(Some((r.is_err(), ring.take_backward_error())))
    })
    .unwrap();
    assert!(matches!(outs[1], Ok(None)));
    match &outs[0] {
        Ok(Some((true, Some(Error::Comm { rank: 0, msg, .. })))) => {
            assert!(msg.contains("rank 1"), "{msg}")
        }
        other => panic!("expected a reported ring failure on rank 0, got {other:?}"),
    }
}

#[test]
fn all_reduce_sums_any_length() {
    for world in 1..=4 {
        for len in [0usize, 1, 3, 4, 7, 33] {
            let outs = loopback::run(world, CommConfig::default(), |comm| {
                let mut x = normal(comm.rank() as u64 * 100 + len as u64, len);
                try_all_reduce_sum(&comm, &mut x)?;
                Ok(x)
            })
            .unwrap();
            let mut want = vec![0.0; len];
            for r in 0..world {
                let x = normal(r as u64 * 100 + len as u64, len);
                want.iter_mut().zip(&x).for_each(|(s, v)| *s += v);
            }
            let first = outs[0].as_ref().unwrap();
            for o in &outs {
                let o = o.as_ref().unwrap();
                assert_eq!(o, first, "ranks disagree, world {world}, len {len}");
                assert_close("sum", o, &want, 1e-14, 1e-14, &(world, len));
            }
        }
    }
}

/// Sequence-parallel training of two stacked attention layers sharing one communicator:
/// each rank trains its own replica on its rows with all-reduced gradients and plain SGD;
/// after a few steps every replica equals (bit for bit) the others and (to rounding) the
/// model trained on one device. (SGD, not Adam: Adam's normalisation turns the rounding
/// noise of a gradient that is exactly zero in exact arithmetic, such as the key bias's,
/// into a full step.)
#[test]
fn replicas_train_like_one_device() {
    use dfdx::nn::{Module, ZeroGrads};
    use dfdx::optim::{Optimizer, Sgd, SgdConfig};
    type L1 = builder::MultiheadDilatedAttention<8, 2, 1, 4, (Seg<4, 1>, Seg<16, 4>), Causal>;
    type L2 = builder::MultiheadDilatedAttention<8, 2, 2, 4, Seg<8, 2>, Causal>;
    type Model = (L1, L2);
    const WORLD: usize = 4;
    const LOCAL: usize = 4;
    const STEPS: usize = 3;
    let layout = Layout::Zigzag;
    let cfg = SgdConfig {
        lr: 0.05,
        ..Default::default()
    };
    let dev = Cpu::seed_from_u64(30);
    let model0 = dev.build_module::<Model, f64>();
    let (xv, wv) = (normal(31, 16 * 8), normal(32, 16 * 8));
    let params = |m: &<Model as dfdx::nn::BuildOnDevice<Cpu, f64>>::Built| {
        [
            m.0.w_q.weight.as_vec(),
            m.0.w_k.bias.as_vec(),
            m.0.norm.gamma.as_vec(),
            m.1.w_v.weight.as_vec(),
            m.1.w_o.weight.as_vec(),
        ]
        .concat()
    };

    // One device.
    let mut model = model0.clone();
    let mut opt = Sgd::new(&model, cfg);
    let x: Tensor<Rank3<1, 16, 8>, f64, _> = dev.tensor_from_vec(xv.clone(), (Const, Const, Const));
    let w: Tensor<Rank3<1, 16, 8>, f64, _> = dev.tensor_from_vec(wv.clone(), (Const, Const, Const));
    let mut grads = model.alloc_grads();
    for _ in 0..STEPS {
        let y = model.forward(x.trace(grads));
        grads = (y * w.clone()).sum().backward();
        opt.update(&mut model, &grads).unwrap();
        model.zero_grads(&mut grads);
    }
    let want = params(&model);
    assert!(
        want.iter()
            .zip(params(&model0))
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "training did not move the parameters"
    );

    // The ring: one replica per rank.
    let xs = layout.split(&xv, 1, 8, WORLD).unwrap();
    let ws = layout.split(&wv, 1, 8, WORLD).unwrap();
    let model0 = &model0;
    let outs = loopback::run(WORLD, CommConfig::default(), |comm| {
        let comm = Rc::new(comm);
        let r = comm.rank();
        let dev = Cpu::default();
        let x: Tensor<Rank3<1, LOCAL, 8>, f64, _> =
            dev.tensor_from_vec(xs[r].clone(), (Const, Const, Const));
        let w: Tensor<Rank3<1, LOCAL, 8>, f64, _> =
            dev.tensor_from_vec(ws[r].clone(), (Const, Const, Const));
        let mut model = model0.clone();
        let mut opt = Sgd::new(&model, cfg);
        let mut grads = model.alloc_grads();
        for _ in 0..STEPS {
            let l1 = RingMultiheadDilatedAttention::<_, _, LOCAL, WORLD>::try_new(
                &model.0,
                comm.clone(),
                layout,
            )?;
            let l2 = RingMultiheadDilatedAttention::<_, _, LOCAL, WORLD>::try_new(
                &model.1,
                comm.clone(),
                layout,
            )?;
            let h = l1.try_forward_masked(x.trace(grads), None)?;
            let y = l2.try_forward(h)?; // the dfdx `Module` impl
            grads = (y * w.clone()).sum().backward();
            dilated_attention::nn::try_all_reduce_grads(&*comm, &model, &mut grads)?;
            opt.update(&mut model, &grads).unwrap();
            model.zero_grads(&mut grads);
        }
        Ok(params(&model))
    })
    .unwrap();
    let first = outs[0].as_ref().unwrap();
    for o in &outs {
        let got = o.as_ref().unwrap();
        assert_eq!(got, first, "replicas diverged");
        assert_close("trained parameters", got, &want, 1e-11, 1e-12, &"sgd");
    }
}

/// The book's "Over a ring" section (`book/src/dfdx.md`) includes this test.
#[test]
fn over_a_ring_book_example() -> Result<()> {
    use dfdx::nn::Module;
    // ANCHOR: ring_module
    type Attn = builder::MultiheadDilatedAttention<16, 4, 2, 4, (Seg<8, 1>, Seg<32, 4>), Causal>;
    const WORLD: usize = 4;
    const LOCAL: usize = 8; // 4 ranks x 8 rows = 32 tokens, checked against the schedule
    let mha = Cpu::seed_from_u64(0).build_module::<Attn, f64>();
    let x: Tensor<Rank3<1, 32, 16>, f64, _> = Cpu::seed_from_u64(1).sample_normal();

    // The sequence is split before the module: a rank never sees other ranks' rows.
    let layout = Layout::Zigzag;
    let parts = layout.split(&x.as_vec(), 1, 16, WORLD)?;
    let per_rank = loopback::run(WORLD, CommConfig::default(), |comm| {
        let ring = RingMultiheadDilatedAttention::<_, _, LOCAL, WORLD>::try_new(
            &mha,
            Rc::new(comm),
            layout,
        )?;
        let rows = parts[ring.comm().rank()].clone();
        let x_r: Tensor<Rank3<1, LOCAL, 16>, f64, _> =
            Cpu::default().tensor_from_vec(rows, (Const, Const, Const));
        let y_r = ring.try_forward_masked(x_r.leaky_trace(), None)?;
        // The ring backward is collective: every rank calls backward.
        let mut grads = y_r.square().sum().backward();
        // A rank's parameter gradients cover its own rows only: sum them over the ring.
        ring.try_all_reduce_grads(&mut grads)?;
        Ok(grads.get(&mha.w_q.weight).as_vec())
    })?;
    // ANCHOR_END: ring_module

    // ANCHOR: ring_check
    // Every rank now holds the gradient one device computes on the whole sequence.
    let y = mha.forward(x.leaky_trace());
    let want = y.square().sum().backward().get(&mha.w_q.weight).as_vec();
    for got in per_rank {
        assert_close("dw_q", &got?, &want, 1e-12, 1e-12, &"book");
    }
    // ANCHOR_END: ring_check
    Ok(())
}
