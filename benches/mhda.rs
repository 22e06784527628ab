//! Forward + backward of `MultiheadDilatedAttention` vs the same module with dfdx's own
//! dense attention (matmul, softmax, matmul), f32 on the CPU: time and peak heap.
//!
//! ```text
//! cargo bench --bench mhda                          # N = 16384 (dense needs ~22 GiB)
//! cargo bench --bench mhda -- --seq 4096            # 1024 | 4096 | 8192 | 16384
//! cargo bench --bench mhda -- --seq 16384 --no-dense
//! ```
//!
//! Model: width 128, 4 heads of 32, causal, schedule `[(2048,1), (4096,2), (8192,4)]`
//! (the LongNet schedule), batch 1. Loss: sum of the output. Peak heap is measured by a
//! counting global allocator, relative to the heap before the step (weights and input
//! excluded). Times: median of the timed steps after one warm-up step.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use dfdx::nn::{DeviceBuildExt, Module, ZeroGrads};
use dfdx::shapes::{Axes4, Axis, Rank2, Rank3, Rank4};
use dfdx::tensor::{Cache, Cpu, OwnedTape, Tensor, TensorFromVec, Trace};
use dfdx::tensor_ops::{Backward, BroadcastTo, PermuteTo, ReshapeTo, SumTo, TryMatMul};
use dilated_attention::nn::{builder, Causal, MultiheadDilatedAttention};
use dilated_attention::prelude::*;

struct Counting;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counters are only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded as is (see the impl).
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CUR.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.dealloc(p, l) };
        CUR.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded as is (see the impl).
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            CUR.fetch_sub(l.size(), Relaxed);
            let now = CUR.fetch_add(new, Relaxed) + new;
            PEAK.fetch_max(now, Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const M: usize = 128;
const H: usize = 4;
const HD: usize = 32;
type Sched = (Seg<2048, 1>, Seg<4096, 2>, Seg<8192, 4>);
type Attn = builder::MultiheadDilatedAttention<M, H, H, HD, Sched, Causal>;
type Mhda = MultiheadDilatedAttention<M, H, H, HD, Sched, f32, Cpu, Causal>;
type Tape = OwnedTape<f32, Cpu>;

/// The same module with dfdx's dense causal attention in place of ours.
fn dense_forward<const N: usize>(
    m: &Mhda,
    x: Tensor<Rank3<1, N, M>, f32, Cpu, Tape>,
) -> Tensor<Rank3<1, N, M>, f32, Cpu, Tape> {
    let dev = Cpu::default();
    let q = m.w_q.forward(x.retaped::<Tape>());
    let k = m.w_k.forward(x.retaped::<Tape>());
    let v = m.w_v.forward(x);
    let q = q.permute::<Rank4<1, H, N, HD>, Axes4<0, 2, 1, 3>>();
    let k = k.permute::<Rank4<1, H, HD, N>, Axes4<0, 2, 3, 1>>();
    let v = v.permute::<Rank4<1, H, N, HD>, Axes4<0, 2, 1, 3>>();
    let s = q.matmul(k) * (1.0 / (HD as f32).sqrt());
    let bias: Tensor<Rank2<N, N>, f32, Cpu> = dev.tensor_from_vec(
        (0..N * N)
            .map(|i| {
                if i % N > i / N {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect(),
        (dfdx::shapes::Const, dfdx::shapes::Const),
    );
    let p = (s + bias.broadcast::<Rank4<1, H, N, N>, _>()).softmax::<Axis<3>>();
    let o = p
        .matmul(v)
        .permute::<Rank4<1, N, H, HD>, Axes4<0, 2, 1, 3>>()
        .reshape::<Rank3<1, N, M>>();
    m.w_o.forward(m.norm.forward(o))
}

struct Stat {
    median_s: f64,
    peak_bytes: usize,
}

fn measure(iters: usize, mut step: impl FnMut()) -> Stat {
    step(); // warm-up (and the dfdx allocation cache)
    let mut times = vec![];
    let mut peak = 0;
    for _ in 0..iters {
        let base = CUR.load(Relaxed);
        PEAK.store(base, Relaxed);
        let t = Instant::now();
        step();
        times.push(t.elapsed().as_secs_f64());
        peak = peak.max(PEAK.load(Relaxed) - base);
    }
    times.sort_by(f64::total_cmp);
    Stat {
        median_s: times[times.len() / 2],
        peak_bytes: peak,
    }
}

fn run<const N: usize>(dense: bool, iters: usize) {
    let dev = Cpu::seed_from_u64(0);
    let m: Mhda = dev.build_module::<Attn, f32>();
    let x: Tensor<Rank3<1, N, M>, f32, Cpu> = dev.sample_normal();
    let mut grads = Some(m.alloc_grads());
    let mut rows = vec![];
    let mut rows_note = String::new();
    let ours = measure(iters, || {
        let y = m.forward(x.trace(grads.take().unwrap()));
        let mut g = y.sum().backward();
        m.zero_grads(&mut g);
        grads = Some(g);
        dev.empty_cache();
    });
    rows.push(("dilated (ours)", ours));
    // dfdx's dense attention keeps about 5.25 `(B, H, N, N)` f32 tensors alive at its peak
    // (measured at N = 1024..8192); skip it where that cannot fit.
    let dense_need = 5.25 * (H * N * N * 4) as f64;
    let avail = mem_available();
    let dense = dense && {
        let fits = avail.is_none_or(|a| dense_need < 0.8 * a as f64);
        if !fits {
            rows_note = format!(
                "  dense (dfdx)    skipped: needs ~{:.1} GiB, {:.1} GiB available",
                dense_need / (1u64 << 30) as f64,
                avail.unwrap_or(0) as f64 / (1u64 << 30) as f64
            );
        }
        fits
    };
    if dense {
        let d = measure(iters, || {
            let y = dense_forward::<N>(&m, x.trace(grads.take().unwrap()));
            let mut g = y.sum().backward();
            m.zero_grads(&mut g);
            grads = Some(g);
            dev.empty_cache();
        });
        rows.push(("dense (dfdx)", d));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "mhda fwd+bwd, f32 cpu ({threads} threads), N={N}, M={M}, H={H}, HD={HD}, causal, schedule {:?}",
        <Sched as Schedule>::PATTERNS
            .iter()
            .map(|p| (p.segment, p.dilation))
            .collect::<Vec<_>>()
    );
    for (name, s) in rows {
        println!(
            "  {name:<15} {:>9.3} s   peak heap {:>9.1} MiB   {:>8.0} tokens/s",
            s.median_s,
            s.peak_bytes as f64 / (1 << 20) as f64,
            N as f64 / s.median_s
        );
    }
    if !rows_note.is_empty() {
        println!("{rows_note}");
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (Linux only).
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let seq: usize = arg("--seq").and_then(|s| s.parse().ok()).unwrap_or(16384);
    let iters: usize = arg("--iters").and_then(|s| s.parse().ok()).unwrap_or(3);
    let dense = !args.iter().any(|a| a == "--no-dense");
    match seq {
        1024 => run::<1024>(dense, iters),
        4096 => run::<4096>(dense, iters),
        8192 => run::<8192>(dense, iters),
        16384 => run::<16384>(dense, iters),
        other => eprintln!("--seq must be 1024, 4096, 8192 or 16384, not {other}"),
    }
}
