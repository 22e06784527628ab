//! Our CPU head-group forward vs PyTorch's (SDPA per pattern, `benches/peers/`), same
//! inputs, same run. `cargo bench --bench cpu_vs_torch [-- N ...]` (needs `python3` with
//! `torch`; prints "peer unavailable" otherwise). Both sides use 2 threads unless
//! `RAYON_NUM_THREADS` / `PEER_THREADS` say otherwise.
//!
//! The machine this runs on is shared, and its speed drifts by tens of percent over
//! seconds, so the two sides alternate: `ROUNDS` rounds (default 3), each timing ours
//! (median of 3 calls after a warm-up) and then the peer (median of 3 after its own
//! warm-up). A row gives the medians over the rounds and the range of the per-round
//! ratios. The peer's output is checked against ours in every round.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use dilated_attention::ops::dilated;
use dilated_attention::prelude::*;

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

/// One run of the peer: its median time and the largest difference to `ours`.
fn peer(
    dir: &Path,
    n: usize,
    h: usize,
    d: usize,
    causal: bool,
    schedule: &[Pattern],
    ours: &[f32],
) -> Option<(f64, f32)> {
    let o = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/peers/torch_cpu_headgroups.py"
        ))
        .arg(dir)
        .args([
            n.to_string(),
            h.to_string(),
            d.to_string(),
            u8::from(causal).to_string(),
        ])
        .args(
            schedule
                .iter()
                .map(|p| format!("{},{}", p.segment, p.dilation)),
        )
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    let t: f64 = s
        .split_whitespace()
        .find_map(|w| w.strip_prefix("torch_seconds="))?
        .parse()
        .ok()?;
    let raw = std::fs::read(dir.join("torch_out.f32")).ok()?;
    let diff = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .zip(ours)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    Some((t, diff))
}

fn main() {
    let schedule = dilated_attention::shape::longnet_schedule();
    let sizes: Vec<usize> = {
        let a: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if a.is_empty() {
            vec![4096, 16384]
        } else {
            a
        }
    };
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let dir = std::env::temp_dir().join(format!("dilated-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!("| N | causal | ours (ms) | PyTorch SDPA head-groups (ms) | ours / torch (range over {rounds} rounds) | max diff |");
    println!("|---|---|---|---|---|---|");
    for &n in &sizes {
        for causal in [false, true] {
            let (h, d) = (8, 64);
            let dims = Dims::mha(1, n, h, d);
            let plan = Plan::new(
                dims,
                &schedule,
                Options::default()
                    .causal(causal)
                    .combine(Combine::HeadGroups),
            )
            .unwrap();
            let gen = |seed: u32| -> Vec<f32> {
                (0..dims.q_len())
                    .map(|i| {
                        (((i as u32)
                            .wrapping_mul(2654435761)
                            .wrapping_add(seed.wrapping_mul(40503)))
                            >> 8) as f32
                            / (1u32 << 24) as f32
                            - 0.5
                    })
                    .collect()
            };
            let (q, k, v) = (gen(1), gen(2), gen(3));
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let bytes: Vec<u8> = x.iter().flat_map(|f| f.to_le_bytes()).collect();
                std::fs::write(dir.join(format!("{name}.f32")), bytes).unwrap();
            }
            let out = dilated::try_forward(&plan, &q, &k, &v, None).unwrap().out; // warm-up
            let (mut ours, mut theirs, mut ratios, mut diff) = (vec![], vec![], vec![], 0.0f32);
            for _ in 0..rounds {
                let mut times = vec![];
                for _ in 0..3 {
                    let t = Instant::now();
                    let o = dilated::try_forward(&plan, &q, &k, &v, None).unwrap().out;
                    times.push(t.elapsed().as_secs_f64());
                    assert_eq!(o, out, "our forward is deterministic");
                }
                let t_ours = median(times);
                ours.push(t_ours);
                let Some((t, dd)) = peer(&dir, n, h, d, causal, &schedule, &out) else {
                    break;
                };
                assert!(dd < 1e-4, "peer disagrees with us: max diff {dd}");
                diff = diff.max(dd);
                theirs.push(t);
                ratios.push(t_ours / t);
            }
            if theirs.is_empty() {
                println!(
                    "| {n} | {causal} | {:.1} | peer unavailable | - | - |",
                    median(ours) * 1e3
                );
                continue;
            }
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, 0.0f64), |(a, b), &r| (a.min(r), b.max(r)));
            println!(
                "| {n} | {causal} | {:.1} | {:.1} | {:.2} ({lo:.2}–{hi:.2}) | {diff:.1e} |",
                median(ours) * 1e3,
                median(theirs) * 1e3,
                median(ratios),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
