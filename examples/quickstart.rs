//! Quick start: a typed LongNet schedule on random data, checked against the float64
//! oracle, then the same problem on a 4-rank ring (loopback threads) checked against the
//! single-device result. Run with `cargo run --release --example quickstart`.

use std::time::Instant;

use dilated_attention::ops::reference;
use dilated_attention::prelude::*;
use dilated_attention::ring::{self, loopback, CommConfig, Layout};

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

    // ANCHOR: ring
    // The same global problem on a ring of 4 ranks (threads over the loopback backend),
    // zigzag layout: each rank holds N/4 rows of q, k, v and returns its rows of the output.
    const WORLD: usize = 4;
    let layout = Layout::Zigzag;
    let split = |x: Vec<f32>, heads: usize| layout.split(&x, 1, heads * D, WORLD);
    let (qs, ks, vs) = (
        split(q.as_vec(), H)?,
        split(k.as_vec(), HKV)?,
        split(v.as_vec(), HKV)?,
    );
    let t = Instant::now();
    let per_rank = loopback::run(WORLD, CommConfig::default(), |comm| {
        let r = comm.rank();
        ring::try_forward(&comm, &plan, layout, &qs[r], &ks[r], &vs[r], None)
    })?;
    let ring_time = t.elapsed();
    let mut outs = Vec::new();
    let mut sent = Vec::new();
    for r in per_rank {
        let f = r?;
        sent.push(f.stats.bytes_sent);
        outs.push(f.out);
    }
    let ring_out = layout.gather(&outs, 1, H * D)?;
    let single = out.as_vec();
    let ring_err = ring_out
        .iter()
        .zip(&single)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // ANCHOR_END: ring
    println!(
        "ring attention, {WORLD} ranks ({layout:?}): max |ring - single device| = {ring_err:.2e}, {:.2} ms, KiB sent per rank {:?}",
        ring_time.as_secs_f64() * 1e3,
        sent.iter().map(|b| b / 1024).collect::<Vec<_>>()
    );
    assert!(
        ring_err <= 1e-5 * norm as f32,
        "ring disagrees with the single device"
    );
    Ok(())
}
