//! Loopback backend: `W` ranks inside one process, one thread per rank, linked by
//! `std::sync::mpsc` channels (one per ordered pair of ranks, so messages between two
//! ranks stay in order).
//!
//! Faults map onto channel states:
//! * a rank that panics or returns drops its [`Loopback`]: its channels disconnect and a
//!   peer waiting on it gets a fatal fault at once;
//! * a rank that stops answering: the waiting peer's `recv_timeout` expires after
//!   [`CommConfig::timeout`];
//! * a rank that gives up calls [`RingComm::abort`], which reaches every peer; a waiting
//!   rank polls its other inboxes for such notices, so a fault anywhere ends every rank's
//!   call quickly.
//!
//! [`simulate_forward`] / [`simulate_backward`] split global tensors by a layout, run the
//! ring on `W` threads and gather the results: the single-device API, computed by a ring.

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use super::comm::{CommConfig, CommFault, Packet, RingComm, RingStats, Tag};
use super::driver;
use super::layout::Layout;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::dilated::{Forward, Grads};
use crate::shape::Plan;

enum Body {
    Packet(Box<dyn Any + Send>),
    Scalar(f64),
    /// `timeout`: the sender gave up because a peer was silent, not because one died.
    Abort {
        step: usize,
        msg: String,
        timeout: bool,
    },
}

struct Envelope {
    tag: u64,
    body: Body,
}

/// One rank of an in-process ring. Create all ranks with [`Loopback::ring`] and move
/// each into its own thread.
pub struct Loopback {
    rank: usize,
    world: usize,
    cfg: CommConfig,
    /// `tx[j]`: to rank `j` (`None` for self).
    tx: Vec<Option<Sender<Envelope>>>,
    /// `rx[j]`: from rank `j` (`None` for self).
    rx: Vec<Option<Receiver<Envelope>>>,
    /// Messages taken from an inbox while waiting on another one.
    stash: RefCell<Vec<VecDeque<Envelope>>>,
    /// The last fault this rank saw was a timeout.
    timed_out: std::cell::Cell<bool>,
}

impl std::fmt::Debug for Loopback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loopback")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// A posted loopback exchange.
#[derive(Debug)]
pub struct LoopTicket {
    tag: u64,
    from: Option<usize>,
}

/// How often a waiting rank looks at its other inboxes for abort notices.
const POLL: Duration = Duration::from_millis(5);

impl Loopback {
    /// `W` connected ranks.
    pub fn ring(world: usize, cfg: CommConfig) -> Result<Vec<Loopback>> {
        if world == 0 {
            return Err(Error::Ring {
                msg: "loopback world size must be >= 1".into(),
            });
        }
        let mut tx: Vec<Vec<Option<Sender<Envelope>>>> = (0..world)
            .map(|_| (0..world).map(|_| None).collect())
            .collect();
        let mut rx: Vec<Vec<Option<Receiver<Envelope>>>> = (0..world)
            .map(|_| (0..world).map(|_| None).collect())
            .collect();
        for i in 0..world {
            for j in 0..world {
                if i != j {
                    let (s, r) = channel();
                    tx[i][j] = Some(s);
                    rx[j][i] = Some(r);
                }
            }
        }
        Ok(tx
            .into_iter()
            .zip(rx)
            .enumerate()
            .map(|(rank, (tx, rx))| Loopback {
                rank,
                world,
                cfg,
                tx,
                rx,
                stash: RefCell::new((0..world).map(|_| VecDeque::new()).collect()),
                timed_out: std::cell::Cell::new(false),
            })
            .collect())
    }

    fn send(&self, to: usize, env: Envelope) -> Result<(), CommFault> {
        let Some(tx) = self.tx.get(to).and_then(Option::as_ref) else {
            return Err(CommFault::fatal(Some(to), format!("no link to rank {to}")));
        };
        tx.send(env).map_err(|_| {
            // The peer is gone; if it said why before leaving, report that.
            let why = self.abort_notice(to);
            CommFault::fatal(
                Some(to),
                match why {
                    Some(m) => m,
                    None => {
                        format!("rank {to} is gone (its end disconnected: it panicked or returned)")
                    }
                },
            )
        })
    }

    /// An abort notice left by rank `j` in our inbox, if any (other messages are stashed).
    /// A notice caused by a timeout marks this rank's own failure as timeout-caused.
    fn abort_notice(&self, j: usize) -> Option<String> {
        let rx = self.rx.get(j)?.as_ref()?;
        let mut stash = self.stash.borrow_mut();
        let mut found = stash[j].iter().find_map(|e| match &e.body {
            Body::Abort { step, msg, timeout } => Some((
                format!("rank {j} aborted at its step {step}: {msg}"),
                *timeout,
            )),
            _ => None,
        });
        while let Ok(env) = rx.try_recv() {
            if let Body::Abort { step, msg, timeout } = &env.body {
                found.get_or_insert_with(|| {
                    (
                        format!("rank {j} aborted at its step {step}: {msg}"),
                        *timeout,
                    )
                });
            }
            stash[j].push_back(env);
        }
        found.map(|(msg, timeout)| {
            self.inherit_cause(timeout);
            msg
        })
    }

    /// This rank fails because of a peer's abort notice: if the peer gave up on a timeout,
    /// so does this rank's own notice say. Otherwise a chain (rank A times out on B while B
    /// still waits on the stalled C; A's peer D fails on A's notice) would reach B as a
    /// death and end B's wait before B could name C.
    fn inherit_cause(&self, timeout: bool) {
        if timeout {
            self.timed_out.set(true);
        }
    }

    /// Abort notices waiting in any inbox other than `from`'s. A notice caused by a
    /// death ends the wait at once; one caused by a timeout does not (the sender may
    /// have been waiting on us or on a rank that was itself waiting): this rank keeps
    /// waiting on `from` until its own deadline, so the rank that waited on a stalled
    /// peer names that peer.
    fn poll_others(&self, from: usize) -> Result<(), CommFault> {
        let mut stash = self.stash.borrow_mut();
        for (j, rx) in self.rx.iter().enumerate() {
            let Some(rx) = rx else { continue };
            if j == from {
                continue;
            }
            loop {
                match rx.try_recv() {
                    Ok(Envelope {
                        body:
                            Body::Abort {
                                step,
                                msg,
                                timeout: false,
                            },
                        ..
                    }) => {
                        return Err(CommFault::fatal(
                            Some(j),
                            format!("rank {j} aborted at its step {step}: {msg}"),
                        ))
                    }
                    Ok(env) => stash[j].push_back(env),
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
                }
            }
        }
        Ok(())
    }

    /// The next envelope from `from`, within the timeout.
    fn recv(&self, from: usize) -> Result<Envelope, CommFault> {
        if let Some(env) = self.stash.borrow_mut()[from].pop_front() {
            return Ok(env);
        }
        let Some(rx) = self.rx.get(from).and_then(Option::as_ref) else {
            return Err(CommFault::fatal(
                Some(from),
                format!("no link from rank {from}"),
            ));
        };
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.timed_out.set(true);
                return Err(CommFault::fatal(
                    Some(from),
                    format!(
                        "no message from rank {from} within {:?} (stalled or dead)",
                        self.cfg.timeout
                    ),
                ));
            }
            match rx.recv_timeout(POLL.min(deadline - now)) {
                Ok(env) => return Ok(env),
                Err(RecvTimeoutError::Timeout) => self.poll_others(from)?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(CommFault::fatal(
                        Some(from),
                        format!("rank {from} disconnected (it panicked or returned early)"),
                    ))
                }
            }
        }
    }

    fn expect(&self, from: usize, tag: u64) -> Result<Body, CommFault> {
        let env = self.recv(from)?;
        if let Body::Abort { step, msg, timeout } = env.body {
            self.inherit_cause(timeout);
            return Err(CommFault::fatal(
                Some(from),
                format!("rank {from} aborted at its step {step}: {msg}"),
            ));
        }
        if env.tag != tag {
            return Err(CommFault::fatal(
                Some(from),
                format!(
                    "protocol mismatch with rank {from}: expected tag {tag:#x}, got {:#x}",
                    env.tag
                ),
            ));
        }
        Ok(env.body)
    }
}

impl RingComm for Loopback {
    type Ticket = LoopTicket;

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
    ) -> Result<LoopTicket, CommFault> {
        if let (Some(to), Some(p)) = (to, send) {
            // The copy stands for the transfer into the peer's memory; the caller keeps
            // its packet.
            self.send(
                to,
                Envelope {
                    tag: tag.code(),
                    body: Body::Packet(Box::new(p.clone())),
                },
            )?;
        }
        Ok(LoopTicket {
            tag: tag.code(),
            from,
        })
    }

    fn wait<T: Element>(&self, ticket: LoopTicket) -> Result<Option<Packet<T>>, CommFault> {
        let Some(from) = ticket.from else {
            return Ok(None);
        };
        match self.expect(from, ticket.tag)? {
            Body::Packet(b) => match b.downcast::<Packet<T>>() {
                Ok(p) => Ok(Some(*p)),
                Err(_) => Err(CommFault::fatal(
                    Some(from),
                    format!("rank {from} sent a packet of another element type"),
                )),
            },
            _ => Err(CommFault::fatal(
                Some(from),
                format!("rank {from} sent a scalar where a packet was expected"),
            )),
        }
    }

    fn all_reduce_max(&self, tag: Tag, x: f64) -> Result<f64, CommFault> {
        let code = tag.code();
        for j in 0..self.world {
            if j != self.rank {
                self.send(
                    j,
                    Envelope {
                        tag: code,
                        body: Body::Scalar(x),
                    },
                )?;
            }
        }
        let mut m = x;
        for j in 0..self.world {
            if j != self.rank {
                match self.expect(j, code)? {
                    Body::Scalar(y) => m = m.max(y),
                    _ => {
                        return Err(CommFault::fatal(
                            Some(j),
                            format!("rank {j} sent a packet where a scalar was expected"),
                        ))
                    }
                }
            }
        }
        Ok(m)
    }

    fn abort(&self, step: usize, msg: &str) {
        for j in 0..self.world {
            if j != self.rank {
                let _ = self.send(
                    j,
                    Envelope {
                        tag: u64::MAX,
                        body: Body::Abort {
                            step,
                            msg: msg.to_string(),
                            timeout: self.timed_out.get(),
                        },
                    },
                );
            }
        }
    }
}

/// Run `f` on `W` loopback ranks, one thread each; results in rank order. A rank that
/// panics yields `Err` with the panic message.
pub fn run<R, F>(world: usize, cfg: CommConfig, f: F) -> Result<Vec<Result<R>>>
where
    R: Send,
    F: Fn(Loopback) -> Result<R> + Sync,
{
    let comms = Loopback::ring(world, cfg)?;
    let f = &f;
    Ok(std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let rank = c.rank;
                (rank, s.spawn(move || f(c)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(rank, h)| match h.join() {
                Ok(r) => r,
                Err(e) => Err(Error::Comm {
                    rank,
                    step: 0,
                    msg: format!("rank {rank} panicked: {}", panic_msg(&*e)),
                }),
            })
            .collect()
    }))
}

fn panic_msg(e: &(dyn Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".into()
    }
}

/// Ring forward over `W` loopback ranks on **global** inputs: splits them by `layout`,
/// runs [`driver::try_forward`] on every rank, gathers `out` and `L`. The first rank error
/// (in rank order) is returned.
#[allow(clippy::too_many_arguments)]
pub fn simulate_forward<T: Element>(
    world: usize,
    layout: Layout,
    cfg: CommConfig,
    plan: &Plan,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
) -> Result<(Forward<T>, Vec<RingStats>)> {
    let dm = *plan.dims();
    plan.check_inputs(q.len(), k.len(), v.len(), mask.map(<[bool]>::len))?;
    let (b, hd, kd) = (dm.batch, dm.heads * dm.head_dim, dm.kv_heads * dm.head_dim);
    let qs = layout.split(q, b, hd, world)?;
    let ks = layout.split(k, b, kd, world)?;
    let vs = layout.split(v, b, kd, world)?;
    let ms = mask.map(|m| layout.split(m, b, 1, world)).transpose()?;
    let res = run(world, cfg, |c| {
        let r = c.rank;
        driver::try_forward(
            &c,
            plan,
            layout,
            &qs[r],
            &ks[r],
            &vs[r],
            ms.as_ref().map(|m| m[r].as_slice()),
        )
    })?;
    let mut outs = Vec::with_capacity(world);
    let mut lses = Vec::with_capacity(world);
    let mut stats = Vec::with_capacity(world);
    for r in res {
        let f = r?;
        outs.push(f.out);
        lses.push(f.lse);
        stats.push(f.stats);
    }
    Ok((
        Forward {
            out: layout.gather(&outs, b, hd)?,
            lse: layout.gather(&lses, b, dm.heads)?,
        },
        stats,
    ))
}

/// Ring backward over `W` loopback ranks on **global** inputs (see [`simulate_forward`]).
#[allow(clippy::too_many_arguments)]
pub fn simulate_backward<T: Element>(
    world: usize,
    layout: Layout,
    cfg: CommConfig,
    plan: &Plan,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
    out: &[T],
    lse: &[T],
    grad_out: &[T],
) -> Result<(Grads<T>, Vec<RingStats>)> {
    let dm = *plan.dims();
    plan.check_inputs(q.len(), k.len(), v.len(), mask.map(<[bool]>::len))?;
    crate::shape::check_len("out", dm.q_len(), out.len())?;
    crate::shape::check_len("lse", dm.lse_len(), lse.len())?;
    crate::shape::check_len("grad_out", dm.q_len(), grad_out.len())?;
    let (b, hd, kd) = (dm.batch, dm.heads * dm.head_dim, dm.kv_heads * dm.head_dim);
    let qs = layout.split(q, b, hd, world)?;
    let ks = layout.split(k, b, kd, world)?;
    let vs = layout.split(v, b, kd, world)?;
    let os = layout.split(out, b, hd, world)?;
    let ls = layout.split(lse, b, dm.heads, world)?;
    let gs = layout.split(grad_out, b, hd, world)?;
    let ms = mask.map(|m| layout.split(m, b, 1, world)).transpose()?;
    let res = run(world, cfg, |c| {
        let r = c.rank;
        driver::try_backward(
            &c,
            plan,
            layout,
            &qs[r],
            &ks[r],
            &vs[r],
            ms.as_ref().map(|m| m[r].as_slice()),
            &os[r],
            &ls[r],
            &gs[r],
        )
    })?;
    let (mut dq, mut dk, mut dv, mut stats) = (vec![], vec![], vec![], vec![]);
    for r in res {
        let (g, s) = r?;
        dq.push(g.dq);
        dk.push(g.dk);
        dv.push(g.dv);
        stats.push(s);
    }
    Ok((
        Grads {
            dq: layout.gather(&dq, b, hd)?,
            dk: layout.gather(&dk, b, kd)?,
            dv: layout.gather(&dv, b, kd)?,
        },
        stats,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank 0 is silent; rank 1 waits on it. Rank 2 gives up on a timeout of its own (as it
    /// would after waiting on rank 1) and aborts; rank 3 fails on rank 2's notice and
    /// aborts in turn. Rank 3's notice must still read as timeout-caused, so that rank 1
    /// keeps waiting and names rank 0, the rank that actually stalled — not rank 3.
    #[test]
    fn a_chain_of_timeout_aborts_does_not_hide_the_stalled_rank() {
        let cfg = CommConfig::default().timeout(Duration::from_millis(300));
        let mut ranks = Loopback::ring(4, cfg).unwrap().into_iter();
        let (r0, r1, r2, r3) = (
            ranks.next().unwrap(),
            ranks.next().unwrap(),
            ranks.next().unwrap(),
            ranks.next().unwrap(),
        );
        let waiter = std::thread::spawn(move || {
            let got = r1.expect(0, 7).err().expect("rank 0 never sends");
            (got.peer, got.msg)
        });
        r2.timed_out.set(true);
        r2.abort(1, "no message from rank 1 within 300ms (stalled or dead)");
        let cause = r3.expect(2, 7).err().expect("rank 2's abort notice");
        assert_eq!(cause.peer, Some(2));
        r3.abort(1, &cause.msg);
        let (peer, msg) = waiter.join().unwrap();
        assert_eq!(peer, Some(0), "rank 1 blamed {peer:?}: {msg}");
        assert!(msg.contains("no message from rank 0"), "{msg}");
        drop(r0);
    }
}
