//! What travels (SPEC §2), checked from the per-call statistics and from a recording
//! communicator: segments inside a chunk move nothing; dilation `r` moves `1/r` of the
//! dense bytes; blocks move only among the ranks of a segment; no rank ever holds more
//! than a constant number of remote blocks; causal blocks nobody can see are skipped.

mod common;

use std::cell::RefCell;

use common::*;
use dilated_attention::prelude::*;
use dilated_attention::ring::{
    self, loopback, simulate_backward, simulate_forward, CommConfig, CommFault, Layout, Packet,
    RingComm, RingStats, Tag,
};

fn inputs(plan: &Plan, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = plan.dims();
    (
        to_f32(&normal(seed, d.q_len())),
        to_f32(&normal(seed + 1, d.kv_len())),
        to_f32(&normal(seed + 2, d.kv_len())),
        to_f32(&normal(seed + 3, d.q_len())),
    )
}

/// Forward and backward statistics of every rank.
fn stats(world: usize, layout: Layout, plan: &Plan) -> (Vec<RingStats>, Vec<RingStats>) {
    let (q, k, v, go) = inputs(plan, 5);
    let cfg = CommConfig::default();
    let (f, sf) = simulate_forward(world, layout, cfg, plan, &q, &k, &v, None).unwrap();
    let (_, sb) = simulate_backward(
        world, layout, cfg, plan, &q, &k, &v, None, &f.out, &f.lse, &go,
    )
    .unwrap();
    (sf, sb)
}

fn total(s: &[RingStats]) -> u64 {
    s.iter().map(|x| x.bytes_sent).sum()
}

#[test]
fn segments_inside_a_chunk_move_nothing() {
    // n = 16 per rank; every segment (8, 16) lies inside one rank's chunk.
    let plan = Plan::new(
        Dims::mha(2, 64, 4, 8),
        &[Pattern::new(8, 1), Pattern::new(16, 2), Pattern::new(4, 4)],
        Options::default().causal(true),
    )
    .unwrap();
    let (sf, sb) = stats(4, Layout::Contiguous, &plan);
    for s in sf.iter().chain(&sb) {
        assert_eq!((s.bytes_sent, s.bytes_recv, s.steps), (0, 0, 0), "{s:?}");
    }
    // Zigzag: chunks of 8 rows; segments of 8 and 4 stay inside a chunk.
    let plan = Plan::new(
        Dims::mha(1, 64, 4, 8),
        &[Pattern::new(8, 1), Pattern::new(4, 2)],
        Options::default(),
    )
    .unwrap();
    let (sf, sb) = stats(4, Layout::Zigzag, &plan);
    assert_eq!(total(&sf) + total(&sb), 0);
}

#[test]
fn dilation_r_moves_one_rth_of_dense() {
    for layout in [Layout::Contiguous, Layout::Zigzag] {
        for world in [2, 4] {
            let n = 64 * world;
            let dims = Dims::mha(2, n, 4, 8);
            let dense = Plan::new(dims, &[Pattern::new(n, 1)], Options::default()).unwrap();
            let (df, db) = stats(world, layout, &dense);
            // Dense: every rank's whole K and V travel W-1 hops (f32).
            let block = (2 * 2 * (n / world) * 4 * 8 * 4) as u64;
            for s in &df {
                assert_eq!(s.bytes_sent, block * (world as u64 - 1), "{s:?}");
            }
            for r in [2usize, 4] {
                let plan = Plan::new(dims, &[Pattern::new(n, r)], Options::default()).unwrap();
                let (sf, sb) = stats(world, layout, &plan);
                assert_eq!(
                    total(&df),
                    r as u64 * total(&sf),
                    "forward bytes, r = {r}, W = {world}, {layout:?}"
                );
                assert_eq!(
                    total(&db),
                    r as u64 * total(&sb),
                    "backward bytes, r = {r}, W = {world}, {layout:?}"
                );
                for (a, b) in df.iter().zip(&sf) {
                    assert_eq!(a.bytes_sent, r as u64 * b.bytes_sent);
                }
            }
        }
    }
}

/// A communicator that records who sends to whom, around a real one.
struct Recording<'a, C> {
    inner: &'a C,
    sends: RefCell<Vec<(usize, usize)>>,
}

impl<C: RingComm> RingComm for Recording<'_, C> {
    type Ticket = C::Ticket;
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn config(&self) -> CommConfig {
        self.inner.config()
    }
    fn post<T: Element>(
        &self,
        tag: Tag,
        to: Option<usize>,
        send: Option<&Packet<T>>,
        from: Option<usize>,
    ) -> Result<Self::Ticket, CommFault> {
        if let Some(to) = to {
            self.sends.borrow_mut().push((self.rank(), to));
        }
        self.inner.post(tag, to, send, from)
    }
    fn wait<T: Element>(&self, t: Self::Ticket) -> Result<Option<Packet<T>>, CommFault> {
        self.inner.wait(t)
    }
    fn all_reduce_max(&self, tag: Tag, x: f64) -> Result<f64, CommFault> {
        self.inner.all_reduce_max(tag, x)
    }
    fn abort(&self, step: usize, msg: &str) {
        self.inner.abort(step, msg)
    }
}

/// Every send of a forward + backward, recorded: `(from, to)` per rank.
fn recorded_sends(
    world: usize,
    layout: Layout,
    plan: &Plan,
) -> Vec<(Vec<(usize, usize)>, RingStats)> {
    let (q, k, v, go) = inputs(plan, 9);
    let dm = *plan.dims();
    let (b, hd, kd) = (dm.batch, dm.heads * dm.head_dim, dm.kv_heads * dm.head_dim);
    let qs = layout.split(&q, b, hd, world).unwrap();
    let ks = layout.split(&k, b, kd, world).unwrap();
    let vs = layout.split(&v, b, kd, world).unwrap();
    let gs = layout.split(&go, b, hd, world).unwrap();
    let res = loopback::run(world, CommConfig::default(), |c| {
        let rec = Recording {
            inner: &c,
            sends: RefCell::new(Vec::new()),
        };
        let r = c.rank();
        let f = ring::try_forward(&rec, plan, layout, &qs[r], &ks[r], &vs[r], None)?;
        let (_, sb) = ring::try_backward(
            &rec, plan, layout, &qs[r], &ks[r], &vs[r], None, &f.out, &f.lse, &gs[r],
        )?;
        Ok((rec.sends.into_inner(), f.stats, sb))
    })
    .unwrap();
    res.into_iter()
        .map(|r| {
            let (sends, sf, _) = r.unwrap();
            (sends, sf)
        })
        .collect()
}

#[test]
fn blocks_move_only_among_the_ranks_of_a_segment() {
    // Aligned: W = 8, n = 8, contiguous: segments of 16 pair ranks (0,1), (2,3), ...;
    // segments of 32 group them by four; one forward step per extra member.
    let world = 8;
    for (w, group) in [(16usize, 2usize), (32, 4)] {
        let plan = Plan::new(
            Dims::mha(1, 64, 2, 4),
            &[Pattern::new(w, 1)],
            Options::default(),
        )
        .unwrap();
        for (sends, st) in recorded_sends(world, Layout::Contiguous, &plan) {
            assert_eq!(st.steps, group - 1, "{st:?}");
            for (from, to) in sends {
                assert_eq!(from / group, to / group, "segment {w}: {from} -> {to}");
            }
        }
    }
    // Unaligned and zigzag: every send goes to a rank that shares a segment with the
    // sender (a chain of overlapping segments is not one big ring).
    for (world, layout, n, w) in [
        (4, Layout::Contiguous, 12, 4),
        (4, Layout::Contiguous, 12, 2),
        (5, Layout::Contiguous, 15, 5),
        (4, Layout::Zigzag, 16, 4),
        (3, Layout::Zigzag, 24, 8),
        (4, Layout::Zigzag, 32, 16),
    ] {
        let plan = Plan::new(
            Dims::mha(1, n, 2, 4),
            &[Pattern::new(w, 1)],
            Options::default().causal(true),
        )
        .unwrap();
        let geo = ring::Geometry::new(layout, world, n / world).unwrap();
        let owners: Vec<Vec<usize>> = (0..n / w)
            .map(|s| {
                let mut o: Vec<usize> = (0..world)
                    .filter(|&r| geo.positions(r).iter().any(|p| p / w == s))
                    .collect();
                o.dedup();
                o
            })
            .collect();
        let share = |a: usize, b: usize| owners.iter().any(|o| o.contains(&a) && o.contains(&b));
        for (sends, _) in recorded_sends(world, layout, &plan) {
            for (from, to) in sends {
                assert!(
                    share(from, to),
                    "W={world} {layout:?} N={n} w={w}: {from} -> {to}"
                );
            }
        }
    }
}

#[test]
fn remote_blocks_held_are_bounded_by_a_constant() {
    for world in [2usize, 3, 5, 8] {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let n = 16 * world;
            let plan = Plan::new(
                Dims {
                    batch: 1,
                    seq: n,
                    heads: 4,
                    kv_heads: 2,
                    head_dim: 8,
                },
                &[Pattern::new(n / 2, 1), Pattern::new(n, 2)],
                Options::default().causal(true),
            )
            .unwrap();
            let (sf, sb) = stats(world, layout, &plan);
            // One block of a rank: K and V of all its rows, f32.
            let block = (2 * (n / world) * 2 * 8 * 4) as u64;
            for s in &sf {
                assert!(s.max_remote_blocks <= 2, "forward {s:?}");
                assert!(s.peak_remote_bytes <= 2 * block, "forward {s:?}");
            }
            for s in &sb {
                // K/V block + the next one in flight + dK/dV accumulator in and out.
                assert!(s.max_remote_blocks <= 4, "backward {s:?}");
                assert!(s.peak_remote_bytes <= 4 * block, "backward {s:?}");
            }
        }
    }
}

#[test]
fn causal_blocks_nobody_sees_are_skipped() {
    let plan = Plan::new(
        Dims::mha(1, 256, 2, 8),
        &[Pattern::new(256, 1)],
        Options::default().causal(true),
    )
    .unwrap();
    let (sf, _) = stats(4, Layout::Contiguous, &plan);
    // Rank 0 holds the first positions: every remote key is in its future.
    assert!(sf[0].blocks_skipped > 0);
    let plan_nc = Plan::new(
        Dims::mha(1, 256, 2, 8),
        &[Pattern::new(256, 1)],
        Options::default(),
    )
    .unwrap();
    let (snc, _) = stats(4, Layout::Contiguous, &plan_nc);
    assert!(sf[0].blocks_computed < snc[0].blocks_computed);
    assert!(sf[3].blocks_computed > sf[0].blocks_computed);
    assert!(sf.iter().all(|s| s.compute.as_nanos() > 0));
}

#[test]
fn zigzag_balances_causal_work() {
    let plan = Plan::new(
        Dims::mha(1, 1024, 1, 8),
        &[Pattern::new(1024, 1)],
        Options::default().causal(true),
    )
    .unwrap();
    let imbalance = |layout| {
        let p: Vec<u64> = (0..4)
            .map(|r| ring::attended_pairs(&plan, layout, 4, r).unwrap())
            .collect();
        assert_eq!(p.iter().sum::<u64>(), plan.attended_pairs());
        let mean = p.iter().sum::<u64>() as f64 / 4.0;
        *p.iter().max().unwrap() as f64 / mean
    };
    assert!(imbalance(Layout::Zigzag) < 1.01);
    assert!(imbalance(Layout::Contiguous) > 1.7);
}
