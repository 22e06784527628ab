//! Times the CPU forward or backward on the benches' problem (B = 1, H = 8, D = 64, f32,
//! LongNet schedule `[(2048,1),(4096,2),(8192,4)]`), for quick A/B runs of two builds on a
//! noisy machine (stop 36's single-thread numbers in the README):
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release --example cpu_time -- N CAUSAL REPS [fwd|bwd] [hg|lse]
//! ```
//!
//! e.g. `-- 4096 0 7 bwd hg`. Prints the median and the minimum of `REPS` timed calls after
//! one warm-up.

use std::time::Instant;

use dilated_attention::ops::dilated;
use dilated_attention::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let n: usize = arg(0, "4096").parse()?;
    let causal = arg(1, "0") == "1";
    let reps: usize = arg(2, "7").parse::<usize>()?.max(1);
    let bwd = arg(3, "fwd") == "bwd";
    let combine = if arg(4, "hg") == "lse" {
        Combine::Lse
    } else {
        Combine::HeadGroups
    };
    let dims = Dims::mha(1, n, 8, 64);
    let options = Options::default().causal(causal).combine(combine);
    let plan = Plan::new(dims, &dilated_attention::shape::longnet_schedule(), options)?;
    // Deterministic inputs in [-0.5, 0.5), as the benches use.
    let gen = |seed: u32| -> Vec<f32> {
        (0..dims.q_len() as u32)
            .map(|i| {
                (i.wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503))
                    >> 8) as f32
                    / (1u32 << 24) as f32
                    - 0.5
            })
            .collect()
    };
    let (q, k, v, go) = (gen(1), gen(2), gen(3), gen(4));
    let fwd = dilated::try_forward(&plan, &q, &k, &v, None)?;
    let run = || -> Result<(), dilated_attention::Error> {
        if bwd {
            dilated::try_backward(&plan, &q, &k, &v, None, &fwd.out, &fwd.lse, &go)?;
        } else {
            dilated::try_forward(&plan, &q, &k, &v, None)?;
        }
        Ok(())
    };
    run()?; // warm-up
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        run()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "n={n} causal={causal} {} {combine:?}: median {:.1} ms, min {:.1} ms over {reps}",
        if bwd { "backward" } else { "forward" },
        ms[reps / 2],
        ms[0]
    );
    Ok(())
}
