//! Ring attention over NCCL on the visible GPUs (features `nccl`, `cuda`): forward and
//! backward, every rank's rows checked against the single-device CPU kernel, statistics
//! printed.
//!
//! With `--gpu true` (the default) the GPU-resident ring runs (`ring::gpu`: bf16, the CUDA
//! kernels on device buffers, K/V moved by NCCL on its own stream under the compute);
//! with `--gpu false` the host ring driver computes on the CPU in f32 and NCCL only moves
//! its packets (a transport check).
//!
//! ```text
//! # one process, one thread per GPU (all visible GPUs, or --world W)
//! cargo run --release --features nccl,cuda --example ring_nccl -- --mode threads
//! # one process per GPU, torchrun style (here: 2 GPUs on one host)
//! RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 ./ring_nccl --mode env &
//! RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 ./ring_nccl --mode env
//! ```
//!
//! Options: `--gpu true|false` (true), `--local N` rows per rank (default 1024), `--heads H` (8), `--dim D` (32),
//! `--batch B` (1), `--schedule dense|dilated` (dilated), `--layout zigzag|contiguous`
//! (zigzag), `--causal true|false` (true), `--iters I` (3), `--timeout S` (60),
//! `--check true|false` (true).

use std::time::{Duration, Instant};

use dilated_attention::ops::dilated;
use dilated_attention::prelude::*;
use dilated_attention::ring::nccl::{self, NcclComm, WireStats};
use dilated_attention::ring::{self as ring_mod, CommConfig, Layout, RingStats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
struct Args {
    mode: String,
    world: Option<usize>,
    local: usize,
    heads: usize,
    dim: usize,
    batch: usize,
    schedule: String,
    layout: Layout,
    causal: bool,
    iters: usize,
    timeout: u64,
    check: bool,
    gpu: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        mode: "threads".into(),
        world: None,
        local: 1024,
        heads: 8,
        dim: 32,
        batch: 1,
        schedule: "dilated".into(),
        layout: Layout::Zigzag,
        causal: true,
        iters: 3,
        timeout: 60,
        check: true,
        gpu: true,
    };
    let bad = |m: String| Error::Ring { msg: m };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let key = argv[i].as_str();
        let val = argv
            .get(i + 1)
            .cloned()
            .ok_or_else(|| bad(format!("{key} needs a value")))?;
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| bad(format!("{key} {v}: not a number")))
        };
        match key {
            "--mode" => a.mode = val,
            "--world" => a.world = Some(num(&val)?),
            "--local" => a.local = num(&val)?,
            "--heads" => a.heads = num(&val)?,
            "--dim" => a.dim = num(&val)?,
            "--batch" => a.batch = num(&val)?,
            "--schedule" => a.schedule = val,
            "--layout" => {
                a.layout = match val.as_str() {
                    "zigzag" => Layout::Zigzag,
                    "contiguous" => Layout::Contiguous,
                    _ => return Err(bad(format!("--layout {val}: zigzag or contiguous"))),
                }
            }
            "--causal" => a.causal = val == "true",
            "--iters" => a.iters = num(&val)?.max(1),
            "--timeout" => a.timeout = num(&val)? as u64,
            "--check" => a.check = val == "true",
            "--gpu" => a.gpu = val == "true",
            _ => return Err(bad(format!("unknown option {key}"))),
        }
        i += 2;
    }
    Ok(a)
}

fn plan(a: &Args, world: usize) -> Result<Plan> {
    let n = a.local;
    let seq = world * n;
    let schedule: Vec<Pattern> = match a.schedule.as_str() {
        "dense" => vec![Pattern::new(seq, 1)],
        // LongNet-style: local windows (no traffic), segments of one rank (r = 2, no
        // traffic), the whole sequence dilated by 4 (a quarter of the rows travel).
        "dilated" => vec![
            Pattern::new((n / 4).max(1), 1),
            Pattern::new(n, 2),
            Pattern::new(seq, 4),
        ],
        s => {
            return Err(Error::Ring {
                msg: format!("--schedule {s}: dense or dilated"),
            })
        }
    };
    Plan::new(
        Dims {
            batch: a.batch,
            seq,
            heads: a.heads,
            kv_heads: a.heads,
            head_dim: a.dim,
        },
        &schedule,
        Options::default().causal(a.causal),
    )
}

fn random(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// The global problem (every process draws the same one from fixed seeds).
struct Problem {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    go: Vec<f32>,
}

impl Problem {
    fn new(p: &Plan) -> Self {
        let d = p.dims();
        Problem {
            q: random(1, d.q_len()),
            k: random(2, d.kv_len()),
            v: random(3, d.kv_len()),
            go: random(4, d.q_len()),
        }
    }
}

/// What one rank reports.
struct RankReport {
    rank: usize,
    device: usize,
    fwd: RingStats,
    bwd: RingStats,
    fwd_ms: Vec<f64>,
    bwd_ms: Vec<f64>,
    wire: WireStats,
    /// Error of out, dq, dk, dv vs the single-device CPU kernel (if checked): max abs
    /// (host ring, f32) or ‖err‖/‖ref‖ (GPU ring, bf16).
    err: Option<[f32; 4]>,
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num.sqrt() / den.sqrt().max(f64::MIN_POSITIVE)) as f32
}

/// The GPU-resident ring on one rank (bf16), `iters` times.
fn run_rank_gpu(
    c: &NcclComm,
    a: &Args,
    p: &Plan,
    prob: &Problem,
    want: Option<&[Vec<f32>; 4]>,
) -> Result<RankReport> {
    use dilated_attention::ring::gpu;
    use dilated_attention::tensor::cuda::Cuda;
    use half::bf16;
    let world = c.world_size();
    let r = c.rank();
    let d = *p.dims();
    let (b, hd, kd) = (d.batch, d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let dev = Cuda::new(c.device())?;
    let up = |x: &[f32], inner: usize| -> Result<_> {
        let rows = a.layout.split(x, b, inner, world)?.swap_remove(r);
        dev.htod(&rows.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
    };
    let (q, k, v, go) = (
        up(&prob.q, hd)?,
        up(&prob.k, kd)?,
        up(&prob.v, kd)?,
        up(&prob.go, hd)?,
    );
    let (mut fwd_ms, mut bwd_ms) = (vec![], vec![]);
    let mut last = None;
    for _ in 0..a.iters {
        dev.synchronize()?;
        let t = Instant::now();
        let f = gpu::try_forward(&dev, c, p, a.layout, &q, &k, &v, None)?;
        dev.synchronize()?;
        fwd_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let g = gpu::try_backward(&dev, c, p, a.layout, &q, &k, &v, None, &f.out, &f.lse, &go)?;
        dev.synchronize()?;
        bwd_ms.push(t.elapsed().as_secs_f64() * 1e3);
        last = Some((f, g));
    }
    let (f, g) = last.expect("iters >= 1");
    let host = |x: &cudarc::driver::CudaSlice<bf16>| -> Result<Vec<f32>> {
        Ok(dev.dtoh(x)?.iter().map(|v| v.to_f32()).collect())
    };
    let err = match want {
        Some(w) => Some([
            rel(&host(&f.out)?, &w[0]),
            rel(&host(&g.dq)?, &w[1]),
            rel(&host(&g.dk)?, &w[2]),
            rel(&host(&g.dv)?, &w[3]),
        ]),
        None => None,
    };
    Ok(RankReport {
        rank: r,
        device: c.device(),
        fwd: f.stats,
        bwd: g.stats,
        fwd_ms,
        bwd_ms,
        wire: c.wire_stats(),
        err,
    })
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// Forward + backward `iters` times on one rank; the single-device reference (when
/// checking) is computed by the caller and passed in as this rank's rows.
fn run_rank(
    c: &NcclComm,
    a: &Args,
    p: &Plan,
    prob: &Problem,
    want: Option<&[Vec<f32>; 4]>,
) -> Result<RankReport> {
    let world = c.world_size();
    let r = c.rank();
    let d = *p.dims();
    let (b, hd, kd) = (d.batch, d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let q = a.layout.split(&prob.q, b, hd, world)?.swap_remove(r);
    let k = a.layout.split(&prob.k, b, kd, world)?.swap_remove(r);
    let v = a.layout.split(&prob.v, b, kd, world)?.swap_remove(r);
    let go = a.layout.split(&prob.go, b, hd, world)?.swap_remove(r);
    let (mut fwd_ms, mut bwd_ms) = (vec![], vec![]);
    let mut last = None;
    for _ in 0..a.iters {
        let t = Instant::now();
        let f = ring_mod::try_forward(c, p, a.layout, &q, &k, &v, None)?;
        fwd_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let (g, sb) =
            ring_mod::try_backward(c, p, a.layout, &q, &k, &v, None, &f.out, &f.lse, &go)?;
        bwd_ms.push(t.elapsed().as_secs_f64() * 1e3);
        last = Some((f, g, sb));
    }
    let (f, g, sb) = last.expect("iters >= 1");
    let err = want.map(|w| {
        [
            max_abs(&f.out, &w[0]),
            max_abs(&g.dq, &w[1]),
            max_abs(&g.dk, &w[2]),
            max_abs(&g.dv, &w[3]),
        ]
    });
    Ok(RankReport {
        rank: r,
        device: c.device(),
        fwd: f.stats,
        bwd: sb,
        fwd_ms,
        bwd_ms,
        wire: c.wire_stats(),
        err,
    })
}

/// This rank's rows of the single-device result.
fn reference_rows(
    a: &Args,
    p: &Plan,
    prob: &Problem,
    world: usize,
    r: usize,
) -> Result<[Vec<f32>; 4]> {
    let d = *p.dims();
    let (b, hd, kd) = (d.batch, d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let f = dilated::try_forward(p, &prob.q, &prob.k, &prob.v, None)?;
    let g = dilated::try_backward(p, &prob.q, &prob.k, &prob.v, None, &f.out, &f.lse, &prob.go)?;
    Ok([
        a.layout.split(&f.out, b, hd, world)?.swap_remove(r),
        a.layout.split(&g.dq, b, hd, world)?.swap_remove(r),
        a.layout.split(&g.dk, b, kd, world)?.swap_remove(r),
        a.layout.split(&g.dv, b, kd, world)?.swap_remove(r),
    ])
}

/// Bytes a rank must receive at least in one forward: for every pattern whose segment
/// spans `k > 1` ranks' chunks (contiguous layout), the K and V rows of the `k - 1` other
/// chunks that its heads' offsets select (`n / r` rows per head when `r` divides `n`).
fn min_forward_bytes(p: &Plan, world: usize, es: usize) -> u64 {
    let d = p.dims();
    let n = d.seq / world;
    p.patterns()
        .iter()
        .map(|pt| {
            let w = pt.segment.min(d.seq);
            let k = w.div_ceil(n);
            if k <= 1 {
                return 0;
            }
            let rows = n.div_ceil(pt.dilation);
            ((k - 1) * 2 * d.batch * rows * d.kv_heads * d.head_dim * es) as u64
        })
        .sum()
}

fn print_report(a: &Args, p: &Plan, world: usize, reps: &[RankReport]) {
    let d = p.dims();
    println!(
        "problem: world {world}, N = {} ({} per rank), B {}, H {}, D {}, schedule {:?}, layout {:?}, causal {}, iters {}",
        d.seq, a.local, d.batch, d.heads, d.head_dim, a.schedule, a.layout, a.causal, a.iters
    );
    let es = if a.gpu { 2 } else { 4 }; // bf16 on the GPU ring, f32 on the host ring
    let own_kv = (2 * d.batch * a.local * d.kv_heads * d.head_dim * es) as u64;
    for r in reps {
        println!(
            "rank {} (GPU {}): forward median {:.2} ms, backward median {:.2} ms",
            r.rank,
            r.device,
            median(&r.fwd_ms),
            median(&r.bwd_ms)
        );
        for (name, s) in [("forward", &r.fwd), ("backward", &r.bwd)] {
            let per_step = if s.steps > 0 {
                s.bytes_sent / s.steps as u64
            } else {
                0
            };
            println!(
                "  {name}: steps {}, payload sent {} B, received {} B ({} B per step; own K/V block {} B), compute {:?}, wait {:?}, blocks computed {}, skipped {}, max remote blocks {}",
                s.steps, s.bytes_sent, s.bytes_recv, per_step, own_kv, s.compute, s.wait,
                s.blocks_computed, s.blocks_skipped, s.max_remote_blocks
            );
        }
        let w = r.wire;
        println!(
            "  NCCL wire (all {} iterations): exchanges {}, sent {} B (headers {} B), received {} B, all-reduces {}",
            a.iters, w.exchanges, w.bytes_sent, w.header_bytes_sent, w.bytes_recv, w.all_reduces
        );
        if let Some(e) = r.err {
            let what = if a.gpu {
                "GPU ring (bf16) vs single-device CPU (f32), ‖err‖/‖ref‖"
            } else {
                "max |ring - single device|"
            };
            println!(
                "  {what}: out {:.2e}, dq {:.2e}, dk {:.2e}, dv {:.2e}",
                e[0], e[1], e[2], e[3]
            );
        }
    }
    if a.layout == Layout::Contiguous {
        println!(
            "theoretical minimum forward payload per rank: {} B (contiguous layout)",
            min_forward_bytes(p, world, es)
        );
    }
}

/// Fail (non-zero exit) when a checked rank is off: SPEC §5 for bf16 on the GPU ring
/// (‖err‖/‖ref‖ ≤ 1e-2), a loose max-abs bound for the f32 host ring.
fn check_errors(a: &Args, reps: &[RankReport]) -> Result<()> {
    let tol = if a.gpu { 1e-2 } else { 1e-3 };
    for r in reps {
        if let Some(e) = r.err {
            if e.iter().any(|x| x.is_nan() || *x > tol) {
                return Err(Error::Ring {
                    msg: format!(
                        "rank {}: error {e:?} above {tol} against the single device",
                        r.rank
                    ),
                });
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = parse()?;
    let cfg = CommConfig::default().timeout(Duration::from_secs(a.timeout));
    println!("NCCL version {}", NcclComm::nccl_version()?);
    match a.mode.as_str() {
        "threads" => {
            let world = match a.world {
                Some(w) => w,
                None => NcclComm::device_count()?,
            };
            let p = plan(&a, world)?;
            let prob = Problem::new(&p);
            let want: Option<Vec<[Vec<f32>; 4]>> = if a.check {
                Some(
                    (0..world)
                        .map(|r| reference_rows(&a, &p, &prob, world, r))
                        .collect::<Result<_>>()?,
                )
            } else {
                None
            };
            let t = Instant::now();
            // ANCHOR: threads
            // One process, one thread per GPU: rank i on GPU i.
            let comms = NcclComm::from_devices(world, cfg)?;
            // ANCHOR_END: threads
            println!(
                "{world} communicators (one thread per GPU) in {:?}",
                t.elapsed()
            );
            // ANCHOR: run
            let res = nccl::run(comms, |c| {
                let r = c.rank();
                let w = want.as_ref().map(|w| &w[r]);
                if a.gpu {
                    run_rank_gpu(&c, &a, &p, &prob, w)
                } else {
                    run_rank(&c, &a, &p, &prob, w)
                }
            });
            // ANCHOR_END: run
            let reps = res.into_iter().collect::<Result<Vec<_>>>()?;
            print_report(&a, &p, world, &reps);
            check_errors(&a, &reps)?;
        }
        "env" => {
            let t = Instant::now();
            // ANCHOR: env
            // One process per GPU: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
            let c = NcclComm::from_env(cfg)?;
            // ANCHOR_END: env
            let world = c.world_size();
            println!(
                "rank {} of {world} on GPU {}: communicator in {:?}",
                c.rank(),
                c.device(),
                t.elapsed()
            );
            let p = plan(&a, world)?;
            let prob = Problem::new(&p);
            let want = if a.check {
                Some(reference_rows(&a, &p, &prob, world, c.rank())?)
            } else {
                None
            };
            let rep = if a.gpu {
                run_rank_gpu(&c, &a, &p, &prob, want.as_ref())?
            } else {
                run_rank(&c, &a, &p, &prob, want.as_ref())?
            };
            print_report(&a, &p, world, std::slice::from_ref(&rep));
            check_errors(&a, &[rep])?;
        }
        m => {
            return Err(Error::Ring {
                msg: format!("--mode {m}: threads or env"),
            })
        }
    }
    Ok(())
}
