//! Quick start: a typed LongNet schedule on random data, checked against the float64
//! oracle. Run with `cargo run --release --example quickstart`.

use std::time::Instant;

use dilated_attention::ops::reference;
use dilated_attention::prelude::*;

// ANCHOR: schedule
/// LongNet's schedule, scaled down: segments 512/1024/2048 with dilations 1/2/4.
type LongNet = (Seg<512, 1>, Seg<1024, 2>, Seg<2048, 4>);
const N: usize = 2048; // sequence length
const H: usize = 8; // query heads
const HKV: usize = 4; // key/value heads (GQA: two query heads per kv head)
const D: usize = 64; // head dim
                     // ANCHOR_END: schedule

fn main() -> Result<()> {
    // ANCHOR: forward
    let dev = Cpu::seed_from_u64(0);
    let q: Tensor<Rank4<1, N, H, D>, f32, _> = dev.sample_normal();
    let k: Tensor<Rank4<1, N, HKV, D>, f32, _> = dev.sample_normal();
    let v: Tensor<Rank4<1, N, HKV, D>, f32, _> = dev.sample_normal();

    let attn = DilatedAttention::<LongNet>::new().causal(true);
    let t = Instant::now();
    let (out, lse) = attn.try_forward(&q, &k, &v, None)?;
    let fwd_time = t.elapsed();
    // ANCHOR_END: forward

    // ANCHOR: check
    // The same computation by the naive float64 oracle (SPEC §1 as loops).
    let plan = attn.plan::<N, H, HKV, D>(1)?;
    let to64 = |x: Vec<f32>| x.into_iter().map(f64::from).collect::<Vec<_>>();
    let t = Instant::now();
    let want = reference::forward(
        &plan,
        &to64(q.as_vec()),
        &to64(k.as_vec()),
        &to64(v.as_vec()),
        None,
    )?;
    let ref_time = t.elapsed();
    let got = to64(out.as_vec());
    let norm = want.out.iter().map(|x| x * x).sum::<f64>().sqrt();
    let max_err = got
        .iter()
        .zip(&want.out)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    // ANCHOR_END: check

    println!(
        "dilated attention, schedule {:?}",
        <LongNet as Schedule>::PATTERNS
    );
    println!(
        "  q {:?}  k/v {:?}",
        q.shape().concrete(),
        k.shape().concrete()
    );
    println!(
        "  out {:?}  lse {:?}",
        out.shape().concrete(),
        lse.shape().concrete()
    );
    println!(
        "  max |out - oracle| = {max_err:.2e}  (relative to ||oracle|| = {:.2e})",
        max_err / norm
    );
    println!(
        "  forward {:.2} ms (oracle {:.0} ms), {} attended pairs",
        fwd_time.as_secs_f64() * 1e3,
        ref_time.as_secs_f64() * 1e3,
        plan.attended_pairs()
    );
    assert!(max_err <= 1e-5 * norm, "kernel disagrees with the oracle");

    // Dense attention is just the schedule [(N, 1)].
    let dense = DilatedAttention::<Seg<N, 1>>::new().causal(true);
    let t = Instant::now();
    let (dense_out, _) = dense.try_forward(&q, &k, &v, None)?;
    println!(
        "dense causal attention (schedule [({N}, 1)]): {:.2} ms, out {:?}",
        t.elapsed().as_secs_f64() * 1e3,
        dense_out.shape().concrete()
    );
    Ok(())
}
