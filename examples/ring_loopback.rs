//! A 4-rank ring over loopback threads on built-in defaults: split a global problem by
//! the zigzag layout, run forward and backward on every rank, gather, compare with one
//! device, print the statistics.
//!
//! ```text
//! cargo run --release --example ring_loopback
//! ```

use dilated_attention::ops::dilated;
use dilated_attention::prelude::*;
use dilated_attention::ring::{self, loopback, CommConfig, Layout, RingStats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn main() -> Result<()> {
    // ANCHOR: problem
    // A global problem of N = 4 ranks x 512 rows, causal, 8 heads, with a LongNet-style
    // schedule: windows of 256 (inside one rank: nothing travels), dilated segments of
    // 1024 (r = 2: half the rows travel) and 2048 (r = 4: a quarter of the rows travel).
    // With GQA a kv head serves several offsets, and then more of its rows travel.
    const WORLD: usize = 4;
    let dims = Dims {
        batch: 1,
        seq: 2048,
        heads: 8,
        kv_heads: 8,
        head_dim: 16,
    };
    let schedule = [
        Pattern::new(256, 1),
        Pattern::new(1024, 2),
        Pattern::new(2048, 4),
    ];
    let plan = Plan::new(dims, &schedule, Options::default().causal(true))?;
    let layout = Layout::Zigzag;
    // ANCHOR_END: problem

    let q = random(1, dims.q_len());
    let k = random(2, dims.kv_len());
    let v = random(3, dims.kv_len());
    let go = random(4, dims.q_len());

    // ANCHOR: split
    // Each rank gets its rows: (batch, n, heads, dim) in the layout's local order.
    let (b, hd, kd) = (
        dims.batch,
        dims.heads * dims.head_dim,
        dims.kv_heads * dims.head_dim,
    );
    let qs = layout.split(&q, b, hd, WORLD)?;
    let ks = layout.split(&k, b, kd, WORLD)?;
    let vs = layout.split(&v, b, kd, WORLD)?;
    let gs = layout.split(&go, b, hd, WORLD)?;
    // ANCHOR_END: split

    // ANCHOR: ring
    // One thread per rank; every rank runs the same calls on its own rows.
    let per_rank = loopback::run(WORLD, CommConfig::default(), |comm| {
        let r = comm.rank();
        let fwd = ring::try_forward(&comm, &plan, layout, &qs[r], &ks[r], &vs[r], None)?;
        let (grads, bwd_stats) = ring::try_backward(
            &comm, &plan, layout, &qs[r], &ks[r], &vs[r], None, &fwd.out, &fwd.lse, &gs[r],
        )?;
        Ok((fwd.out, grads, fwd.stats, bwd_stats))
    })?;
    // ANCHOR_END: ring

    let mut outs = Vec::new();
    let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
    let mut stats: Vec<(RingStats, RingStats)> = Vec::new();
    for r in per_rank {
        let (out, g, sf, sb) = r?;
        outs.push(out);
        dqs.push(g.dq);
        dks.push(g.dk);
        dvs.push(g.dv);
        stats.push((sf, sb));
    }

    // ANCHOR: compare
    // Gather the ranks' rows back into global order and compare with one device.
    let out = layout.gather(&outs, b, hd)?;
    let single = dilated::try_forward(&plan, &q, &k, &v, None)?;
    let gsingle = dilated::try_backward(&plan, &q, &k, &v, None, &single.out, &single.lse, &go)?;
    println!(
        "max |out_ring - out_single| = {:.2e}",
        max_abs_diff(&out, &single.out)
    );
    println!(
        "max |dq| diff = {:.2e}, |dk| = {:.2e}, |dv| = {:.2e}",
        max_abs_diff(&layout.gather(&dqs, b, hd)?, &gsingle.dq),
        max_abs_diff(&layout.gather(&dks, b, kd)?, &gsingle.dk),
        max_abs_diff(&layout.gather(&dvs, b, kd)?, &gsingle.dv),
    );
    // ANCHOR_END: compare

    // ANCHOR: stats
    println!("rank  steps  sent(KiB)  recv(KiB)  compute(ms)  wait(ms)  max remote blocks");
    for (sf, sb) in &stats {
        let mut s = sf.clone();
        s.merge(sb);
        println!(
            "{:>4}  {:>5}  {:>9.1}  {:>9.1}  {:>11.2}  {:>8.2}  {:>17}",
            s.rank,
            s.steps,
            s.bytes_sent as f64 / 1024.0,
            s.bytes_recv as f64 / 1024.0,
            s.compute.as_secs_f64() * 1e3,
            s.wait.as_secs_f64() * 1e3,
            s.max_remote_blocks,
        );
    }
    let dense_block = (2 * b * (dims.seq / WORLD) * kd * 4) as f64 / 1024.0;
    println!("(one rank's full K+V would be {dense_block:.1} KiB per hop)");
    // ANCHOR_END: stats
    Ok(())
}
