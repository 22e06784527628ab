//! GPU ring benchmark (features `nccl` + `cuda`), for `nvidia-h200-x2` (2 GPUs, NVLink).
//!
//! 1. **Scaling**: dense causal attention (schedule `[(N, 1)]`), bf16, B = 1, H = 16,
//!    D = 128, N = 128K and 512K: the single-GPU kernels on GPU 0 against the
//!    GPU-resident ring on 2 GPUs (zigzag), forward and forward + backward; speed-up,
//!    exposed communication time (compute-stream stalls on exchanges), kernel time and
//!    bytes per step.
//! 2. **Long dilated**: schedule `[(2048,1),(4096,2),…,(65536,32)]` (segments up to 64K),
//!    causal, bf16, H = 8, D = 64, global N = 1M … 16M on 2 GPUs (zigzag): forward and
//!    backward time and each GPU's peak memory (`Cuda::peak_memory`, the CUDA memory
//!    pool's high-water mark), to show it is linear in N.
//! 3. **Bytes vs the SPEC §2 minimum**: a schedule with a pattern spanning both ranks;
//!    the bytes each rank sends per step against the dilated rows its peer needs.
//!
//! Timing: host wall clock around each call followed by a device synchronize (the ring's
//! ranks are coupled by their exchanges), median over repetitions after a warm-up; the
//! slower rank is reported. Inputs are random normal bf16.
//!
//! `cargo bench --features nccl,cuda --bench gpu_ring_bench -- [--scaling 131072,524288]
//!  [--dilated 1048576,...] [--reps 3] [--json FILE]`

#[path = "common/gpu.rs"]
mod gpu_common;

use std::io::Write;
use std::time::{Duration, Instant};

use dilated_attention::ops::dilated::cuda as single;
use dilated_attention::prelude::*;
use dilated_attention::ring::gpu;
use dilated_attention::ring::nccl::{self, NcclComm};
use dilated_attention::ring::{CommConfig, Layout, RingComm, RingStats};
use dilated_attention::tensor::cuda::Cuda;
use gpu_common::rand_buf;

struct Args {
    scaling: Vec<usize>,
    dilated: Vec<usize>,
    reps: usize,
    json: Option<String>,
    bytes: bool,
}

fn list(s: Option<&String>) -> Vec<usize> {
    s.map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn args() -> Args {
    let mut a = Args {
        scaling: vec![1 << 17, 1 << 19],
        dilated: vec![1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 24],
        reps: 3,
        json: None,
        bytes: true,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        match v[i].as_str() {
            "--scaling" => {
                a.scaling = list(v.get(i + 1));
                i += 1;
            }
            "--dilated" => {
                a.dilated = list(v.get(i + 1));
                i += 1;
            }
            "--reps" => {
                a.reps = v.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(3);
                i += 1;
            }
            "--json" => {
                a.json = v.get(i + 1).cloned();
                i += 1;
            }
            "--no-bytes" => a.bytes = false,
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median seconds of `f` (followed by a synchronize) after one warm-up.
fn time_s(dev: &Cuda, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    dev.synchronize().unwrap();
    let ts = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            dev.synchronize().unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(ts)
}

/// Per-rank result of a ring measurement.
#[derive(Debug, Clone)]
struct RankTimes {
    fwd_s: f64,
    fwdbwd_s: f64,
    fwd: RingStats,
    bwd: RingStats,
    peak_bytes: u64,
}

/// The GPU ring on all communicators: median forward and forward + backward seconds.
fn ring_times(plan: &Plan, layout: Layout, reps: usize, world: usize) -> Vec<RankTimes> {
    let comms = NcclComm::from_devices(
        world,
        CommConfig::default().timeout(Duration::from_secs(600)),
    )
    .expect("GPUs with NCCL");
    let dm = *plan.dims();
    let n = dm.seq / world;
    let res = nccl::run(comms, |c| {
        let dev = Cuda::new(c.device())?;
        single::warm_up(&dev)?;
        let r = c.rank() as u64;
        let q = rand_buf(&dev, dm.batch * n * dm.heads * dm.head_dim, 10 + r);
        let k = rand_buf(&dev, dm.batch * n * dm.kv_heads * dm.head_dim, 20 + r);
        let v = rand_buf(&dev, dm.batch * n * dm.kv_heads * dm.head_dim, 30 + r);
        let go = rand_buf(&dev, dm.batch * n * dm.heads * dm.head_dim, 40 + r);
        dev.synchronize()?;
        dev.reset_peak_memory()?;
        let mut fs = None;
        let fwd_s = time_s(&dev, reps, || {
            let f = gpu::try_forward(&dev, &c, plan, layout, &q, &k, &v, None).unwrap();
            fs = Some(f.stats);
        });
        let mut bs = None;
        let fwdbwd_s = time_s(&dev, reps, || {
            let f = gpu::try_forward(&dev, &c, plan, layout, &q, &k, &v, None).unwrap();
            let g = gpu::try_backward(
                &dev, &c, plan, layout, &q, &k, &v, None, &f.out, &f.lse, &go,
            )
            .unwrap();
            bs = Some(g.stats);
        });
        Ok(RankTimes {
            fwd_s,
            fwdbwd_s,
            fwd: fs.unwrap_or_default(),
            bwd: bs.unwrap_or_default(),
            peak_bytes: dev.peak_memory()?,
        })
    });
    res.into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .collect()
}

/// The single-GPU kernels on GPU 0: median forward and forward + backward seconds.
fn single_times(plan: &Plan, reps: usize) -> (f64, f64) {
    let dev = Cuda::new(0).unwrap();
    single::warm_up(&dev).unwrap();
    let dm = *plan.dims();
    let q = rand_buf(&dev, dm.q_len(), 1);
    let k = rand_buf(&dev, dm.kv_len(), 2);
    let v = rand_buf(&dev, dm.kv_len(), 3);
    let go = rand_buf(&dev, dm.q_len(), 4);
    let f_s = time_s(&dev, reps, || {
        single::try_forward(&dev, plan, &q, &k, &v, None).unwrap();
    });
    let fb_s = time_s(&dev, reps, || {
        let f = single::try_forward(&dev, plan, &q, &k, &v, None).unwrap();
        single::try_backward(&dev, plan, &q, &k, &v, None, &f.out, &f.lse, &go).unwrap();
    });
    (f_s, fb_s)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn slowest(rt: &[RankTimes]) -> (f64, f64) {
    (
        rt.iter().map(|r| r.fwd_s).fold(0.0, f64::max),
        rt.iter().map(|r| r.fwdbwd_s).fold(0.0, f64::max),
    )
}

fn main() {
    let a = args();
    let world = NcclComm::device_count().unwrap_or(0);
    if world < 2 {
        eprintln!("gpu_ring_bench: needs 2 GPUs with NCCL ({world} visible); nothing run");
        return;
    }
    let world = 2;
    let name = Cuda::new(0).and_then(|d| d.name()).unwrap_or_default();
    println!(
        "# GPU ring bench on {world} × {name}, NCCL {:?}",
        NcclComm::nccl_version().ok()
    );
    let mut json = Vec::new();

    for &n in &a.scaling {
        let dims = Dims::mha(1, n, 16, 128);
        let plan = Plan::new(dims, &[Pattern::new(n, 1)], Options::default().causal(true)).unwrap();
        let flop = 4.0 * 128.0 * plan.attended_pairs() as f64;
        let (s_f, s_fb) = single_times(&plan, a.reps);
        let rt = ring_times(&plan, Layout::Zigzag, a.reps, world);
        let (r_f, r_fb) = slowest(&rt);
        println!(
            "scaling dense causal N={n} H=16 D=128 bf16: 1 GPU fwd {:.1} ms ({:.0} TFLOP/s), fwd+bwd {:.1} ms ({:.0} TFLOP/s)",
            s_f * 1e3,
            flop / s_f / 1e12,
            s_fb * 1e3,
            3.5 * flop / s_fb / 1e12
        );
        println!(
            "  ring 2 GPUs zigzag: fwd {:.1} ms (speed-up {:.2}x), fwd+bwd {:.1} ms (speed-up {:.2}x)",
            r_f * 1e3,
            s_f / r_f,
            r_fb * 1e3,
            s_fb / r_fb
        );
        for (r, t) in rt.iter().enumerate() {
            println!(
                "  rank {r}: fwd kernels {:.1} ms, exposed comm {:.2} ms, {} steps, {} B sent; bwd kernels {:.1} ms, exposed comm {:.2} ms, {} steps, {} B sent; blocks fwd {}+{} skipped",
                ms(t.fwd.compute),
                ms(t.fwd.wait),
                t.fwd.steps,
                t.fwd.bytes_sent,
                ms(t.bwd.compute),
                ms(t.bwd.wait),
                t.bwd.steps,
                t.bwd.bytes_sent,
                t.fwd.blocks_computed,
                t.fwd.blocks_skipped
            );
        }
        json.push(format!(
            "{{\"kind\":\"scaling\",\"n\":{n},\"single_fwd_s\":{s_f},\"single_fwdbwd_s\":{s_fb},\"ring_fwd_s\":{r_f},\"ring_fwdbwd_s\":{r_fb},\"exposed_fwd_ms\":{:.3},\"exposed_bwd_ms\":{:.3}}}",
            rt.iter().map(|t| ms(t.fwd.wait)).fold(0.0, f64::max),
            rt.iter().map(|t| ms(t.bwd.wait)).fold(0.0, f64::max)
        ));
    }

    let sched: Vec<Pattern> = (0..6).map(|i| Pattern::new(2048 << i, 1 << i)).collect();
    for &n in &a.dilated {
        let dims = Dims::mha(1, n, 8, 64);
        let plan = Plan::new(dims, &sched, Options::default().causal(true)).unwrap();
        let flop = 4.0 * 64.0 * plan.attended_pairs() as f64;
        let rt = ring_times(&plan, Layout::Zigzag, 1, world);
        let (r_f, r_fb) = slowest(&rt);
        let pk = rt.iter().map(|t| t.peak_bytes).max().unwrap_or(0);
        println!(
            "dilated N={n} (segments 2K..64K, r 1..32, causal) H=8 D=64 bf16 on 2 GPUs: fwd {:.1} ms, fwd+bwd {:.1} ms ({:.0} TFLOP/s total), peak per GPU {:.2} GiB ({:.1} B/token), bytes sent {}",
            r_f * 1e3,
            r_fb * 1e3,
            3.5 * flop / r_fb / 1e12,
            pk as f64 / (1u64 << 30) as f64,
            pk as f64 / (n / world) as f64,
            rt.iter().map(|t| t.fwd.bytes_sent + t.bwd.bytes_sent).sum::<u64>()
        );
        json.push(format!(
            "{{\"kind\":\"dilated\",\"n\":{n},\"ring_fwd_s\":{r_f},\"ring_fwdbwd_s\":{r_fb},\"peak_bytes\":{pk}}}"
        ));
    }

    if a.bytes {
        // N = 128K, zigzag chunk 32K: (8192,1) and (32768,4) are local; (131072,16)
        // spans all 4 chunks: per step a rank sends its 2 compact chunks of 32K/16 rows.
        let n = 1 << 17;
        let (h, d) = (16, 128);
        let dims = Dims::mha(1, n, h, d);
        let sched = [
            Pattern::new(8192, 1),
            Pattern::new(32768, 4),
            Pattern::new(131072, 16),
        ];
        let plan = Plan::new(dims, &sched, Options::default().causal(true)).unwrap();
        let rt = ring_times(&plan, Layout::Zigzag, 1, world);
        // Minimum (SPEC §2): the dilated rows of the peer's 2 chunks, every head its own
        // offset: 2 chunks · (32K/16 rows) · 16 heads · 128 · 2 B, for K and V.
        let min_kv = (2 * (n / 4 / 16) * h * d * 2 * 2) as u64;
        for (r, t) in rt.iter().enumerate() {
            println!(
                "bytes N={n} schedule {sched:?}: rank {r} forward sent {} B in {} steps ({} B/step; SPEC §2 minimum {} B/step = {:.2}x); backward {} B in {} steps (K/V bf16 + dK/dV f32)",
                t.fwd.bytes_sent,
                t.fwd.steps,
                t.fwd.bytes_sent / t.fwd.steps.max(1) as u64,
                min_kv,
                (t.fwd.bytes_sent / t.fwd.steps.max(1) as u64) as f64 / min_kv as f64,
                t.bwd.bytes_sent,
                t.bwd.steps
            );
        }
    }
    if let Some(p) = a.json {
        let mut f = std::fs::File::create(p).unwrap();
        for j in json {
            writeln!(f, "{j}").unwrap();
        }
    }
}
