//! Ring attention over the NCCL backend (feature `nccl`).
//!
//! * `construction_without_gpu_is_err` runs everywhere: on a machine without a GPU or
//!   NCCL, constructing a communicator is an `Err`, never a panic (skipped where a GPU
//!   and NCCL are present — it says nothing about GPU behaviour).
//! * The `#[ignore]`d tests need 2 GPUs with NCCL: forward and backward over
//!   `NcclComm::from_devices(2)` (one thread per GPU), every rank's rows of `out`, `L`,
//!   `dq`, `dk`, `dv` against the single-device CPU kernel (f32, SPEC §5) and, on small
//!   cases, against the float64 oracle; plus a stalled rank. Run them with
//!   `cargo test --release --features nccl --test nccl_ring -- --ignored --test-threads=1`.
#![cfg(feature = "nccl")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use dilated_attention::ops::{dilated, reference};
use dilated_attention::prelude::*;
use dilated_attention::ring::nccl::{self, NcclComm};
use dilated_attention::ring::rendezvous::RendezvousEnv;
use dilated_attention::ring::{self as ring_mod, CommConfig, Layout, RingComm, RingStats};
use dilated_attention::Error;

fn gpus_present() -> bool {
    NcclComm::device_count().is_ok_and(|n| n > 0) && NcclComm::nccl_version().is_ok()
}

#[test]
fn construction_without_gpu_is_err() {
    if gpus_present() {
        eprintln!("skipped: a GPU and NCCL are present (the ignored tests cover them)");
        return;
    }
    let cfg = CommConfig::default().timeout(Duration::from_secs(2));
    let r = NcclComm::from_devices(2, cfg);
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
    let env = RendezvousEnv {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 1,
    };
    let r = NcclComm::from_rendezvous(&env, cfg);
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
    assert!(NcclComm::from_devices(0, cfg).is_err());
}

/// What a ring run over NCCL gives back, gathered to global order.
struct RingRun<T> {
    out: Vec<T>,
    lse: Vec<T>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    stats: Vec<(RingStats, RingStats)>,
}

/// One rank's `(out, L, dq, dk, dv)`.
type Outputs<T> = (Vec<T>, Vec<T>, Vec<T>, Vec<T>, Vec<T>);

/// Forward then backward on `world` GPUs (one thread each), on global inputs split by
/// `layout`; `repeat` times on the same communicators (all repeats must agree).
#[allow(clippy::too_many_arguments)]
fn nccl_ring<T: Element>(
    world: usize,
    layout: Layout,
    plan: &Plan,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
    go: &[T],
    repeat: usize,
) -> RingRun<T> {
    let dm = *plan.dims();
    let (b, hd, kd) = (dm.batch, dm.heads * dm.head_dim, dm.kv_heads * dm.head_dim);
    let qs = layout.split(q, b, hd, world).unwrap();
    let ks = layout.split(k, b, kd, world).unwrap();
    let vs = layout.split(v, b, kd, world).unwrap();
    let gs = layout.split(go, b, hd, world).unwrap();
    let ms = mask.map(|m| layout.split(m, b, 1, world).unwrap());
    let comms = NcclComm::from_devices(
        world,
        CommConfig::default().timeout(Duration::from_secs(60)),
    )
    .expect("2 GPUs with NCCL");
    let res = nccl::run(comms, |c| {
        let r = c.rank();
        let m = ms.as_ref().map(|m| m[r].as_slice());
        let mut first: Option<Outputs<T>> = None;
        let mut stats = None;
        for _ in 0..repeat {
            let f = ring_mod::try_forward(&c, plan, layout, &qs[r], &ks[r], &vs[r], m)?;
            let (g, sb) = ring_mod::try_backward(
                &c, plan, layout, &qs[r], &ks[r], &vs[r], m, &f.out, &f.lse, &gs[r],
            )?;
            let now = (f.out, f.lse, g.dq, g.dk, g.dv);
            if let Some(p) = &first {
                assert!(
                    p.0 == now.0 && p.2 == now.2 && p.3 == now.3 && p.4 == now.4,
                    "rank {r}: a repeat on the same communicators gave different results"
                );
            } else {
                first = Some(now);
            }
            stats = Some((f.stats, sb));
        }
        let (o, l, dq, dk, dv) = first.expect("repeat >= 1");
        Ok((o, l, dq, dk, dv, stats.expect("repeat >= 1")))
    });
    let (mut o, mut l, mut dq, mut dk, mut dv, mut st) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (r, x) in res.into_iter().enumerate() {
        let x = x.unwrap_or_else(|e| panic!("rank {r} failed: {e}"));
        o.push(x.0);
        l.push(x.1);
        dq.push(x.2);
        dk.push(x.3);
        dv.push(x.4);
        st.push(x.5);
    }
    RingRun {
        out: layout.gather(&o, b, hd).unwrap(),
        lse: layout.gather(&l, b, dm.heads).unwrap(),
        dq: layout.gather(&dq, b, hd).unwrap(),
        dk: layout.gather(&dk, b, kd).unwrap(),
        dv: layout.gather(&dv, b, kd).unwrap(),
        stats: st,
    }
}

/// f32 ring over NCCL vs the f32 single-device kernel, and the statistics' invariants.
fn check_vs_single(case: &Case, layout: Layout) {
    let plan = case.plan();
    let (q, k, v, go) = case.data();
    let (q, k, v, go) = (to_f32(&q), to_f32(&k), to_f32(&v), to_f32(&go));
    let mask = case.mask.as_deref();
    let single = dilated::try_forward(&plan, &q, &k, &v, mask).unwrap();
    let gs = dilated::try_backward(&plan, &q, &k, &v, mask, &single.out, &single.lse, &go).unwrap();
    let ring = nccl_ring(2, layout, &plan, &q, &k, &v, mask, &go, 2);
    let ctx = (case, layout);
    assert_close(
        "out",
        &from_f32(&ring.out),
        &from_f32(&single.out),
        1e-5,
        1e-6,
        &ctx,
    );
    assert_lse(&from_f32(&ring.lse), &from_f32(&single.lse), 1e-5, &ctx);
    assert_close(
        "dq",
        &from_f32(&ring.dq),
        &from_f32(&gs.dq),
        1e-5,
        1e-5,
        &ctx,
    );
    assert_close(
        "dk",
        &from_f32(&ring.dk),
        &from_f32(&gs.dk),
        1e-5,
        1e-5,
        &ctx,
    );
    assert_close(
        "dv",
        &from_f32(&ring.dv),
        &from_f32(&gs.dv),
        1e-5,
        1e-5,
        &ctx,
    );
    for (name, pick) in [("forward", 0), ("backward", 1)] {
        let s: Vec<&RingStats> = ring
            .stats
            .iter()
            .map(|x| if pick == 0 { &x.0 } else { &x.1 })
            .collect();
        let sent: u64 = s.iter().map(|x| x.bytes_sent).sum();
        let recv: u64 = s.iter().map(|x| x.bytes_recv).sum();
        assert_eq!(sent, recv, "{name}: bytes sent == bytes received");
        assert!(sent > 0, "{name}: something travelled");
        eprintln!("{name}: {s:?}");
    }
}

/// f64 ring over NCCL vs the float64 oracle (tight).
fn check_vs_oracle(case: &Case, layout: Layout) {
    let plan = case.plan();
    let (q, k, v, go) = case.data();
    let mask = case.mask.as_deref();
    let want = reference::forward(&plan, &q, &k, &v, mask).unwrap();
    let gw = reference::backward(&plan, &q, &k, &v, mask, &go).unwrap();
    let ring = nccl_ring(2, layout, &plan, &q, &k, &v, mask, &go, 1);
    let ctx = (case, layout);
    assert_close("out", &ring.out, &want.out, 1e-12, 1e-12, &ctx);
    assert_lse(&ring.lse, &want.lse, 1e-12, &ctx);
    assert_close("dq", &ring.dq, &gw.dq, 1e-12, 1e-11, &ctx);
    assert_close("dk", &ring.dk, &gw.dk, 1e-12, 1e-11, &ctx);
    assert_close("dv", &ring.dv, &gw.dv, 1e-12, 1e-11, &ctx);
}

fn case(dims: Dims, schedule: &[Pattern], opts: Options, mask: bool, seed: u64) -> Case {
    Case {
        dims,
        schedule: schedule.to_vec(),
        opts,
        mask: mask.then(|| {
            let m = normal(seed ^ 0x55, dims.batch * dims.seq);
            m.iter().map(|x| *x > -0.85).collect()
        }),
        seed,
    }
}

#[test]
#[ignore = "needs 2 GPUs with NCCL"]
fn dense_causal_zigzag_matches_single_device() {
    let dims = Dims {
        batch: 2,
        seq: 2 * 96,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
    };
    let c = case(
        dims,
        &[Pattern::new(192, 1)],
        Options::default().causal(true),
        false,
        11,
    );
    check_vs_single(&c, Layout::Zigzag);
}

#[test]
#[ignore = "needs 2 GPUs with NCCL"]
fn dilated_schedule_matches_single_device() {
    let dims = Dims {
        batch: 1,
        seq: 2 * 128,
        heads: 4,
        kv_heads: 4,
        head_dim: 16,
    };
    let schedule = [
        Pattern::new(64, 1),
        Pattern::new(128, 2),
        Pattern::new(256, 4),
    ];
    // Contiguous with a key padding mask, then zigzag causal.
    let c = case(dims, &schedule, Options::default(), true, 12);
    check_vs_single(&c, Layout::Contiguous);
    let c = case(dims, &schedule, Options::default().causal(true), false, 13);
    check_vs_single(&c, Layout::Zigzag);
}

#[test]
#[ignore = "needs 2 GPUs with NCCL"]
fn small_cases_match_the_float64_oracle() {
    let dims = Dims {
        batch: 2,
        seq: 2 * 8,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
    };
    let dense = case(
        dims,
        &[Pattern::new(16, 1)],
        Options::default().causal(true),
        false,
        21,
    );
    check_vs_oracle(&dense, Layout::Zigzag);
    let schedule = [Pattern::new(4, 1), Pattern::new(8, 2), Pattern::new(16, 4)];
    let dil = case(dims, &schedule, Options::default().causal(true), true, 22);
    check_vs_oracle(&dil, Layout::Contiguous);
    check_vs_oracle(&dil, Layout::Zigzag);
}

#[test]
#[ignore = "needs 2 GPUs with NCCL"]
fn all_reduce_max_over_nccl() {
    let comms = NcclComm::from_devices(2, CommConfig::default()).expect("2 GPUs with NCCL");
    let res = nccl::run(comms, |c| {
        let tag = dilated_attention::ring::Tag {
            pattern: u32::MAX,
            group: 0,
            step: 0,
            kind: 2,
        };
        let m = c
            .all_reduce_max(tag, 1.5 + c.rank() as f64)
            .map_err(|f| Error::Comm {
                rank: c.rank(),
                step: 0,
                msg: f.to_string(),
            })?;
        c.barrier(tag).map_err(|f| Error::Comm {
            rank: c.rank(),
            step: 0,
            msg: f.to_string(),
        })?;
        Ok(m)
    });
    for r in res {
        assert_eq!(r.unwrap(), 2.5);
    }
}

#[test]
#[ignore = "needs 2 GPUs with NCCL"]
fn stalled_rank_gives_err_within_timeout() {
    let timeout = Duration::from_secs(3);
    let comms = NcclComm::from_devices(2, CommConfig::default().timeout(timeout))
        .expect("2 GPUs with NCCL");
    let dims = Dims {
        batch: 1,
        seq: 2 * 32,
        heads: 2,
        kv_heads: 2,
        head_dim: 8,
    };
    let plan = Plan::new(
        dims,
        &[Pattern::new(64, 1)],
        Options::default().causal(true),
    )
    .unwrap();
    let x = to_f32(&normal(5, dims.batch * 32 * dims.heads * dims.head_dim));
    let t0 = Instant::now();
    let res = nccl::run(comms, |c| {
        if c.rank() == 1 {
            // Stall: never post, then leave (dropping the communicator aborts it).
            std::thread::sleep(timeout * 3);
            return Ok(Duration::ZERO);
        }
        let t = Instant::now();
        match ring_mod::try_forward(&c, &plan, Layout::Zigzag, &x, &x, &x, None) {
            Ok(_) => panic!("rank 0 finished although rank 1 never posted"),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("rank 0 got: {msg}");
                assert!(matches!(e, Error::Comm { rank: 0, .. }), "{e:?}");
                assert!(
                    msg.contains("did not finish within"),
                    "the error is the timeout, not another fault: {msg}"
                );
                assert!(
                    msg.contains("rank 1"),
                    "the error names the stalled peer: {msg}"
                );
                Ok(t.elapsed())
            }
        }
    });
    let waited = res[0]
        .as_ref()
        .expect("rank 0 reports the stall as its result");
    assert!(
        *waited < timeout * 2 + Duration::from_secs(2),
        "rank 0 took {waited:?} with a {timeout:?} timeout"
    );
    eprintln!(
        "rank 0 returned Err after {waited:?} (timeout {timeout:?}); whole test {:?}",
        t0.elapsed()
    );
}
