//! Peak resident memory of the CPU forward, and one timed run, for growing `N`.
//!
//! `cargo bench --bench peak_memory -- 65536 262144` (defaults: 16K, 64K, 256K).
//! Schedule `[(2048,1),(4096,2),(8192,4)]`, 8 heads, D = 64, f32, causal. Reports the
//! inputs' size and the extra peak (VmHWM after the call minus before it): the extra
//! must stay flat (O(threads × tile)), the inputs grow linearly — nothing is O(N²).

use std::time::Instant;

use dilated_attention::ops::dilated;
use dilated_attention::prelude::*;

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if args.is_empty() {
        vec![16384, 65536, 262144]
    } else {
        args
    };
    println!("| N | inputs+outputs (MiB) | extra peak RSS (MiB) | forward time (s) | GFLOP/s |");
    println!("|---|---|---|---|---|");
    for n in sizes {
        let dims = Dims::mha(1, n, 8, 64);
        let plan = Plan::new(
            dims,
            &dilated_attention::shape::longnet_schedule(),
            Options::default().causal(true),
        )
        .unwrap();
        let mk = |seed: u32, len: usize| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761).wrapping_add(seed)) >> 8) as f32
                        / (1u32 << 24) as f32
                        - 0.5
                })
                .collect()
        };
        let (q, k, v) = (
            mk(1, dims.q_len()),
            mk(2, dims.kv_len()),
            mk(3, dims.kv_len()),
        );
        let mut out = vec![f32::NAN; dims.q_len()];
        let mut lse = vec![f32::NAN; dims.lse_len()];
        // Touch the outputs so they count in the "before" figure.
        out.iter_mut().for_each(|x| *x = 0.0);
        lse.iter_mut().for_each(|x| *x = 0.0);
        let before = vm_hwm_kib();
        let t = Instant::now();
        dilated::try_forward_into(&plan, &q, &k, &v, None, &mut out, &mut lse).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let after = vm_hwm_kib();
        let io = (3 * dims.q_len() + dims.kv_len() + dims.lse_len()) * 4;
        let flops = 4.0 * 64.0 * plan.attended_pairs() as f64;
        println!(
            "| {n} | {:.0} | {:.1} | {secs:.2} | {:.1} |",
            io as f64 / (1 << 20) as f64,
            after.saturating_sub(before) as f64 / 1024.0,
            flops / secs / 1e9
        );
        assert!(out.iter().all(|x| x.is_finite()));
    }
}
