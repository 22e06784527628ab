//! Our CPU head-group forward vs PyTorch's (SDPA per pattern, `benches/peers/`), same
//! inputs, same run. `cargo bench --bench cpu_vs_torch` (needs `python3` with `torch`;
//! prints "peer unavailable" otherwise). Both sides use 2 threads unless
//! `RAYON_NUM_THREADS` / `PEER_THREADS` say otherwise.
//!
//! The peer's output is checked against ours before its time is reported.

use std::process::Command;
use std::time::Instant;

use dilated_attention::ops::dilated;
use dilated_attention::prelude::*;

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
    let dir = std::env::temp_dir().join(format!("dilated-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "| N | causal | ours (ms) | PyTorch SDPA head-groups (ms) | ours / torch | max diff |"
    );
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
            let _ = dilated::try_forward(&plan, &q, &k, &v, None).unwrap(); // warm-up
            let mut times = vec![];
            let mut out = vec![];
            for _ in 0..3 {
                let t = Instant::now();
                out = dilated::try_forward(&plan, &q, &k, &v, None).unwrap().out;
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let ours = times[1];
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let bytes: Vec<u8> = x.iter().flat_map(|f| f.to_le_bytes()).collect();
                std::fs::write(dir.join(format!("{name}.f32")), bytes).unwrap();
            }
            let mut cmd = Command::new("python3");
            cmd.arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/benches/peers/torch_cpu_headgroups.py"
            ))
            .arg(&dir)
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
            );
            let peer = cmd
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| {
                    let s = String::from_utf8_lossy(&o.stdout).to_string();
                    let t: f64 = s
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("torch_seconds="))?
                        .parse()
                        .ok()?;
                    let raw = std::fs::read(dir.join("torch_out.f32")).ok()?;
                    let theirs: Vec<f32> = raw
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    let diff = theirs
                        .iter()
                        .zip(&out)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    Some((t, diff))
                });
            match peer {
                Some((t, diff)) => {
                    assert!(diff < 1e-4, "peer disagrees with us: max diff {diff}");
                    println!(
                        "| {n} | {causal} | {:.1} | {:.1} | {:.2} | {diff:.1e} |",
                        ours * 1e3,
                        t * 1e3,
                        ours / t
                    )
                }
                None => println!(
                    "| {n} | {causal} | {:.1} | peer unavailable | - | - |",
                    ours * 1e3
                ),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
