//! Faults (SPEC §3): one rank panics, vanishes or stalls at a chosen step; every other
//! rank returns `Err` naming the rank and its step within the timeout — no hang, no
//! zero-filled output — and the inputs are unchanged. Transient faults are retried.
//! Every test is bounded in time by a watchdog.

mod common;

use std::cell::{Cell, RefCell};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use dilated_attention::prelude::*;
use dilated_attention::ring::{
    self, loopback, CommConfig, CommFault, Layout, Packet, RingComm, RingStats, Tag,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// `panic!` inside the exchange.
    Panic,
    /// Drop the communicator (as a rank that returned early would) and stop.
    Vanish,
    /// Stop answering for this long, then carry on.
    Stall(Duration),
    /// Fail this many times with a transient fault, then work.
    Transient(u32),
}

/// A real communicator with one fault injected at exchange number `at`.
struct Faulty<C> {
    inner: RefCell<Option<C>>,
    rank: usize,
    world: usize,
    cfg: CommConfig,
    fault: Option<(usize, Fault)>,
    posts: Cell<usize>,
    transient_left: Cell<u32>,
}

impl<C: RingComm> Faulty<C> {
    fn new(inner: C, fault: Option<(usize, Fault)>) -> Self {
        let left = match fault {
            Some((_, Fault::Transient(k))) => k,
            _ => 0,
        };
        Faulty {
            rank: inner.rank(),
            world: inner.world_size(),
            cfg: inner.config(),
            inner: RefCell::new(Some(inner)),
            fault,
            posts: Cell::new(0),
            transient_left: Cell::new(left),
        }
    }
    fn gone(&self) -> CommFault {
        CommFault::fatal(None, "this rank vanished")
    }
}

impl<C: RingComm> RingComm for Faulty<C> {
    type Ticket = C::Ticket;
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn config(&self) -> CommConfig {
        self.cfg
    }
    fn post<T: Element>(
        &self,
        tag: Tag,
        to: Option<usize>,
        send: Option<&Packet<T>>,
        from: Option<usize>,
    ) -> Result<Self::Ticket, CommFault> {
        let n = self.posts.get();
        if let Some((at, f)) = self.fault {
            if n == at {
                match f {
                    Fault::Panic => panic!("injected panic on rank {} at step {at}", self.rank),
                    Fault::Vanish => {
                        drop(self.inner.borrow_mut().take());
                        return Err(self.gone());
                    }
                    Fault::Stall(d) => std::thread::sleep(d),
                    Fault::Transient(_) => {
                        if self.transient_left.get() > 0 {
                            self.transient_left.set(self.transient_left.get() - 1);
                            return Err(CommFault::transient(to, "injected transient fault"));
                        }
                    }
                }
            }
        }
        self.posts.set(n + 1);
        match &*self.inner.borrow() {
            Some(c) => c.post(tag, to, send, from),
            None => Err(self.gone()),
        }
    }
    fn wait<T: Element>(&self, t: Self::Ticket) -> Result<Option<Packet<T>>, CommFault> {
        match &*self.inner.borrow() {
            Some(c) => c.wait(t),
            None => Err(self.gone()),
        }
    }
    fn all_reduce_max(&self, tag: Tag, x: f64) -> Result<f64, CommFault> {
        match &*self.inner.borrow() {
            Some(c) => c.all_reduce_max(tag, x),
            None => Err(self.gone()),
        }
    }
    fn abort(&self, step: usize, msg: &str) {
        if let Some(c) = &*self.inner.borrow() {
            c.abort(step, msg)
        }
    }
}

type RankResult = (Result<RingStats>, Duration);

/// Run a forward + backward ring of `world` ranks with `fault` on rank `bad`; returns
/// each rank's result and how long it took. Panics if the whole run exceeds 20 s.
/// The tests of this file run one at a time: they measure who times out first, and on a
/// 2-core machine the rank threads of five concurrent tests delay each other past the
/// 200 ms timeout (a stalled rank's neighbour could then be overtaken by a rank that
/// timed out on the neighbour, and nobody would name the stalled rank).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_with_fault(
    world: usize,
    bad: usize,
    fault: Option<(usize, Fault)>,
    cfg: CommConfig,
) -> Vec<RankResult> {
    let n = 16 * world;
    let plan = Plan::new(
        Dims {
            batch: 1,
            seq: n,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
        },
        &[Pattern::new(8, 1), Pattern::new(n, 2)],
        Options::default().causal(true),
    )
    .unwrap();
    let d = *plan.dims();
    let q = to_f32(&normal(1, d.q_len()));
    let k = to_f32(&normal(2, d.kv_len()));
    let v = to_f32(&normal(3, d.kv_len()));
    let go = to_f32(&normal(4, d.q_len()));
    let layout = Layout::Zigzag;
    let split = |x: &[f32], inner| layout.split(x, 1, inner, world).unwrap();
    let (qs, ks, vs, gs) = (split(&q, 8), split(&k, 4), split(&v, 4), split(&go, 8));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let res = loopback::run(world, cfg, |c| {
            let r = c.rank();
            let t0 = Instant::now();
            let c = Faulty::new(c, if r == bad { fault } else { None });
            let (ql, kl, vl) = (qs[r].clone(), ks[r].clone(), vs[r].clone());
            let res = (|| {
                let f = ring::try_forward(&c, &plan, layout, &ql, &kl, &vl, None)?;
                assert!(f.out.iter().all(|x| x.is_finite()));
                let (_, s) = ring::try_backward(
                    &c, &plan, layout, &ql, &kl, &vl, None, &f.out, &f.lse, &gs[r],
                )?;
                let mut st = f.stats;
                st.merge(&s);
                Ok(st)
            })();
            // Inputs unchanged, whatever happened.
            assert!(ql == qs[r] && kl == ks[r] && vl == vs[r]);
            Ok((res, t0.elapsed()))
        })
        .unwrap();
        let _ = tx.send(res);
    });
    let res = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the ring hung: no result within 20 s");
    res.into_iter()
        .enumerate()
        .map(|(r, x)| match x {
            Ok(v) => v,
            // A rank whose thread panicked (the injected panic).
            Err(e) => {
                assert_eq!(r, bad, "only the faulty rank may panic: {e}");
                (Err(e), Duration::ZERO)
            }
        })
        .collect()
}

/// Every rank but `bad` returns `Error::Comm` (its own rank, its step) within `bound`.
/// A dead rank is named in every message (the cause travels with the abort notices);
/// a stalled one at least by the rank that waited on it — its other peers may time out
/// on a neighbour that was itself waiting, and say so.
fn check_others_fail(world: usize, bad: usize, fault: Fault, at: usize, bound: Duration) {
    let cfg = CommConfig::default().timeout(Duration::from_millis(200));
    let res = run_with_fault(world, bad, Some((at, fault)), cfg);
    let mut named = 0;
    for (r, (res, took)) in res.iter().enumerate() {
        if r == bad {
            continue;
        }
        match res {
            Err(Error::Comm { rank, step, msg }) => {
                assert_eq!(*rank, r, "the error names the observing rank");
                let names_bad = msg.contains(&format!("rank {bad}"));
                named += usize::from(names_bad);
                assert!(
                    names_bad || matches!(fault, Fault::Stall(_)),
                    "W={world} {fault:?}@{at}: rank {r} step {step}: {msg}"
                );
            }
            other => panic!("W={world} {fault:?}@{at}: rank {r} returned {other:?}"),
        }
        assert!(
            *took < bound,
            "W={world} {fault:?}@{at}: rank {r} took {took:?} (bound {bound:?})"
        );
    }
    assert!(
        named >= 1,
        "W={world} {fault:?}@{at}: nobody named rank {bad}"
    );
}

#[test]
fn healthy_ring_is_ok() {
    let _serial = serial();
    for world in [2, 4] {
        let res = run_with_fault(world, 0, None, CommConfig::default());
        for (r, _) in res {
            let s = r.unwrap();
            assert!(s.steps > 0);
        }
    }
}

#[test]
fn a_panicking_rank_fails_every_other_rank() {
    let _serial = serial();
    for world in [2, 4] {
        for at in [0, 1, 2] {
            check_others_fail(world, world - 1, Fault::Panic, at, Duration::from_secs(3));
        }
    }
}

#[test]
fn a_vanishing_rank_fails_every_other_rank() {
    let _serial = serial();
    for world in [2, 4] {
        // W = 2 makes 3 exchanges per forward + backward (0, 1, 2); W = 4 makes more.
        for at in [0, 1, 2] {
            check_others_fail(world, 1, Fault::Vanish, at, Duration::from_secs(3));
        }
    }
}

#[test]
fn a_stalled_rank_times_out_every_other_rank() {
    let _serial = serial();
    for world in [2, 4] {
        for at in [0, 2] {
            // The stall lasts 6 s; the others must give up long before (timeout 200 ms;
            // the 3 s bound leaves room for a loaded 2-core CI machine).
            check_others_fail(
                world,
                0,
                Fault::Stall(Duration::from_millis(6000)),
                at,
                Duration::from_millis(3000),
            );
        }
    }
}

#[test]
fn transient_faults_are_retried() {
    let _serial = serial();
    let cfg = CommConfig::default().retries(3, Duration::from_millis(1));
    let res = run_with_fault(4, 2, Some((1, Fault::Transient(2))), cfg);
    for (r, (s, _)) in res.iter().enumerate() {
        let s = s.as_ref().unwrap();
        assert_eq!(s.retries, if r == 2 { 2 } else { 0 });
    }
    // More faults than retries: an error everywhere.
    let cfg = CommConfig::default()
        .retries(1, Duration::from_millis(1))
        .timeout(Duration::from_millis(300));
    let res = run_with_fault(4, 2, Some((1, Fault::Transient(5))), cfg);
    assert!(res.iter().all(|(r, _)| r.is_err()));
}
