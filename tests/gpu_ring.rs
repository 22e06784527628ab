//! The GPU-resident ring (`ring::gpu`, features `nccl` + `cuda`) on 2 GPUs.
//!
//! Every test here needs 2 GPUs with NCCL and is `#[ignore]`d: on a machine without them
//! it is reported as ignored, never as passed. Run on the GPU machine with
//! `cargo test --release --features nccl,cuda --test gpu_ring -- --ignored --test-threads=1`
//! (or the prebuilt binary with `--ignored --test-threads=1`, see `scripts/gpu_check.sh`).
//!
//! Each case splits random global inputs (logged seed) over 2 ranks, runs forward and
//! backward on the GPUs (one thread per GPU, `NcclComm::from_devices`, outputs poisoned
//! with NaN before kernels write), gathers the rows and compares them with
//! * the float64 oracle on the inputs rounded to the dtype (SPEC §5: `‖err‖/‖ref‖ ≤ 1e-2`
//!   for bf16/f16, `1e-4` for f32; `L` is `-inf` exactly where the oracle's is), and
//! * the single-GPU kernels on the same inputs (the same tolerance).
#![cfg(all(feature = "nccl", feature = "cuda"))]

mod common;

use std::time::{Duration, Instant};

use common::gpu::{check_lse, check_norm, round, to64};
use common::normal;
use cudarc::driver::CudaSlice;
use dilated_attention::ops::dilated::cuda as single;
use dilated_attention::ops::reference;
use dilated_attention::prelude::*;
use dilated_attention::ring::gpu;
use dilated_attention::ring::nccl::{self, NcclComm};
use dilated_attention::ring::rendezvous::RendezvousEnv;
use dilated_attention::ring::{CommConfig, Layout, RingComm, RingStats};
use dilated_attention::tensor::cuda::{Cuda, CudaElement};
use dilated_attention::Error;

/// Gathered global `(out, L, dq, dk, dv)` in f64, and per-rank (forward, backward) stats.
struct Run {
    out: Vec<f64>,
    lse: Vec<f32>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    stats: Vec<(RingStats, RingStats)>,
}

type RankOut<E> = (
    Vec<E>,
    Vec<f32>,
    Vec<E>,
    Vec<E>,
    Vec<E>,
    (RingStats, RingStats),
);

/// Global inputs split into each rank's rows.
struct Split<E> {
    q: Vec<Vec<E>>,
    k: Vec<Vec<E>>,
    v: Vec<Vec<E>>,
    go: Vec<Vec<E>>,
    mask: Option<Vec<Vec<u8>>>,
}

fn split<E: CudaElement>(
    world: usize,
    layout: Layout,
    plan: &Plan,
    (q, k, v, go): (&[E], &[E], &[E], &[E]),
    mask: Option<&[u8]>,
) -> Split<E> {
    let dm = *plan.dims();
    let (b, hd, kd) = (dm.batch, dm.heads * dm.head_dim, dm.kv_heads * dm.head_dim);
    Split {
        q: layout.split(q, b, hd, world).unwrap(),
        k: layout.split(k, b, kd, world).unwrap(),
        v: layout.split(v, b, kd, world).unwrap(),
        go: layout.split(go, b, hd, world).unwrap(),
        mask: mask.map(|m| layout.split(m, b, 1, world).unwrap()),
    }
}

/// One rank: upload its rows, ring forward and backward (outputs poisoned), download.
fn rank_run<E: CudaElement>(
    c: &NcclComm,
    plan: &Plan,
    layout: Layout,
    sp: &Split<E>,
) -> dilated_attention::Result<RankOut<E>> {
    let r = c.rank();
    let dev = Cuda::new(c.device())?;
    dev.set_poison(true);
    let (qd, kd, vd, gd) = (
        dev.htod(&sp.q[r])?,
        dev.htod(&sp.k[r])?,
        dev.htod(&sp.v[r])?,
        dev.htod(&sp.go[r])?,
    );
    let md = sp.mask.as_ref().map(|m| dev.htod(&m[r])).transpose()?;
    let md = md.as_ref();
    let f = gpu::try_forward(&dev, c, plan, layout, &qd, &kd, &vd, md)?;
    let g = gpu::try_backward(
        &dev, c, plan, layout, &qd, &kd, &vd, md, &f.out, &f.lse, &gd,
    )?;
    let host = |x: &CudaSlice<E>| dev.dtoh(x);
    Ok((
        host(&f.out)?,
        dev.dtoh(&f.lse)?,
        host(&g.dq)?,
        host(&g.dk)?,
        host(&g.dv)?,
        (f.stats, g.stats),
    ))
}

/// The ranks' results back in global order.
fn gather<E: CudaElement>(
    plan: &Plan,
    layout: Layout,
    res: Vec<dilated_attention::Result<RankOut<E>>>,
) -> Run {
    let dm = *plan.dims();
    let (b, hd, kd) = (dm.batch, dm.heads * dm.head_dim, dm.kv_heads * dm.head_dim);
    let parts: Vec<RankOut<E>> = res
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r} failed: {e}")))
        .collect();
    let cat = |f: &dyn Fn(&RankOut<E>) -> Vec<f64>, inner: usize| {
        let p: Vec<Vec<f64>> = parts.iter().map(f).collect();
        layout.gather(&p, b, inner).unwrap()
    };
    let lse: Vec<Vec<f32>> = parts.iter().map(|p| p.1.clone()).collect();
    Run {
        out: cat(&|p| to64(&p.0), hd),
        lse: layout.gather(&lse, b, dm.heads).unwrap(),
        dq: cat(&|p| to64(&p.2), hd),
        dk: cat(&|p| to64(&p.3), kd),
        dv: cat(&|p| to64(&p.4), kd),
        stats: parts.iter().map(|p| p.5.clone()).collect(),
    }
}

/// Forward then backward on `world` GPUs, one thread each (`NcclComm::from_devices`).
fn ring_run<E: CudaElement>(
    world: usize,
    layout: Layout,
    plan: &Plan,
    inputs: (&[E], &[E], &[E], &[E]),
    mask: Option<&[u8]>,
) -> Run {
    let sp = split(world, layout, plan, inputs, mask);
    let comms = NcclComm::from_devices(
        world,
        CommConfig::default().timeout(Duration::from_secs(60)),
    )
    .expect("2 GPUs with NCCL");
    gather(
        plan,
        layout,
        nccl::run(comms, |c| rank_run(&c, plan, layout, &sp)),
    )
}

/// Ring on 2 GPUs vs the oracle and vs the single-GPU kernels; returns the stats.
fn check_case<E: CudaElement>(
    layout: Layout,
    world: usize,
    dims: Dims,
    schedule: &[Pattern],
    opts: Options,
    seed: u64,
) -> Vec<(RingStats, RingStats)> {
    check_case_with::<E>(layout, world, dims, schedule, opts, seed, false)
}

/// As [`check_case`], with a random key padding mask (about 15% of keys off) if `masked`.
fn check_case_with<E: CudaElement>(
    layout: Layout,
    world: usize,
    dims: Dims,
    schedule: &[Pattern],
    opts: Options,
    seed: u64,
    masked: bool,
) -> Vec<(RingStats, RingStats)> {
    let plan = Plan::new(dims, schedule, opts).unwrap();
    let mask: Option<Vec<bool>> = masked.then(|| {
        normal(seed ^ 0x55, dims.batch * dims.seq)
            .iter()
            .map(|x| *x > -1.0)
            .collect()
    });
    let mask_bytes: Option<Vec<u8>> = mask
        .as_ref()
        .map(|m| m.iter().map(|&x| u8::from(x)).collect());
    let ctx = format!(
        "{} {layout:?} W={world} dims {dims:?} schedule {schedule:?} opts {opts:?} seed {seed} masked {masked}",
        E::NAME
    );
    eprintln!("case: {ctx}");
    let (q, qr) = round::<E>(&normal(seed, dims.q_len()));
    let (k, kr) = round::<E>(&normal(seed ^ 1, dims.kv_len()));
    let (v, vr) = round::<E>(&normal(seed ^ 2, dims.kv_len()));
    let (go, gr) = round::<E>(&normal(seed ^ 3, dims.q_len()));
    let ring = ring_run(
        world,
        layout,
        &plan,
        (&q, &k, &v, &go),
        mask_bytes.as_deref(),
    );
    let want = reference::forward(&plan, &qr, &kr, &vr, mask.as_deref()).unwrap();
    let gw = reference::backward(&plan, &qr, &kr, &vr, mask.as_deref(), &gr).unwrap();
    let tol = if E::TENSOR_CORES { 1e-2 } else { 1e-4 };
    let d = dims.head_dim;
    let e = [
        check_norm("out", &ring.out, &want.out, tol, d, &ctx),
        check_norm("dq", &ring.dq, &gw.dq, tol, d, &ctx),
        check_norm("dk", &ring.dk, &gw.dk, tol, d, &ctx),
        check_norm("dv", &ring.dv, &gw.dv, tol, d, &ctx),
    ];
    check_lse(&ring.lse, &want.lse, tol, &ctx);
    // The single-GPU kernels on the whole problem.
    let dev = Cuda::new(0).unwrap();
    let (qd, kd, vd, gd) = (
        dev.htod(&q).unwrap(),
        dev.htod(&k).unwrap(),
        dev.htod(&v).unwrap(),
        dev.htod(&go).unwrap(),
    );
    let md = mask_bytes.as_ref().map(|m| dev.htod(m).unwrap());
    let md = md.as_ref();
    let f = single::try_forward(&dev, &plan, &qd, &kd, &vd, md).unwrap();
    let g = single::try_backward(&dev, &plan, &qd, &kd, &vd, md, &f.out, &f.lse, &gd).unwrap();
    let s = [
        check_norm(
            "out vs 1 GPU",
            &ring.out,
            &to64(&dev.dtoh(&f.out).unwrap()),
            tol,
            d,
            &ctx,
        ),
        check_norm(
            "dq vs 1 GPU",
            &ring.dq,
            &to64(&dev.dtoh(&g.dq).unwrap()),
            tol,
            d,
            &ctx,
        ),
        check_norm(
            "dk vs 1 GPU",
            &ring.dk,
            &to64(&dev.dtoh(&g.dk).unwrap()),
            tol,
            d,
            &ctx,
        ),
        check_norm(
            "dv vs 1 GPU",
            &ring.dv,
            &to64(&dev.dtoh(&g.dv).unwrap()),
            tol,
            d,
            &ctx,
        ),
    ];
    eprintln!("  rel err vs oracle (out dq dk dv) {e:?}; vs 1 GPU {s:?}");
    for (r, (fs, bs)) in ring.stats.iter().enumerate() {
        eprintln!("  rank {r} fwd {fs:?}\n  rank {r} bwd {bs:?}");
    }
    let sent: u64 = ring
        .stats
        .iter()
        .map(|s| s.0.bytes_sent + s.1.bytes_sent)
        .sum();
    let recv: u64 = ring
        .stats
        .iter()
        .map(|s| s.0.bytes_recv + s.1.bytes_recv)
        .sum();
    assert_eq!(sent, recv, "bytes sent == bytes received; {ctx}");
    ring.stats
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn dense_causal_zigzag() {
    let dims = Dims {
        batch: 2,
        seq: 512,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let st = check_case::<half::bf16>(
        Layout::Zigzag,
        2,
        dims,
        &[Pattern::new(512, 1)],
        Options::default().causal(true),
        101,
    );
    // Zigzag: both ranks compute the same number of causal blocks.
    assert_eq!(st[0].0.blocks_computed, st[1].0.blocks_computed);
    // Dense: each rank's K/V crosses once (1 step forward), K/V + f32 dK/dV backward.
    let kv = (2 * 256 * 2 * 64 * 2 * 2) as u64;
    assert_eq!(st[0].0.bytes_sent, kv, "forward sends exactly its K/V once");
    check_case::<half::f16>(
        Layout::Zigzag,
        2,
        Dims {
            head_dim: 128,
            ..dims
        },
        &[Pattern::new(512, 1)],
        Options::default().causal(true),
        102,
    );
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn dense_contiguous_f32_generic_kernels() {
    let dims = Dims {
        batch: 1,
        seq: 256,
        heads: 2,
        kv_heads: 2,
        head_dim: 32,
    };
    check_case::<f32>(
        Layout::Contiguous,
        2,
        dims,
        &[Pattern::new(256, 1)],
        Options::default(),
        103,
    );
    check_case::<f32>(
        Layout::Contiguous,
        2,
        dims,
        &[Pattern::new(256, 1)],
        Options::default().causal(true),
        104,
    );
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn dilated_schedules_both_combines() {
    // Chunk 128 (zigzag, n = 256): (64, 1) is local, (256, 2) and (512, 4) span chunks.
    let dims = Dims {
        batch: 1,
        seq: 512,
        heads: 4,
        kv_heads: 4,
        head_dim: 128,
    };
    let sched = [
        Pattern::new(64, 1),
        Pattern::new(256, 2),
        Pattern::new(512, 4),
    ];
    for (layout, opts, seed) in [
        (Layout::Zigzag, Options::default().causal(true), 201),
        (Layout::Contiguous, Options::default(), 202),
        (
            Layout::Zigzag,
            Options::default().causal(true).combine(Combine::HeadGroups),
            203,
        ),
        (
            Layout::Contiguous,
            Options::default().combine(Combine::HeadGroups),
            204,
        ),
    ] {
        let st = check_case::<half::bf16>(layout, 2, dims, &sched, opts, seed);
        // Only the dilated rows travel: per spanning pattern (w, r) a rank sends its
        // compact K/V (n/r rows per head group member) once per step of its sub-ring.
        assert!(st.iter().all(|s| s.0.bytes_sent > 0));
    }
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn all_segments_local_is_one_launch_and_no_exchange() {
    // Chunk 128: every segment lies in one chunk, LongNet's case for long sequences.
    let dims = Dims {
        batch: 1,
        seq: 512,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let sched = [
        Pattern::new(32, 1),
        Pattern::new(64, 2),
        Pattern::new(128, 4),
    ];
    for (layout, opts, seed) in [
        (Layout::Zigzag, Options::default().causal(true), 501),
        (
            Layout::Contiguous,
            Options::default().combine(Combine::HeadGroups),
            502,
        ),
    ] {
        let st = check_case::<half::bf16>(layout, 2, dims, &sched, opts, seed);
        for (f, b) in &st {
            assert_eq!(f.bytes_sent + b.bytes_sent, 0, "nothing travels");
            assert_eq!(f.steps + b.steps, 0);
        }
    }
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn gqa_expanded_and_aligned_heads() {
    // Lse with r > 1 and GQA: query heads of one kv head use different offsets, so the
    // compact K/V carry one head per query head (expanded). HeadGroups with groups of
    // whole kv groups: compact kv heads (aligned); with ragged groups: expanded.
    let dims = Dims {
        batch: 2,
        seq: 512,
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
    };
    let sched = [Pattern::new(128, 1), Pattern::new(512, 2)];
    check_case::<half::bf16>(
        Layout::Zigzag,
        2,
        dims,
        &sched,
        Options::default().causal(true),
        301,
    );
    check_case::<half::bf16>(
        Layout::Contiguous,
        2,
        dims,
        &sched,
        Options::default().combine(Combine::HeadGroups),
        302,
    );
    let ragged = Dims {
        heads: 6,
        kv_heads: 3,
        ..dims
    };
    let sched3 = [
        Pattern::new(128, 1),
        Pattern::new(256, 2),
        Pattern::new(512, 4),
        Pattern::new(512, 2),
    ];
    check_case::<half::bf16>(
        Layout::Zigzag,
        2,
        ragged,
        &sched3,
        Options::default().causal(true).combine(Combine::HeadGroups),
        303,
    );
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn unsupported_shape_is_err_on_every_rank() {
    // Zigzag n = 96: chunk 48; a segment of 64 straddles chunk edges without covering them.
    let dims = Dims::mha(1, 192, 2, 64);
    let plan = Plan::new(dims, &[Pattern::new(64, 1)], Options::default()).unwrap();
    let comms = NcclComm::from_devices(2, CommConfig::default()).expect("2 GPUs with NCCL");
    let x = vec![half::bf16::from_f32(0.5); 96 * 2 * 64];
    let res = nccl::run(comms, |c| {
        let dev = Cuda::new(c.device())?;
        let xd = dev.htod(&x)?;
        gpu::try_forward(&dev, &c, &plan, Layout::Zigzag, &xd, &xd, &xd, None).map(|_| ())
    });
    for (r, x) in res.into_iter().enumerate() {
        let e = x.expect_err("unsupported shape must be Err");
        eprintln!("rank {r}: {e}");
        assert!(matches!(e, Error::Ring { .. }), "{e:?}");
        assert!(e.to_string().contains("pattern 0"), "{e}");
    }
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn stalled_rank_gives_err_within_timeout() {
    let timeout = Duration::from_secs(3);
    let comms = NcclComm::from_devices(2, CommConfig::default().timeout(timeout))
        .expect("2 GPUs with NCCL");
    let dims = Dims::mha(1, 256, 2, 64);
    let plan = Plan::new(
        dims,
        &[Pattern::new(256, 1)],
        Options::default().causal(true),
    )
    .unwrap();
    let x: Vec<half::bf16> = normal(7, 128 * 2 * 64)
        .iter()
        .map(|&v| half::bf16::from_f64(v))
        .collect();
    let res = nccl::run(comms, |c| {
        if c.rank() == 1 {
            std::thread::sleep(timeout * 3);
            return Ok(Duration::ZERO);
        }
        let dev = Cuda::new(c.device())?;
        let xd = dev.htod(&x)?;
        let t = Instant::now();
        match gpu::try_forward(&dev, &c, &plan, Layout::Zigzag, &xd, &xd, &xd, None) {
            Ok(_) => panic!("rank 0 finished although rank 1 never took part"),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("rank 0 got: {msg}");
                assert!(matches!(e, Error::Comm { rank: 0, .. }), "{e:?}");
                assert!(msg.contains("rank 1"), "names the stalled peer: {msg}");
                assert!(msg.contains("step"), "names the step: {msg}");
                Ok(t.elapsed())
            }
        }
    });
    let waited = *res[0].as_ref().expect("rank 0 reports the stall");
    assert!(
        waited < timeout * 2 + Duration::from_secs(2),
        "rank 0 took {waited:?} with a {timeout:?} timeout"
    );
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn one_rank_ring_computes_multi_chunk_segments_locally() {
    // W = 1, zigzag: both chunks on rank 0, so every segment longer than a chunk lies on
    // this rank alone (no exchange group): computed from local compact blocks.
    let dims = Dims {
        batch: 1,
        seq: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let st = check_case::<half::bf16>(
        Layout::Zigzag,
        1,
        dims,
        &[Pattern::new(64, 1), Pattern::new(256, 2)],
        Options::default().causal(true),
        401,
    );
    assert_eq!(st[0].0.bytes_sent, 0, "one rank sends nothing");
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn rendezvous_start_mode_matches_the_oracle() {
    // The torchrun-style start (`NcclComm::from_rendezvous`: rank 0's NCCL id over TCP),
    // here two threads standing in for two processes.
    let dims = Dims {
        batch: 1,
        seq: 512,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let sched = [Pattern::new(128, 1), Pattern::new(512, 2)];
    let plan = Plan::new(dims, &sched, Options::default().causal(true)).unwrap();
    let layout = Layout::Zigzag;
    let seed = 601;
    let (q, qr) = round::<half::bf16>(&normal(seed, dims.q_len()));
    let (k, kr) = round::<half::bf16>(&normal(seed ^ 1, dims.kv_len()));
    let (v, vr) = round::<half::bf16>(&normal(seed ^ 2, dims.kv_len()));
    let (go, gr) = round::<half::bf16>(&normal(seed ^ 3, dims.q_len()));
    let sp = split(2, layout, &plan, (&q, &k, &v, &go), None);
    let port = 29400 + (std::process::id() % 500) as u16;
    let res = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let (sp, plan) = (&sp, &plan);
                sc.spawn(move || {
                    let env = RendezvousEnv {
                        rank: r,
                        world_size: 2,
                        local_rank: r,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let c = NcclComm::from_rendezvous(
                        &env,
                        CommConfig::default().timeout(Duration::from_secs(60)),
                    )?;
                    rank_run(&c, plan, layout, sp)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    let ring = gather(&plan, layout, res);
    let want = reference::forward(&plan, &qr, &kr, &vr, None).unwrap();
    let gw = reference::backward(&plan, &qr, &kr, &vr, None, &gr).unwrap();
    let ctx = "rendezvous start, zigzag causal, seed 601";
    check_norm("out", &ring.out, &want.out, 1e-2, 64, &ctx);
    check_norm("dq", &ring.dq, &gw.dq, 1e-2, 64, &ctx);
    check_norm("dk", &ring.dk, &gw.dk, 1e-2, 64, &ctx);
    check_norm("dv", &ring.dv, &gw.dv, 1e-2, 64, &ctx);
    check_lse(&ring.lse, &want.lse, 1e-2, &ctx);
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn typed_front_door_matches_the_runtime_ring() {
    use dilated_attention::ring::RingDilatedAttention;
    type S = (Seg<128, 1>, Seg<512, 2>);
    let dims = Dims {
        batch: 1,
        seq: 512,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let plan = Plan::new(
        dims,
        &[Pattern::new(128, 1), Pattern::new(512, 2)],
        Options::default().causal(true),
    )
    .unwrap();
    let (q, _) = round::<half::bf16>(&normal(701, dims.q_len()));
    let (k, _) = round::<half::bf16>(&normal(702, dims.kv_len()));
    let (go, _) = round::<half::bf16>(&normal(703, dims.q_len()));
    let layout = Layout::Zigzag;
    let qs = layout.split(&q, 1, 4 * 64, 2).unwrap();
    let ks = layout.split(&k, 1, 2 * 64, 2).unwrap();
    let gs = layout.split(&go, 1, 4 * 64, 2).unwrap();
    let comms = NcclComm::from_devices(2, CommConfig::default()).expect("2 GPUs with NCCL");
    let res = nccl::run(comms, |c| {
        let r = c.rank();
        let dev = Cuda::new(c.device())?;
        let sq = (Const::<1>, Const::<256>, Const::<4>, Const::<64>);
        let sk = (Const::<1>, Const::<256>, Const::<2>, Const::<64>);
        let (tq, tk, tg) = (
            dev.tensor_from_vec(&qs[r], sq)?,
            dev.tensor_from_vec(&ks[r], sk)?,
            dev.tensor_from_vec(&gs[r], sq)?,
        );
        let attn =
            RingDilatedAttention::<_, S, LseCombine, 256, 2>::try_new(&c, layout)?.causal(true);
        let (out, lse, _) = attn.try_forward_cuda(&dev, &tq, &tk, &tk, None)?;
        let (dq, dk, dv, _) = attn.try_backward_cuda(&dev, &tq, &tk, &tk, None, &out, &lse, &tg)?;
        // The runtime entry points on the same buffers.
        let f = gpu::try_forward(
            &dev,
            &c,
            &plan,
            layout,
            tq.slice(),
            tk.slice(),
            tk.slice(),
            None,
        )?;
        let g = gpu::try_backward(
            &dev,
            &c,
            &plan,
            layout,
            tq.slice(),
            tk.slice(),
            tk.slice(),
            None,
            &f.out,
            &f.lse,
            tg.slice(),
        )?;
        assert_eq!(out.to_vec()?, dev.dtoh(&f.out)?, "rank {r}: out");
        assert_eq!(lse.to_vec()?, dev.dtoh(&f.lse)?, "rank {r}: L");
        assert_eq!(dq.to_vec()?, dev.dtoh(&g.dq)?, "rank {r}: dq");
        assert_eq!(dk.to_vec()?, dev.dtoh(&g.dk)?, "rank {r}: dk");
        assert_eq!(dv.to_vec()?, dev.dtoh(&g.dv)?, "rank {r}: dv");
        Ok(())
    });
    for (r, x) in res.into_iter().enumerate() {
        x.unwrap_or_else(|e| panic!("rank {r}: {e}"));
    }
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn key_padding_masks() {
    // Masks travel with the compact K/V of spanning patterns that give every head the
    // same rows (dilation 1, or HeadGroups); local patterns take any mask.
    let dims = Dims {
        batch: 2,
        seq: 512,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let causal = Options::default().causal(true);
    check_case_with::<half::bf16>(
        Layout::Zigzag,
        2,
        dims,
        &[Pattern::new(512, 1)],
        causal,
        801,
        true,
    );
    check_case_with::<half::bf16>(
        Layout::Contiguous,
        2,
        dims,
        &[
            Pattern::new(64, 4),
            Pattern::new(128, 2),
            Pattern::new(512, 1),
        ],
        Options::default(),
        802,
        true,
    );
    check_case_with::<half::bf16>(
        Layout::Zigzag,
        2,
        dims,
        &[
            Pattern::new(64, 1),
            Pattern::new(256, 2),
            Pattern::new(512, 4),
        ],
        causal.combine(Combine::HeadGroups),
        803,
        true,
    );
    check_case_with::<half::bf16>(
        Layout::Zigzag,
        2,
        dims,
        &[Pattern::new(32, 2), Pattern::new(128, 4)],
        causal,
        804,
        true,
    );
}

#[test]
#[ignore = "needs 2 GPUs with NCCL: run with --ignored on the GPU machine"]
fn mask_with_per_head_rows_in_flight_is_err() {
    // Lse with a spanning dilation-2 pattern: heads read different travelling rows, which
    // one key mask per block cannot describe: an `Err` on every rank, before any exchange.
    let dims = Dims::mha(1, 512, 2, 64);
    let plan = Plan::new(dims, &[Pattern::new(512, 2)], Options::default()).unwrap();
    let comms = NcclComm::from_devices(2, CommConfig::default()).expect("2 GPUs with NCCL");
    let x = vec![half::bf16::from_f32(0.5); 256 * 2 * 64];
    let m = vec![1u8; 256];
    let res = nccl::run(comms, |c| {
        let dev = Cuda::new(c.device())?;
        let (xd, md) = (dev.htod(&x)?, dev.htod(&m)?);
        gpu::try_forward(&dev, &c, &plan, Layout::Zigzag, &xd, &xd, &xd, Some(&md)).map(|_| ())
    });
    for (r, x) in res.into_iter().enumerate() {
        let e = x.expect_err("per-head rows with a mask must be Err");
        eprintln!("rank {r}: {e}");
        assert!(e.to_string().contains("mask"), "{e}");
    }
}
