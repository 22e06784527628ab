//! `MultiheadDilatedAttention` as a dfdx module: finite-difference gradients for the
//! input and every parameter group, batched vs unbatched, causal and key-padding masks,
//! dropout, MAGNETO init, and composition with dfdx (Residual, LayerNorm1D, Linear,
//! Adam, safetensors).

mod common;

use common::{assert_close, normal};
use dfdx::losses::mse_loss;
use dfdx::nn::builders::{LayerNorm1D, Linear, Residual};
use dfdx::nn::{
    DeviceBuildExt, LoadFromSafetensors, Module, ModuleMut, SaveToSafetensors, ToDtype, ZeroGrads,
};
use dfdx::optim::{Adam, AdamConfig, Optimizer};
use dfdx::tensor::{NoneTape, Trace};
use dfdx::tensor_ops::{Backward, SumTo};
use dilated_attention::nn::{builder, magneto_gamma};
use dilated_attention::prelude::*;

const M: usize = 8;
const N: usize = 16;
type Sched = (Seg<4, 1>, Seg<16, 4>);
/// 2 query heads, 1 kv head (GQA), head dim 4, causal.
type Attn = builder::MultiheadDilatedAttention<M, 2, 1, 4, Sched, Causal>;
type Built = MultiheadDilatedAttention<M, 2, 1, 4, Sched, f64, Cpu, Causal>;

fn x_of<const B: usize>(dev: &Cpu, seed: u64) -> Tensor<Rank3<B, N, M>, f64, Cpu> {
    dev.tensor_from_vec(normal(seed, B * N * M), (Const, Const, Const))
}

fn loss(m: &Built, x: &Tensor<Rank3<2, N, M>, f64, Cpu>, w: &[f64]) -> f64 {
    let y = m.forward(x.clone());
    y.as_vec().iter().zip(w).map(|(a, b)| a * b).sum()
}

/// Central differences of `loss` for the first `count` entries of one parameter.
fn fd_param(
    m: &Built,
    x: &Tensor<Rank3<2, N, M>, f64, Cpu>,
    w: &[f64],
    count: usize,
    get: impl Fn(&mut Built) -> &mut dyn ParamLike,
) -> Vec<f64> {
    let eps = 1e-6;
    (0..count)
        .map(|i| {
            let f = |d: f64| {
                let mut m2 = m.clone();
                let p = get(&mut m2);
                let mut v = p.values();
                v[i] += d;
                p.set(&v);
                loss(&m2, x, w)
            };
            (f(eps) - f(-eps)) / (2.0 * eps)
        })
        .collect()
}

/// A parameter tensor of any shape, read and written as a flat vector.
trait ParamLike {
    fn values(&self) -> Vec<f64>;
    fn set(&mut self, v: &[f64]);
}
impl<S: dfdx::shapes::Shape> ParamLike for Tensor<S, f64, Cpu> {
    fn values(&self) -> Vec<f64> {
        self.as_vec()
    }
    fn set(&mut self, v: &[f64]) {
        self.copy_from(v);
    }
}

#[test]
fn module_gradients_match_finite_differences() {
    let dev = Cpu::seed_from_u64(3);
    let mut m: Built = dev.build_module::<Attn, f64>();
    m.try_reset_magneto(magneto_gamma(2)).unwrap();
    // Non-trivial LayerNorm and biases, so their gradients are exercised too.
    m.norm.gamma.copy_from(&normal(20, M));
    m.w_k.bias.copy_from(&normal(21, 4));
    let x = x_of::<2>(&dev, 1);
    let w = normal(2, 2 * N * M);
    let wt: Tensor<Rank3<2, N, M>, f64, Cpu> =
        dev.tensor_from_vec(w.clone(), (Const, Const, Const));

    let grads = (m.forward(x.leaky_trace()) * wt).sum().backward();

    let eps = 1e-6;
    let xv = x.as_vec();
    let fd_x: Vec<f64> = (0..xv.len())
        .map(|i| {
            let f = |d: f64| {
                let mut y = xv.clone();
                y[i] += d;
                loss(&m, &dev.tensor_from_vec(y, (Const, Const, Const)), &w)
            };
            (f(eps) - f(-eps)) / (2.0 * eps)
        })
        .collect();
    let (rel, abs) = (1e-6, 1e-7);
    assert_close("dx", &grads.get(&x).as_vec(), &fd_x, rel, abs, &"x");

    macro_rules! check {
        ($name:literal, $($path:tt)+) => {{
            let got = grads.get(&m.$($path)+).as_vec();
            let n = got.len().min(24);
            let want = fd_param(&m, &x, &w, n, |mm| &mut mm.$($path)+);
            assert_close($name, &got[..n], &want, rel, abs, &$name);
        }};
    }
    check!("w_q.weight", w_q.weight);
    check!("w_q.bias", w_q.bias);
    check!("w_k.weight", w_k.weight);
    check!("w_k.bias", w_k.bias);
    check!("w_v.weight", w_v.weight);
    check!("w_v.bias", w_v.bias);
    check!("norm.gamma", norm.gamma);
    check!("norm.beta", norm.beta);
    check!("w_o.weight", w_o.weight);
    check!("w_o.bias", w_o.bias);
}

#[test]
fn unbatched_equals_batched_rows() {
    let dev = Cpu::seed_from_u64(4);
    let m: Built = dev.build_module::<Attn, f64>();
    let x = x_of::<2>(&dev, 5);
    let mask_v: Vec<bool> = (0..2 * N).map(|i| i % 5 != 3).collect();
    let mask: KeyMask<Const<2>, N> = dev.tensor_from_vec(mask_v.clone(), (Const, Const));
    let yb = m.forward(x.clone()).as_vec();
    let ybm = m.forward((x.clone(), mask)).as_vec();
    let xv = x.as_vec();
    for b in 0..2 {
        let rows = b * N * M..(b + 1) * N * M;
        let row: Tensor<Rank2<N, M>, f64, Cpu> =
            dev.tensor_from_vec(xv[rows.clone()].to_vec(), (Const, Const));
        let y = m.forward(row.clone()).as_vec();
        assert_close("row", &y, &yb[rows.clone()], 1e-12, 0.0, &b);
        let mrow: Tensor<Rank1<N>, bool, Cpu> =
            dev.tensor_from_vec(mask_v[b * N..(b + 1) * N].to_vec(), (Const,));
        let y = m.forward((row, mrow)).as_vec();
        assert_close("masked row", &y, &ybm[rows], 1e-12, 0.0, &b);
    }
}

#[test]
fn converts_to_f32() {
    let dev = Cpu::seed_from_u64(14);
    let m: Built = dev.build_module::<Attn, f64>();
    let m32 = m.to_dtype::<f32>();
    let x = x_of::<1>(&dev, 15);
    let x32: Tensor<Rank3<1, N, M>, f32, Cpu> = dev.tensor_from_vec(
        x.as_vec().iter().map(|&v| v as f32).collect(),
        (Const, Const, Const),
    );
    let y64 = m.forward(x).as_vec();
    let y32: Vec<f64> = m32
        .forward(x32)
        .as_vec()
        .iter()
        .map(|&v| v as f64)
        .collect();
    assert_close("f32 vs f64", &y32, &y64, 1e-5, 0.0, &"to_dtype");
}

/// Output rows `0..n` under an input whose rows `n..` are replaced by noise.
fn perturb_tail(x: &[f64], from: usize, seed: u64) -> Vec<f64> {
    let noise = normal(seed, x.len());
    x.iter()
        .enumerate()
        .map(|(i, &v)| if (i / M) % N >= from { noise[i] } else { v })
        .collect()
}

#[test]
fn causal_and_key_padding_masks() {
    let dev = Cpu::seed_from_u64(6);
    let x = x_of::<2>(&dev, 7);
    let xv = x.as_vec();
    let x2: Tensor<Rank3<2, N, M>, f64, Cpu> =
        dev.tensor_from_vec(perturb_tail(&xv, 10, 8), (Const, Const, Const));
    let head = |y: Vec<f64>| -> Vec<f64> {
        y.iter()
            .enumerate()
            .filter(|(i, _)| (i / M) % N < 10)
            .map(|(_, &v)| v)
            .collect()
    };

    // Causal: rows before 10 do not see rows from 10 on.
    let causal: Built = dev.build_module::<Attn, f64>();
    let a = head(causal.forward(x.clone()).as_vec());
    let b = head(causal.forward(x2.clone()).as_vec());
    assert_close("causal", &b, &a, 1e-12, 0.0, &"future rows changed");

    // Bidirectional with a key padding mask on rows 10..: same property through the mask.
    type Bidi = builder::MultiheadDilatedAttention<M, 2, 1, 4, Sched, NonCausal>;
    let bidi = dev.build_module::<Bidi, f64>();
    let mask: KeyMask<Const<2>, N> =
        dev.tensor_from_vec((0..2 * N).map(|i| i % N < 10).collect(), (Const, Const));
    let a = head(bidi.forward((x.clone(), mask.clone())).as_vec());
    let b = head(bidi.forward((x2.clone(), mask.clone())).as_vec());
    assert_close("padding", &b, &a, 1e-12, 0.0, &"padded rows changed");
    // ... and without the mask the padded rows do matter.
    let a = head(bidi.forward(x.clone()).as_vec());
    let b = head(bidi.forward(x2).as_vec());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max);
    assert!(
        diff > 1e-3,
        "unmasked bidirectional attention ignored rows 10..: {diff}"
    );
    // A mask with the wrong batch is an error, not a panic.
    let bad: KeyMask<usize, N> = dev.tensor_from_vec(vec![true; N], (1usize, Const));
    let xb: Tensor<(usize, Const<N>, Const<M>), f64, Cpu> =
        dev.tensor_from_vec(xv, (2usize, Const, Const));
    assert!(bidi.try_forward_masked(xb, Some(&bad)).is_err());
}

#[test]
fn dropout_is_seeded_and_identity_at_inference() {
    let dev = Cpu::seed_from_u64(9);
    let mut m: Built = dev.build_module::<Attn, f64>();
    let x = x_of::<2>(&dev, 10);
    let plain = m.forward(x.clone()).as_vec();
    m.dropout = 0.5;
    // Inference (NoneTape): identity.
    let infer: Tensor<_, f64, Cpu, NoneTape> = m.forward(x.clone());
    assert_eq!(infer.as_vec(), plain);
    // Training (OwnedTape): differs from the plain output, reproducible from the seed.
    let run = |seed| {
        let dev = Cpu::seed_from_u64(seed);
        let m2 = m.clone();
        let x = dev.tensor_from_vec(x.as_vec(), (Const::<2>, Const::<N>, Const::<M>));
        m2.forward(x.leaky_trace()).as_vec()
    };
    let (t1, t2, t3) = (run(1), run(1), run(2));
    assert_eq!(t1, t2, "same seed, same dropout");
    assert_ne!(t1, plain);
    assert_ne!(t1, t3, "another seed, another dropout mask");
}

#[test]
fn magneto_init_scales_value_and_output() {
    let dev = Cpu::seed_from_u64(11);
    type Wide = builder::MultiheadDilatedAttention<64, 8, 2, 8, Sched>;
    let mut m = dev.build_module::<Wide, f64>();
    let gamma = magneto_gamma(12);
    m.try_reset_magneto(gamma).unwrap();
    let std = |v: Vec<f64>| (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
    // Xavier-uniform std: gain · sqrt(2 / (fan_in + fan_out)).
    let xavier = |fi: usize, fo: usize| (2.0 / (fi + fo) as f64).sqrt();
    let rel = |got: f64, want: f64| (got / want - 1.0).abs();
    assert!(rel(std(m.w_q.weight.as_vec()), xavier(64, 64)) < 0.05);
    assert!(rel(std(m.w_k.weight.as_vec()), xavier(64, 16)) < 0.05);
    assert!(rel(std(m.w_v.weight.as_vec()), gamma * xavier(64, 16)) < 0.05);
    assert!(rel(std(m.w_o.weight.as_vec()), gamma * xavier(64, 64)) < 0.05);
    assert!(m.w_o.bias.as_vec().iter().all(|&b| b == 0.0));
    assert!(m.norm.gamma.as_vec().iter().all(|&g| g == 1.0));
}

#[test]
fn composes_with_dfdx_trains_and_round_trips_safetensors() {
    type Model = (Linear<M, M>, Residual<Attn>, LayerNorm1D<M>, Linear<M, M>);
    let dev = Cpu::seed_from_u64(12);
    let mut model = dev.build_module::<Model, f64>();
    let x = x_of::<2>(&dev, 13);
    // Target: each row's features shifted one row down (needs attention to the past).
    let xv = x.as_vec();
    let tv: Vec<f64> = (0..xv.len())
        .map(|i| {
            if (i / M).is_multiple_of(N) {
                0.0
            } else {
                xv[i - M]
            }
        })
        .collect();
    let target: Tensor<Rank3<2, N, M>, f64, Cpu> = dev.tensor_from_vec(tv, (Const, Const, Const));

    let mut opt = Adam::new(
        &model,
        AdamConfig {
            lr: 1e-2,
            ..Default::default()
        },
    );
    let mut grads = model.alloc_grads();
    let mut losses = vec![];
    for _ in 0..30 {
        let y = model.forward_mut(x.trace(grads));
        let loss = mse_loss(y, target.clone());
        losses.push(loss.array());
        grads = loss.backward();
        opt.update(&mut model, &grads).unwrap();
        model.zero_grads(&mut grads);
    }
    assert!(
        losses[29] < 0.5 * losses[0],
        "loss did not fall: {:?}",
        losses
    );

    let path = std::env::temp_dir().join(format!("mhda-{}.safetensors", std::process::id()));
    model.save_safetensors(&path).unwrap();
    let mut loaded = dev.build_module::<Model, f64>();
    loaded.load_safetensors(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(
        loaded.forward(x.clone()).as_vec(),
        model.forward(x.clone()).as_vec()
    );
}

#[test]
fn fused_qkv_equals_separate_projections() {
    use dilated_attention::nn::{FusedBuilder, FusedMultiheadDilatedAttention};
    type Sep = builder::MultiheadDilatedAttention<M, 2, 2, 4, Sched, Causal>;
    type Fused = FusedBuilder<M, 2, 4, Sched, Causal>;
    let dev = Cpu::seed_from_u64(16);
    let mut sep = dev.build_module::<Sep, f64>();
    sep.try_reset_magneto(magneto_gamma(3)).unwrap();
    sep.w_q.bias.copy_from(&normal(17, 8));
    sep.w_v.bias.copy_from(&normal(18, 8));
    let mut fused: FusedMultiheadDilatedAttention<M, 2, 4, Sched, f64, Cpu, Causal> =
        dev.build_module::<Fused, f64>();
    let cat = |a: Vec<f64>, b: Vec<f64>, c: Vec<f64>| [a, b, c].concat();
    fused.w_qkv.weight.copy_from(&cat(
        sep.w_q.weight.as_vec(),
        sep.w_k.weight.as_vec(),
        sep.w_v.weight.as_vec(),
    ));
    fused.w_qkv.bias.copy_from(&cat(
        sep.w_q.bias.as_vec(),
        sep.w_k.bias.as_vec(),
        sep.w_v.bias.as_vec(),
    ));
    fused.norm = sep.norm.clone();
    fused.w_o = sep.w_o.clone();

    let x = x_of::<2>(&dev, 19);
    let w: Tensor<Rank3<2, N, M>, f64, Cpu> =
        dev.tensor_from_vec(normal(20, 2 * N * M), (Const, Const, Const));
    let ys = sep.forward(x.leaky_trace());
    let yf = fused.forward(x.leaky_trace());
    assert_close("out", &yf.as_vec(), &ys.as_vec(), 1e-12, 0.0, &"fused");
    let gs = (ys * w.clone()).sum().backward();
    let gf = (yf * w).sum().backward();
    assert_close(
        "dx",
        &gf.get(&x).as_vec(),
        &gs.get(&x).as_vec(),
        1e-12,
        0.0,
        &"fused",
    );
    let want = cat(
        gs.get(&sep.w_q.weight).as_vec(),
        gs.get(&sep.w_k.weight).as_vec(),
        gs.get(&sep.w_v.weight).as_vec(),
    );
    let got = gf.get(&fused.w_qkv.weight).as_vec();
    assert_close("dw_qkv", &got, &want, 1e-12, 0.0, &"fused");
    let want = cat(
        gs.get(&sep.w_q.bias).as_vec(),
        gs.get(&sep.w_k.bias).as_vec(),
        gs.get(&sep.w_v.bias).as_vec(),
    );
    let got = gf.get(&fused.w_qkv.bias).as_vec();
    assert_close("db_qkv", &got, &want, 1e-12, 0.0, &"fused");

    // MAGNETO on the fused weight scales only the v block.
    type Wide = FusedBuilder<64, 8, 8, Sched>;
    let mut wide = dev.build_module::<Wide, f64>();
    let gamma = magneto_gamma(12);
    wide.try_reset_magneto(gamma).unwrap();
    let wv = wide.w_qkv.weight.as_vec();
    let std = |v: &[f64]| (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
    let (b, xavier) = (64 * 64, (2.0f64 / 128.0).sqrt());
    assert!((std(&wv[..b]) / xavier - 1.0).abs() < 0.05);
    assert!((std(&wv[2 * b..]) / (gamma * xavier) - 1.0).abs() < 0.05);
    // Unbatched and masked inputs, as for the separate module.
    let row: Tensor<Rank2<N, 64>, f64, Cpu> = dev.sample_normal();
    let _ = wide.forward(row);
}
