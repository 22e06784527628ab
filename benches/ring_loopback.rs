//! Loopback ring vs one device on the same global input (f32, CPU).
//!
//! ```text
//! cargo bench --bench ring_loopback            # N in {1024, 2048, 4096}
//! RING_BENCH_N=1024,2048 cargo bench --bench ring_loopback
//! ```
//!
//! Prints three tables:
//! 1. forward + backward time of a ring of W = 2, 4, 8 loopback ranks over the single-device
//!    time (overhead ratio; the ranks share the machine's cores, so this measures the
//!    ring's overhead, not a speed-up);
//! 2. peak memory per rank vs global length: the driver's own buffers (local inputs,
//!    outputs, gradients and the largest set of remote blocks held, from `RingStats`) and
//!    the process-wide peak heap during the call divided by W (a counting allocator;
//!    includes kernel scratch) — both must grow like N/W;
//! 3. zigzag vs contiguous for causal dense attention: max/mean attended pairs per rank
//!    and max/mean measured compute time per rank.
//!
//! A hand-rolled harness (criterion cannot time W threads that each report their own
//! statistics); every number is the median of `REPS` runs.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dilated_attention::ops::dilated;
use dilated_attention::prelude::*;
use dilated_attention::ring::{self, loopback, CommConfig, Layout, RingStats};

/// Counts live heap bytes and their peak.
struct Counting;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only adds atomic counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: AllocLayout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let c = CUR.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(c, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: AllocLayout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) };
        CUR.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Run `f`, returning its result and the peak heap growth above the level at the start.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CUR.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

const REPS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn data(len: usize, seed: u64) -> Vec<f32> {
    // Cheap deterministic pseudo-normal-ish values (no zeros).
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + 1e-3
        })
        .collect()
}

struct Problem {
    plan: Plan,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    go: Vec<f32>,
}

fn problem(n: usize, schedule: &[Pattern], causal: bool) -> Problem {
    let dims = Dims::mha(1, n, 4, 32);
    let plan = Plan::new(dims, schedule, Options::default().causal(causal)).unwrap();
    Problem {
        q: data(dims.q_len(), 1),
        k: data(dims.kv_len(), 2),
        v: data(dims.kv_len(), 3),
        go: data(dims.q_len(), 4),
        plan,
    }
}

/// Single device forward + backward: (time, peak heap).
fn single(p: &Problem) -> (Duration, usize) {
    let mut times = Vec::new();
    let mut peak = 0;
    for _ in 0..REPS {
        let t0 = Instant::now();
        let (_, pk) = peak_of(|| {
            let f = dilated::try_forward(&p.plan, &p.q, &p.k, &p.v, None).unwrap();
            dilated::try_backward(&p.plan, &p.q, &p.k, &p.v, None, &f.out, &f.lse, &p.go).unwrap()
        });
        times.push(t0.elapsed());
        peak = peak.max(pk);
    }
    (median(times), peak)
}

/// Ring forward + backward on W loopback ranks: (time, process peak heap, per-rank stats).
fn ringed(p: &Problem, world: usize, layout: Layout) -> (Duration, usize, Vec<RingStats>) {
    let dm = *p.plan.dims();
    let (b, hd, kd) = (dm.batch, dm.heads * dm.head_dim, dm.kv_heads * dm.head_dim);
    let qs = layout.split(&p.q, b, hd, world).unwrap();
    let ks = layout.split(&p.k, b, kd, world).unwrap();
    let vs = layout.split(&p.v, b, kd, world).unwrap();
    let gs = layout.split(&p.go, b, hd, world).unwrap();
    let mut times = Vec::new();
    let mut peak = 0;
    let mut last = Vec::new();
    for _ in 0..REPS {
        let t0 = Instant::now();
        let (res, pk) = peak_of(|| {
            loopback::run(world, CommConfig::default(), |c| {
                let r = c.rank();
                let f = ring::try_forward(&c, &p.plan, layout, &qs[r], &ks[r], &vs[r], None)?;
                let (_, s) = ring::try_backward(
                    &c, &p.plan, layout, &qs[r], &ks[r], &vs[r], None, &f.out, &f.lse, &gs[r],
                )?;
                let mut st = f.stats;
                st.merge(&s);
                Ok(st)
            })
            .unwrap()
        });
        times.push(t0.elapsed());
        peak = peak.max(pk);
        last = res.into_iter().map(|r| r.unwrap()).collect();
    }
    (median(times), peak, last)
}

/// Tensor buffers one rank holds: local q, k, v, grad_out, out, dq, dk, dv, lse, Δ
/// (`world = 1`: the single device), plus the largest set of remote blocks held at once.
fn rank_buffers(p: &Problem, world: usize, s: Option<&RingStats>) -> u64 {
    let dm = p.plan.dims();
    let n = dm.seq / world;
    let q = dm.batch * n * dm.heads * dm.head_dim;
    let kv = dm.batch * n * dm.kv_heads * dm.head_dim;
    let l = dm.batch * n * dm.heads;
    ((4 * q + 4 * kv + 2 * l) * 4) as u64 + s.map_or(0, |s| s.peak_remote_bytes)
}

fn kib(x: u64) -> f64 {
    x as f64 / 1024.0
}

fn main() {
    let ns: Vec<usize> = std::env::var("RING_BENCH_N")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1024, 2048, 4096]);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# ring over loopback vs one device, f32, B=1 H=4 D=32, fwd+bwd, {cores} cores, median of {REPS}");

    println!("\n## 1. time ratio ring / single device (contiguous layout)");
    println!("| schedule | N | single (ms) | W=2 (ms) | ratio | W=4 (ms) | ratio | W=8 (ms) | ratio | W=8 bytes sent/rank (KiB) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut mem_rows = Vec::new();
    for &n in &ns {
        for (name, sched, causal) in [
            ("dense causal [(N,1)]", vec![Pattern::new(n, 1)], true),
            (
                "LongNet [(N/4,1),(N/2,2),(N,4)]",
                vec![
                    Pattern::new(n / 4, 1),
                    Pattern::new(n / 2, 2),
                    Pattern::new(n, 4),
                ],
                false,
            ),
        ] {
            let p = problem(n, &sched, causal);
            let (ts, ms) = single(&p);
            let (t2, m2, s2) = ringed(&p, 2, Layout::Contiguous);
            let (t4, m4, s4) = ringed(&p, 4, Layout::Contiguous);
            // W = 8: the same code path as a ring of 8 GPUs (issue: 4/8-GPU runs).
            let (t8, _, s8) = ringed(&p, 8, Layout::Contiguous);
            let ms_ = |d: Duration| d.as_secs_f64() * 1e3;
            let sent8 = s8.iter().map(|s| s.bytes_sent).max().unwrap_or(0);
            println!(
                "| {name} | {n} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} | {:.2} | {:.0} |",
                ms_(ts),
                ms_(t2),
                t2.as_secs_f64() / ts.as_secs_f64(),
                ms_(t4),
                t4.as_secs_f64() / ts.as_secs_f64(),
                ms_(t8),
                t8.as_secs_f64() / ts.as_secs_f64(),
                kib(sent8),
            );
            if causal {
                let b1 = rank_buffers(&p, 1, None);
                let b2 = s2
                    .iter()
                    .map(|s| rank_buffers(&p, 2, Some(s)))
                    .max()
                    .unwrap();
                let b4 = s4
                    .iter()
                    .map(|s| rank_buffers(&p, 4, Some(s)))
                    .max()
                    .unwrap();
                mem_rows.push((n, b1, ms, b2, m2, b4, m4));
            }
        }
    }

    println!("\n## 2. peak memory per rank vs global length (dense causal, KiB)");
    println!("buffers: tensors a rank holds (inputs, outputs, gradients, remote blocks at peak);");
    println!("heap: process heap growth during the call (kernel scratch included), / W");
    println!("| N | single: buffers | single: heap | W=2: buffers/rank | W=2: heap/rank | W=4: buffers/rank | W=4: heap/rank |");
    println!("|---|---|---|---|---|---|---|");
    for (n, b1, m1, b2, m2, b4, m4) in mem_rows {
        println!(
            "| {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            kib(b1),
            kib(m1 as u64),
            kib(b2),
            kib(m2 as u64 / 2),
            kib(b4),
            kib(m4 as u64 / 4),
        );
    }

    println!("\n## 3. zigzag vs contiguous, causal dense, W=4 (max/mean per rank)");
    println!("| N | layout | attended pairs max/mean | compute time max/mean |");
    println!("|---|---|---|---|");
    for &n in &ns {
        let p = problem(n, &[Pattern::new(n, 1)], true);
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let pairs: Vec<f64> = (0..4)
                .map(|r| ring::attended_pairs(&p.plan, layout, 4, r).unwrap() as f64)
                .collect();
            let (_, _, st) = ringed(&p, 4, layout);
            let comp: Vec<f64> = st.iter().map(|s| s.compute.as_secs_f64()).collect();
            let ratio = |v: &[f64]| {
                v.iter().cloned().fold(0.0, f64::max) / (v.iter().sum::<f64>() / v.len() as f64)
            };
            println!(
                "| {n} | {layout:?} | {:.3} | {:.3} |",
                ratio(&pairs),
                ratio(&comp)
            );
        }
    }
}
