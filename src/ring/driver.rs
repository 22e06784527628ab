//! The ring driver: forward and backward of dilated attention over a [`RingComm`].
//!
//! Per pattern `i = (w, r)`:
//!
//! 1. **Runs.** Every rank describes its rows as *runs*: for one head (query side) or
//!    one (kv head, offset) pair (key side), one segment and one local chunk, the rows
//!    that take part form an arithmetic progression of global positions — a kernel
//!    [`Prog`]. Runs are a pure function of `(plan, layout, rank)`, so a receiver
//!    recomputes the sender's run table instead of receiving it.
//! 2. **Groups.** The ranks holding positions of one segment are its owners; each distinct
//!    owner set of more than one rank is an exchange group (a sub-ring), visited by all
//!    members in the same global order (by its first segment). A pattern whose segments
//!    each lie in one rank has no group and exchanges nothing.
//! 3. **Exported block.** For a group, a rank packs only its key runs of the group's
//!    segments: `(row, kv head)` entries of `K`, then `V`, plus mask bits. That is the
//!    dilated `1/r` of the rows, never a full K/V, and it goes only to the segment's ranks.
//! 4. **Rotation.** The block of member `j` visits every other member in `k-1` steps.
//!    The next exchange is posted before the current block is computed (double
//!    buffering). Each (query run, key run) pair of the same (kv head, offset, segment) is
//!    computed by the CPU kernel routines and merged into `(out, L)` with the log-sum-exp
//!    rule; causal pairs with no visible key are skipped.
//! 5. **Backward.** `dQ` accumulates locally. The `dK`/`dV` of a visiting block are
//!    computed into a fresh accumulator, the accumulator that arrived from the previous
//!    member for the same block is added, and the sum moves on; after `k-1` steps the
//!    last hop brings it home, where it is scattered into the local `dK`/`dV`.

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;

use super::comm::{CommFault, Packet, RingComm, RingStats, Tag};
use super::layout::{Geometry, Layout};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::dilated::cpu_kernel::{
    bwd_kv_tile, bwd_q_tile, delta_full, fwd_tile, BwdCtx, FwdCtx, Prog, Scratch, View, ViewMut,
    BK, BQ,
};
use crate::ops::dilated::Grads;
use crate::shape::{check_len, Combine, Plan};

/// Message kinds (see [`Tag`]).
const KIND_KV: u8 = 0;
const KIND_ACC: u8 = 1;
const KIND_HEALTH: u8 = 2;
const KIND_DETACH: u8 = 3;

/// Output of a ring forward on one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct RingForward<T> {
    /// Local output rows `(batch, n, heads, dim)`.
    pub out: Vec<T>,
    /// Local `L` `(batch, n, heads)`.
    pub lse: Vec<T>,
    /// What this call moved and how long it waited.
    pub stats: RingStats,
}

/// One arithmetic progression of rows: a head (query side) or kv head (key side), its
/// offset, its segment and the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub head: usize,
    pub o: usize,
    pub seg: usize,
    pub prog: Prog,
}

/// The ranks holding positions of segment `s` (length `w`), sorted.
pub(crate) fn seg_owners(geo: &Geometry, w: usize, s: usize) -> Vec<usize> {
    let cl = geo.chunk_len();
    let a = s * w;
    let mut o: Vec<usize> = (a / cl..=(a + w - 1) / cl).map(|c| geo.owner(c)).collect();
    o.sort_unstable();
    o.dedup();
    o
}

/// The exchange groups of `rank` for segments of length `w`: one per distinct set of
/// ranks that share a segment with it (the segment's owners), as `(key, owners)`, in
/// increasing `key` = the first segment with that owner set. The key is the same on
/// every member, so members meet their common groups in the same order.
/// The per-pattern work of one rank, see `Ring::pattern_work`.
struct PatternWork {
    /// `(kv head, offset)` pairs whose rows take part.
    kh: Vec<(usize, usize)>,
    /// Local query runs.
    qruns: Vec<Run>,
    /// Local key runs.
    local: Vec<Run>,
    /// `(group key, member ranks)` of the exchange groups this rank is in.
    groups: Vec<(usize, Vec<usize>)>,
}

pub(crate) fn groups(geo: &Geometry, w: usize, rank: usize) -> Vec<(usize, Vec<usize>)> {
    let cl = geo.chunk_len();
    let mut found: Vec<(usize, Vec<usize>)> = Vec::new();
    for (c, _) in geo.chunks_of(rank) {
        let (p0, p1) = (c * cl, (c + 1) * cl);
        // Only the first and the last segment touching a chunk can cross its edges.
        for s in [p0 / w, (p1 - 1) / w] {
            let o = seg_owners(geo, w, s);
            if o.len() < 2 {
                continue;
            }
            match found.iter_mut().find(|(_, os)| *os == o) {
                Some(e) => e.0 = e.0.min(s),
                None => found.push((s, o)),
            }
        }
    }
    found.sort();
    found
}

/// Runs of `rank` for pattern `i` and the given `(head, offset)` pairs; with
/// `only = Some(owners)` only runs of segments held by exactly those ranks (what a rank
/// exports to that group).
pub(crate) fn runs(
    plan: &Plan,
    geo: &Geometry,
    i: usize,
    rank: usize,
    heads: &[(usize, usize)],
    only: Option<&[usize]>,
) -> Vec<Run> {
    let pat = plan.patterns()[i];
    let (w, r) = (pat.segment, pat.dilation);
    let cl = geo.chunk_len();
    let mut out = Vec::new();
    for &(head, o) in heads {
        for (c, row0) in geo.chunks_of(rank) {
            let (p0, p1) = (c * cl, (c + 1) * cl);
            let mut s = p0 / w;
            while s * w < p1 {
                let a = s * w;
                if only.is_none_or(|g| seg_owners(geo, w, s) == g) {
                    let (lo, hi) = (a.max(p0), (a + w).min(p1));
                    let first = a + o;
                    let pos0 = if lo <= first {
                        first
                    } else {
                        first + (lo - first).div_ceil(r) * r
                    };
                    if pos0 < hi {
                        out.push(Run {
                            head,
                            o,
                            seg: s,
                            prog: Prog {
                                row0: row0 + (pos0 - p0),
                                row_step: r,
                                pos0,
                                pos_step: r,
                                count: (hi - 1 - pos0) / r + 1,
                            },
                        });
                    }
                }
                s += 1;
            }
        }
    }
    out
}

/// `(h, offset)` of every query head taking part in pattern `i`.
fn query_heads(plan: &Plan, i: usize) -> Vec<(usize, usize)> {
    (0..plan.dims().heads)
        .filter_map(|h| plan.offset(i, h).map(|o| (h, o)))
        .collect()
}

/// `(g, offset)`: the distinct offsets the query heads of kv head `g` use.
fn key_heads(plan: &Plan, i: usize) -> Vec<(usize, usize)> {
    let dm = plan.dims();
    let grp = dm.group();
    let mut out = Vec::new();
    for g in 0..dm.kv_heads {
        let mut os: Vec<usize> = (g * grp..(g + 1) * grp)
            .filter_map(|h| plan.offset(i, h))
            .collect();
        os.sort_unstable();
        os.dedup();
        out.extend(os.into_iter().map(|o| (g, o)));
    }
    out
}

/// The same runs re-addressed into a packed block: entries in run order, one row each.
fn packed(runs: &[Run]) -> (Vec<Run>, usize) {
    let mut e = 0;
    let out = runs
        .iter()
        .map(|r| {
            let p = Run {
                prog: Prog {
                    row0: e,
                    row_step: 1,
                    ..r.prog
                },
                ..*r
            };
            e += r.prog.count;
            p
        })
        .collect();
    (out, e)
}

/// Local tensors of one rank: `q` `(B, n, H, D)`, `k`/`v` `(B, n, Hkv, D)`, mask `(B, n)`.
struct Local<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    mask: Option<&'a [bool]>,
}

/// One block of keys: either the rank's own rows or a received packet.
struct Block<'a, T> {
    k: View<'a, T>,
    v: View<'a, T>,
    mask: Option<&'a [bool]>,
    runs: Vec<Run>,
    /// Packed blocks store one kv head per entry: kernel head index 0.
    packed: bool,
}

impl<T> Block<'_, T> {
    fn kv_head(&self, g: usize) -> usize {
        if self.packed {
            0
        } else {
            g
        }
    }
}

/// Pack the exported key runs: `K (B, R, D)`, then `V (B, R, D)`; mask bits `(B, R)`.
fn pack<T: Element>(
    runs: &[Run],
    entries: usize,
    loc: &Local<'_, T>,
    plan: &Plan,
    n: usize,
) -> Packet<T> {
    let dm = plan.dims();
    let (b, hkv, d) = (dm.batch, dm.kv_heads, dm.head_dim);
    let mut data = Vec::with_capacity(2 * b * entries * d);
    for src in [loc.k, loc.v] {
        for bb in 0..b {
            for r in runs {
                for j in 0..r.prog.count {
                    let at = ((bb * n + r.prog.row(j)) * hkv + r.head) * d;
                    data.extend_from_slice(&src[at..at + d]);
                }
            }
        }
    }
    let bits = match loc.mask {
        None => Vec::new(),
        Some(m) => {
            let mut bits = Vec::with_capacity(b * entries);
            for bb in 0..b {
                for r in runs {
                    bits.extend((0..r.prog.count).map(|j| m[bb * n + r.prog.row(j)]));
                }
            }
            bits
        }
    };
    Packet { data, bits }
}

/// The chunk geometry of a ring call: checks the communicator's `(world, rank)` and that
/// the plan's global length splits into `world` equal parts.
pub(crate) fn ring_geometry(
    plan: &Plan,
    layout: Layout,
    world: usize,
    rank: usize,
) -> Result<Geometry> {
    if world == 0 || rank >= world {
        return Err(Error::Ring {
            msg: format!("communicator reports rank {rank} of world size {world}"),
        });
    }
    let n_glob = plan.dims().seq;
    if !n_glob.is_multiple_of(world) {
        return Err(Error::Ring {
            msg: format!("global length {n_glob} is not a multiple of the world size {world}"),
        });
    }
    Geometry::new(layout, world, n_glob / world)
}

/// A communication fault as the `Error` of rank `rank` at exchange `step`, while at
/// `(pattern, ring step)`.
pub(crate) fn comm_error(rank: usize, step: usize, at: (usize, usize), f: CommFault) -> Error {
    Error::Comm {
        rank,
        step,
        msg: format!("pattern {}, ring step {}: {f}", at.0, at.1),
    }
}

/// Per-call state of one rank.
struct Ring<'a, C: RingComm> {
    comm: &'a C,
    plan: &'a Plan,
    geo: Geometry,
    rank: usize,
    stats: RingStats,
    /// Exchanges posted so far (the `step` of errors).
    step: usize,
    /// Where we are, for error messages.
    at: (usize, usize),
    held: usize,
    held_bytes: u64,
}

impl<'a, C: RingComm> Ring<'a, C> {
    fn new(comm: &'a C, plan: &'a Plan, layout: Layout) -> Result<Self> {
        let (world, rank) = (comm.world_size(), comm.rank());
        let geo = ring_geometry(plan, layout, world, rank)?;
        Ok(Ring {
            comm,
            plan,
            geo,
            rank,
            stats: RingStats::new(rank, world),
            step: 0,
            at: (0, 0),
            held: 0,
            held_bytes: 0,
        })
    }

    fn err(&self, f: CommFault) -> Error {
        comm_error(self.rank, self.step, self.at, f)
    }

    fn post<T: Element>(
        &mut self,
        tag: Tag,
        to: usize,
        send: &Packet<T>,
        from: usize,
    ) -> Result<C::Ticket> {
        self.at = (tag.pattern as usize, tag.step as usize);
        let cfg = self.comm.config();
        let mut tries = 0;
        let t = loop {
            match self.comm.post(tag, Some(to), Some(send), Some(from)) {
                Ok(t) => break t,
                Err(f) if f.transient && tries < cfg.retries => {
                    tries += 1;
                    self.stats.retries += 1;
                    std::thread::sleep(cfg.retry_delay);
                }
                Err(f) => return Err(self.err(f)),
            }
        };
        self.step += 1;
        self.stats.steps += 1;
        self.stats.bytes_sent += send.bytes();
        self.held += 1;
        self.stats.max_remote_blocks = self.stats.max_remote_blocks.max(self.held);
        Ok(t)
    }

    fn wait<T: Element>(&mut self, t: C::Ticket) -> Result<Packet<T>> {
        let t0 = Instant::now();
        let r = self.comm.wait::<T>(t);
        self.stats.wait += t0.elapsed();
        let p = match r {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(self.err(CommFault::fatal(None, "the exchange returned no packet")))
            }
            Err(f) => return Err(self.err(f)),
        };
        self.stats.bytes_recv += p.bytes();
        self.held_bytes += p.bytes();
        self.stats.peak_remote_bytes = self.stats.peak_remote_bytes.max(self.held_bytes);
        Ok(p)
    }

    fn release<T>(&mut self, p: Packet<T>) {
        self.held -= 1;
        self.held_bytes -= p.bytes();
    }

    fn bad_block(&self, origin: usize, what: &str) -> Error {
        self.err(CommFault::fatal(
            Some(origin),
            format!("block from rank {origin} has the wrong size ({what})"),
        ))
    }

    /// Check a received K/V packet against the run table of its origin.
    fn check_kv<T>(&self, p: &Packet<T>, entries: usize, origin: usize) -> Result<()> {
        let dm = self.plan.dims();
        if p.data.len() != 2 * dm.batch * entries * dm.head_dim {
            return Err(self.bad_block(origin, "data"));
        }
        if !p.bits.is_empty() && p.bits.len() != dm.batch * entries {
            return Err(self.bad_block(origin, "mask bits"));
        }
        Ok(())
    }

    fn health(&mut self) -> Result<()> {
        let tag = Tag {
            pattern: u32::MAX,
            group: 0,
            step: 0,
            kind: KIND_HEALTH,
        };
        self.at = (usize::MAX, 0);
        let t0 = Instant::now();
        let r = self.comm.all_reduce_max(tag, 0.0);
        self.stats.wait += t0.elapsed();
        r.map(|_| ()).map_err(|f| self.err(f))
    }

    fn block_view<'p, T>(&self, p: &'p Packet<T>, runs: Vec<Run>, entries: usize) -> Block<'p, T> {
        let dm = self.plan.dims();
        let half = dm.batch * entries * dm.head_dim;
        let view = |data: &'p [T]| View {
            data,
            rows: entries,
            heads: 1,
            d: dm.head_dim,
        };
        Block {
            k: view(&p.data[..half]),
            v: view(&p.data[half..]),
            mask: (!p.bits.is_empty()).then_some(&p.bits[..]),
            runs,
            packed: true,
        }
    }

    fn local_block<'l, T>(&self, loc: &Local<'l, T>, runs: Vec<Run>) -> Block<'l, T> {
        let dm = self.plan.dims();
        let view = |data: &'l [T]| View {
            data,
            rows: self.geo.local,
            heads: dm.kv_heads,
            d: dm.head_dim,
        };
        Block {
            k: view(loc.k),
            v: view(loc.v),
            mask: loc.mask,
            runs,
            packed: false,
        }
    }

    /// What pattern `i` asks of this rank (shared by forward and backward): its kv heads
    /// with their offsets, the local query runs, the local key runs and the exchange
    /// groups it belongs to. `None` if no head takes part in the pattern.
    fn pattern_work(&self, i: usize) -> Option<PatternWork> {
        let (plan, geo) = (self.plan, self.geo);
        let qh = query_heads(plan, i);
        if qh.is_empty() {
            return None;
        }
        let kh = key_heads(plan, i);
        Some(PatternWork {
            qruns: runs(plan, &geo, i, self.rank, &qh, None),
            local: runs(plan, &geo, i, self.rank, &kh, None),
            groups: groups(&geo, plan.patterns()[i].segment, self.rank),
            kh,
        })
    }

    /// Forward of pattern `i`, merged into `out`/`lse` with factor `fac`.
    #[allow(clippy::too_many_arguments)]
    fn fwd_pattern<T: Element>(
        &mut self,
        i: usize,
        loc: &Local<'_, T>,
        out: &mut [T],
        lse: &mut [T],
        fac: T,
        kind: u8,
    ) -> Result<()> {
        let Some(PatternWork {
            kh,
            qruns,
            local,
            groups,
        }) = self.pattern_work(i)
        else {
            return Ok(());
        };
        let mut local = Some(local);
        for (key, members) in groups {
            let g = Group {
                i,
                key,
                members: &members,
                kind,
            };
            self.fwd_rotate(&g, loc, &qruns, &kh, &mut local, out, lse, fac)?;
        }
        if let Some(own) = local.take() {
            self.fwd_local(loc, &qruns, own, out, lse, fac);
        }
        Ok(())
    }

    /// Local queries against local keys.
    fn fwd_local<T: Element>(
        &mut self,
        loc: &Local<'_, T>,
        qruns: &[Run],
        own: Vec<Run>,
        out: &mut [T],
        lse: &mut [T],
        fac: T,
    ) {
        let t0 = Instant::now();
        let own = self.local_block(loc, own);
        self.fwd_block(loc, qruns, &own, out, lse, fac);
        self.stats.compute += t0.elapsed();
    }

    /// Rotate the blocks of one group around its members; the local block is computed
    /// (once, if still pending) while the first exchange is in flight.
    #[allow(clippy::too_many_arguments)]
    fn fwd_rotate<T: Element>(
        &mut self,
        g: &Group<'_>,
        loc: &Local<'_, T>,
        qruns: &[Run],
        kh: &[(usize, usize)],
        local: &mut Option<Vec<Run>>,
        out: &mut [T],
        lse: &mut [T],
        fac: T,
    ) -> Result<()> {
        let (plan, geo) = (self.plan, self.geo);
        let (k, idx, next, prev) = g.ring(self.rank);
        let exported = runs(plan, &geo, g.i, self.rank, kh, Some(g.members));
        let (_, entries) = packed(&exported);
        let pkt = pack(&exported, entries, loc, plan, geo.local);
        let mut pending = Some(self.post(g.tag(1, g.kind), next, &pkt, prev)?);
        drop(pkt);
        if let Some(own) = local.take() {
            self.fwd_local(loc, qruns, own, out, lse, fac);
        }
        for t in 1..k {
            let origin = g.members[(idx + k - t) % k];
            let Some(tk) = pending.take() else { break };
            let pkt: Packet<T> = self.wait(tk)?;
            if t + 1 < k {
                pending = Some(self.post(g.tag(t + 1, g.kind), next, &pkt, prev)?);
            }
            let t0 = Instant::now();
            let (oruns, entries) = packed(&runs(plan, &geo, g.i, origin, kh, Some(g.members)));
            self.check_kv(&pkt, entries, origin)?;
            let blk = self.block_view(&pkt, oruns, entries);
            self.fwd_block(loc, qruns, &blk, out, lse, fac);
            self.stats.compute += t0.elapsed();
            self.release(pkt);
        }
        Ok(())
    }

    /// One block against all local query runs (parallel over query tiles).
    fn fwd_block<T: Element>(
        &mut self,
        loc: &Local<'_, T>,
        qruns: &[Run],
        blk: &Block<'_, T>,
        out: &mut [T],
        lse: &mut [T],
        fac: T,
    ) {
        let dm = *self.plan.dims();
        let (n, d, grp) = (self.geo.local, dm.head_dim, dm.group());
        let causal = self.plan.options().causal;
        let mut kmap: HashMap<(usize, usize, usize), Vec<usize>> = HashMap::new();
        for (j, r) in blk.runs.iter().enumerate() {
            kmap.entry((r.head, r.o, r.seg)).or_default().push(j);
        }
        let mut items = Vec::new();
        for (qi, qr) in qruns.iter().enumerate() {
            let Some(ks) = kmap.get(&(qr.head / grp, qr.o, qr.seg)) else {
                continue;
            };
            let mut q0 = 0;
            while q0 < qr.prog.count {
                let last = qr.prog.pos((q0 + BQ).min(qr.prog.count) - 1);
                let seen = ks
                    .iter()
                    .filter(|&&j| !causal || blk.runs[j].prog.pos0 <= last)
                    .count() as u64;
                self.stats.blocks_computed += seen;
                self.stats.blocks_skipped += ks.len() as u64 - seen;
                if seen > 0 {
                    for b in 0..dm.batch {
                        items.push((qi, q0, b));
                    }
                }
                q0 += BQ;
            }
        }
        let cx = FwdCtx {
            q: View {
                data: loc.q,
                rows: n,
                heads: dm.heads,
                d,
            },
            k: blk.k,
            v: blk.v,
            kmask: blk.mask,
            causal,
            scale: T::of(self.plan.scale()),
            out: ViewMut::new(out, n, dm.heads, d),
            lse: ViewMut::new(lse, n, dm.heads, 1),
        };
        items.into_par_iter().for_each_init(
            || Scratch::new(d),
            |sc, (qi, q0, b)| {
                let qr = qruns[qi];
                let qp = qr.prog.sub(q0, BQ.min(qr.prog.count - q0));
                let last = qp.pos(qp.count - 1);
                let g = qr.head / grp;
                for &j in &kmap[&(g, qr.o, qr.seg)] {
                    let kr = blk.runs[j];
                    if causal && kr.prog.pos0 > last {
                        continue;
                    }
                    // SAFETY: the item (qrun, tile, batch) is the only one writing the
                    // rows of this query tile for head `qr.head` in batch `b`: query runs
                    // of distinct (head, segment, chunk) are disjoint and tiles of a run
                    // are disjoint.
                    unsafe { fwd_tile(sc, &cx, b, qr.head, blk.kv_head(g), qp, kr.prog, fac) };
                }
            },
        );
    }

    /// Backward of pattern `i`: `dq`, `dk`, `dv` accumulate.
    #[allow(clippy::too_many_arguments)]
    fn bwd_pattern<T: Element>(
        &mut self,
        i: usize,
        loc: &Local<'_, T>,
        side: &BwdSide<'_, T>,
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
    ) -> Result<()> {
        let Some(PatternWork {
            kh,
            qruns,
            local,
            groups,
        }) = self.pattern_work(i)
        else {
            return Ok(());
        };
        let mut local = Some(local);
        for (key, members) in groups {
            let g = Group {
                i,
                key,
                members: &members,
                kind: KIND_KV,
            };
            self.bwd_rotate(&g, loc, side, &qruns, &kh, &mut local, dq, dk, dv)?;
        }
        if let Some(own) = local.take() {
            self.bwd_local(loc, side, &qruns, own, dq, dk, dv);
        }
        Ok(())
    }

    /// Local queries against local keys: `dq`, `dk`, `dv` accumulate.
    #[allow(clippy::too_many_arguments)]
    fn bwd_local<T: Element>(
        &mut self,
        loc: &Local<'_, T>,
        side: &BwdSide<'_, T>,
        qruns: &[Run],
        own: Vec<Run>,
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
    ) {
        let dm = *self.plan.dims();
        let n = self.geo.local;
        let t0 = Instant::now();
        let own = self.local_block(loc, own);
        let dkv = ViewMut::new(dk, n, dm.kv_heads, dm.head_dim);
        let dvv = ViewMut::new(dv, n, dm.kv_heads, dm.head_dim);
        self.bwd_block(loc, side, qruns, &own, dq, &dkv, &dvv);
        self.stats.compute += t0.elapsed();
    }

    /// Backward rotation of one group: K/V blocks travel `k-1` hops; their `dK`/`dV`
    /// accumulators follow and take one more hop home.
    #[allow(clippy::too_many_arguments)]
    fn bwd_rotate<T: Element>(
        &mut self,
        g: &Group<'_>,
        loc: &Local<'_, T>,
        side: &BwdSide<'_, T>,
        qruns: &[Run],
        kh: &[(usize, usize)],
        local: &mut Option<Vec<Run>>,
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
    ) -> Result<()> {
        let (plan, geo) = (self.plan, self.geo);
        let dm = *plan.dims();
        let n = geo.local;
        let (k, idx, next, prev) = g.ring(self.rank);
        let exported = runs(plan, &geo, g.i, self.rank, kh, Some(g.members));
        let (_, own_entries) = packed(&exported);
        let pkt = pack(&exported, own_entries, loc, plan, n);
        let mut pending_kv = Some(self.post(g.tag(1, KIND_KV), next, &pkt, prev)?);
        drop(pkt);
        if let Some(own) = local.take() {
            self.bwd_local(loc, side, qruns, own, dq, dk, dv);
        }
        let mut pending_acc = None;
        for t in 1..k {
            let origin = g.members[(idx + k - t) % k];
            let Some(tk) = pending_kv.take() else { break };
            let pkt: Packet<T> = self.wait(tk)?;
            if t + 1 < k {
                pending_kv = Some(self.post(g.tag(t + 1, KIND_KV), next, &pkt, prev)?);
            }
            let t0 = Instant::now();
            let (oruns, entries) = packed(&runs(plan, &geo, g.i, origin, kh, Some(g.members)));
            self.check_kv(&pkt, entries, origin)?;
            let half = dm.batch * entries * dm.head_dim;
            let mut acc = vec![T::zero(); 2 * half];
            {
                let blk = self.block_view(&pkt, oruns, entries);
                let (a, b) = acc.split_at_mut(half);
                let dkv = ViewMut::new(a, entries, 1, dm.head_dim);
                let dvv = ViewMut::new(b, entries, 1, dm.head_dim);
                self.bwd_block(loc, side, qruns, &blk, dq, &dkv, &dvv);
            }
            self.stats.compute += t0.elapsed();
            self.release(pkt);
            if let Some(tk) = pending_acc.take() {
                let inc: Packet<T> = self.wait(tk)?;
                if inc.data.len() != acc.len() {
                    return Err(self.bad_block(prev, "gradient accumulator"));
                }
                for (x, y) in acc.iter_mut().zip(&inc.data) {
                    *x += *y;
                }
                self.release(inc);
            }
            let accp = Packet {
                data: acc,
                bits: Vec::new(),
            };
            pending_acc = Some(self.post(g.tag(t, KIND_ACC), next, &accp, prev)?);
        }
        if let Some(tk) = pending_acc.take() {
            // The last hop: the accumulator of our own block, home after a full turn.
            let mine: Packet<T> = self.wait(tk)?;
            let half = dm.batch * own_entries * dm.head_dim;
            if mine.data.len() != 2 * half {
                return Err(self.bad_block(prev, "own gradient accumulator"));
            }
            let d = dm.head_dim;
            for (part, dst) in [(0, &mut *dk), (half, &mut *dv)] {
                let mut e = 0;
                for bb in 0..dm.batch {
                    for r in &exported {
                        for j in 0..r.prog.count {
                            let at = ((bb * n + r.prog.row(j)) * dm.kv_heads + r.head) * d;
                            let src = &mine.data[part + e * d..part + (e + 1) * d];
                            for (x, y) in dst[at..at + d].iter_mut().zip(src) {
                                *x += *y;
                            }
                            e += 1;
                        }
                    }
                }
            }
            self.release(mine);
        }
        Ok(())
    }

    /// One block's contribution: `dq` (local) and the block's `dk`/`dv`.
    #[allow(clippy::too_many_arguments)]
    fn bwd_block<T: Element>(
        &mut self,
        loc: &Local<'_, T>,
        side: &BwdSide<'_, T>,
        qruns: &[Run],
        blk: &Block<'_, T>,
        dq: &mut [T],
        dk: &ViewMut<T>,
        dv: &ViewMut<T>,
    ) {
        let dm = *self.plan.dims();
        let (n, d, grp) = (self.geo.local, dm.head_dim, dm.group());
        let causal = self.plan.options().causal;
        let mut kmap: HashMap<(usize, usize, usize), Vec<usize>> = HashMap::new();
        for (j, r) in blk.runs.iter().enumerate() {
            kmap.entry((r.head, r.o, r.seg)).or_default().push(j);
        }
        let mut qmap: HashMap<(usize, usize, usize), Vec<(usize, Prog)>> = HashMap::new();
        for r in qruns {
            qmap.entry((r.head / grp, r.o, r.seg))
                .or_default()
                .push((r.head, r.prog));
        }
        let lv = |data, heads, dd| View {
            data,
            rows: n,
            heads,
            d: dd,
        };
        let cx = BwdCtx {
            q: lv(loc.q, dm.heads, d),
            k: blk.k,
            v: blk.v,
            kmask: blk.mask,
            causal,
            scale: T::of(self.plan.scale()),
            go: lv(side.go, dm.heads, d),
            lse: lv(side.lse, dm.heads, 1),
            delta: lv(side.delta, dm.heads, 1),
            fac: side.fac,
        };
        // dQ: items own query tiles.
        let mut items = Vec::new();
        for (qi, qr) in qruns.iter().enumerate() {
            if !kmap.contains_key(&(qr.head / grp, qr.o, qr.seg)) {
                continue;
            }
            let mut q0 = 0;
            while q0 < qr.prog.count {
                for b in 0..dm.batch {
                    items.push((qi, q0, b));
                }
                q0 += BQ;
            }
        }
        let dqv = ViewMut::new(dq, n, dm.heads, d);
        items.into_par_iter().for_each_init(
            || Scratch::new(d),
            |sc, (qi, q0, b)| {
                let qr = qruns[qi];
                let qp = qr.prog.sub(q0, BQ.min(qr.prog.count - q0));
                let last = qp.pos(qp.count - 1);
                let g = qr.head / grp;
                for &j in &kmap[&(g, qr.o, qr.seg)] {
                    let kr = blk.runs[j];
                    if causal && kr.prog.pos0 > last {
                        continue;
                    }
                    // SAFETY: the item (qrun, tile, batch) alone covers these dq rows.
                    unsafe { bwd_q_tile(sc, &cx, b, qr.head, blk.kv_head(g), qp, kr.prog, &dqv) };
                }
            },
        );
        // dK, dV: items own key tiles.
        let mut items = Vec::new();
        for (kj, kr) in blk.runs.iter().enumerate() {
            let Some(qs) = qmap.get(&(kr.head, kr.o, kr.seg)) else {
                continue;
            };
            let mut k0 = 0;
            while k0 < kr.prog.count {
                let first = kr.prog.pos(k0);
                let visible = !causal || qs.iter().any(|(_, p)| p.pos(p.count - 1) >= first);
                if visible {
                    self.stats.blocks_computed += 1;
                    for b in 0..dm.batch {
                        items.push((kj, k0, b));
                    }
                } else {
                    self.stats.blocks_skipped += 1;
                }
                k0 += BK;
            }
        }
        items.into_par_iter().for_each_init(
            || (Scratch::new(d), Vec::new()),
            |(sc, qps), (kj, k0, b)| {
                let kr = blk.runs[kj];
                let kt = kr.prog.sub(k0, BK.min(kr.prog.count - k0));
                qps.clear();
                qps.extend_from_slice(&qmap[&(kr.head, kr.o, kr.seg)]);
                // SAFETY: the item (key run, tile, batch) alone covers these dk/dv rows:
                // key runs of one block are disjoint in (row, kv head).
                unsafe { bwd_kv_tile(sc, &cx, b, blk.kv_head(kr.head), kt, qps, dk, dv) };
            },
        );
    }
}

/// One exchange group of a pattern: the ranks that share a set of segments.
struct Group<'g> {
    /// Pattern index.
    i: usize,
    /// The group's first segment (the same on every member).
    key: usize,
    /// Members, sorted; the sub-ring order.
    members: &'g [usize],
    /// Message kind of the K/V blocks.
    kind: u8,
}

impl Group<'_> {
    /// `(size, my index, next, prev)` in the sub-ring.
    fn ring(&self, rank: usize) -> (usize, usize, usize, usize) {
        let k = self.members.len();
        let idx = self.members.iter().position(|&x| x == rank).unwrap_or(0);
        (
            k,
            idx,
            self.members[(idx + 1) % k],
            self.members[(idx + k - 1) % k],
        )
    }
    fn tag(&self, step: usize, kind: u8) -> Tag {
        Tag {
            pattern: self.i as u32,
            group: self.key as u32,
            step: step as u32,
            kind,
        }
    }
}

/// Query-side inputs of the backward.
struct BwdSide<'a, T> {
    go: &'a [T],
    lse: &'a [T],
    delta: &'a [T],
    fac: T,
}

fn check_local<T>(
    plan: &Plan,
    n: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
) -> Result<()> {
    let dm = plan.dims();
    check_len("q", dm.batch * n * dm.heads * dm.head_dim, q.len())?;
    check_len("k", dm.batch * n * dm.kv_heads * dm.head_dim, k.len())?;
    check_len("v", dm.batch * n * dm.kv_heads * dm.head_dim, v.len())?;
    if let Some(m) = mask {
        check_len("mask", dm.batch * n, m.len())?;
    }
    Ok(())
}

/// Run `f`; on error tell the peers (so none waits for us until its timeout).
fn guarded<C: RingComm, R>(comm: &C, f: impl FnOnce(&mut usize) -> Result<R>) -> Result<R> {
    let mut step = 0;
    let r = f(&mut step);
    if let Err(e) = &r {
        comm.abort(step, &e.to_string());
    }
    r
}

/// Ring forward on one rank (SPEC §2).
///
/// `plan` is the **global** problem (`seq = N = W·n`); `q` is this rank's
/// `(batch, n, heads, dim)`, `k`/`v` its `(batch, n, kv_heads, dim)`, `mask` its
/// `(batch, n)` key padding mask, all in the local row order of `layout`. Every rank of
/// the communicator must call this with the same plan and layout. Returns the local
/// `out`, `L` and statistics; on any fault every rank returns `Err` within the
/// communicator's timeout.
pub fn try_forward<T: Element, C: RingComm>(
    comm: &C,
    plan: &Plan,
    layout: Layout,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
) -> Result<RingForward<T>> {
    guarded(comm, |step| {
        let mut ring = Ring::new(comm, plan, layout)?;
        let n = ring.geo.local;
        check_local(plan, n, q, k, v, mask)?;
        let loc = Local { q, k, v, mask };
        let dm = plan.dims();
        let mut out = vec![T::zero(); dm.batch * n * dm.heads * dm.head_dim];
        let mut lse = vec![T::neg_infinity(); dm.batch * n * dm.heads];
        let fac = T::of(plan.pattern_factor());
        let r = (|| {
            for i in 0..plan.num_patterns() {
                ring.fwd_pattern(i, &loc, &mut out, &mut lse, fac, KIND_KV)?;
            }
            ring.health()
        })();
        *step = ring.step;
        r?;
        Ok(RingForward {
            out,
            lse,
            stats: ring.stats,
        })
    })
}

/// Ring backward on one rank from the saved local `out` and `L` of [`try_forward`] and
/// the local upstream gradient `grad_out` (`(batch, n, heads, dim)`). Returns the local
/// `dq`, `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
pub fn try_backward<T: Element, C: RingComm>(
    comm: &C,
    plan: &Plan,
    layout: Layout,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
    out: &[T],
    lse: &[T],
    grad_out: &[T],
) -> Result<(Grads<T>, RingStats)> {
    guarded(comm, |step| {
        let mut ring = Ring::new(comm, plan, layout)?;
        let n = ring.geo.local;
        check_local(plan, n, q, k, v, mask)?;
        let dm = *plan.dims();
        let (ql, kl, ll) = (
            dm.batch * n * dm.heads * dm.head_dim,
            dm.batch * n * dm.kv_heads * dm.head_dim,
            dm.batch * n * dm.heads,
        );
        check_len("out", ql, out.len())?;
        check_len("lse", ll, lse.len())?;
        check_len("grad_out", ql, grad_out.len())?;
        let loc = Local { q, k, v, mask };
        let mut dq = vec![T::zero(); ql];
        let mut dk = vec![T::zero(); kl];
        let mut dv = vec![T::zero(); kl];
        let detach = plan.options().detach_weights && plan.options().combine == Combine::Lse;
        let mut delta = vec![T::zero(); ll];
        if !detach {
            delta_full(grad_out, out, dm.head_dim, &mut delta);
        }
        let fac = T::of(plan.pattern_factor());
        let r = (|| {
            for i in 0..plan.num_patterns() {
                if detach {
                    // Δ_i = dO · out_i needs the pattern's own normalised output.
                    let mut oi = vec![T::zero(); ql];
                    let mut li = vec![T::neg_infinity(); ll];
                    ring.fwd_pattern(i, &loc, &mut oi, &mut li, T::one(), KIND_DETACH)?;
                    delta_full(grad_out, &oi, dm.head_dim, &mut delta);
                }
                let side = BwdSide {
                    go: grad_out,
                    lse,
                    delta: &delta,
                    fac,
                };
                ring.bwd_pattern(i, &loc, &side, &mut dq, &mut dk, &mut dv)?;
            }
            ring.health()
        })();
        *step = ring.step;
        r?;
        Ok((Grads { dq, dk, dv }, ring.stats))
    })
}

/// Attended (query, key) pairs of rank `rank` for the whole schedule (ignores masks):
/// the per-rank compute a layout assigns. Used to compare layouts' balance.
pub fn attended_pairs(plan: &Plan, layout: Layout, world: usize, rank: usize) -> Result<u64> {
    let n_glob = plan.dims().seq;
    if world == 0 || !n_glob.is_multiple_of(world) {
        return Err(Error::Ring {
            msg: format!("global length {n_glob} is not a multiple of the world size {world}"),
        });
    }
    let geo = Geometry::new(layout, world, n_glob / world)?;
    let causal = plan.options().causal;
    let mut total = 0u64;
    for i in 0..plan.num_patterns() {
        let pat = plan.patterns()[i];
        let (w, r) = (pat.segment, pat.dilation);
        for (h, o) in query_heads(plan, i) {
            for q in runs(plan, &geo, i, rank, &[(h, o)], None) {
                let a = q.seg * w;
                let m = (w - o).div_ceil(r) as u64;
                for j in 0..q.prog.count {
                    let p = q.prog.pos(j);
                    total += if causal {
                        ((p - a - o) / r + 1) as u64
                    } else {
                        m
                    };
                }
            }
        }
    }
    Ok(total * plan.dims().batch as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners_of(g: &[(usize, Vec<usize>)]) -> Vec<Vec<usize>> {
        g.iter().map(|(_, o)| o.clone()).collect()
    }

    #[test]
    fn groups_follow_segment_owners() {
        let c = |w, n| Geometry::new(Layout::Contiguous, w, n).unwrap();
        // Segments inside a chunk: no group.
        assert!(groups(&c(4, 8), 4, 1).is_empty());
        // Aligned: pairs.
        assert_eq!(owners_of(&groups(&c(4, 8), 16, 2)), vec![vec![2, 3]]);
        // Unaligned chain n = 3, w = 4: rank 1 is in {0,1} (segment 0) then {1,2}.
        let g = groups(&c(4, 3), 4, 1);
        assert_eq!(g, vec![(0, vec![0, 1]), (1, vec![1, 2])]);
        // Zigzag W = 4, chunk 4, w = 8: segments own {0,1}, {2,3}, {2,3}, {0,1};
        // one group per owner set, keyed by its first segment.
        let z = Geometry::new(Layout::Zigzag, 4, 8).unwrap();
        assert_eq!(groups(&z, 8, 3), vec![(1, vec![2, 3])]);
        assert_eq!(groups(&z, 8, 0), vec![(0, vec![0, 1])]);
        // Dense: everyone.
        assert_eq!(owners_of(&groups(&z, 32, 2)), vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn runs_cover_each_position_once() {
        use crate::shape::{Dims, Options, Pattern};
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let plan = Plan::new(
                Dims::mha(1, 48, 3, 2),
                &[Pattern::new(12, 3)],
                Options::default(),
            )
            .unwrap();
            let geo = Geometry::new(layout, 4, 12).unwrap();
            for h in 0..3 {
                let o = plan.offset(0, h).unwrap();
                let mut seen = vec![0; 48];
                for r in 0..4 {
                    for run in runs(&plan, &geo, 0, r, &[(h, o)], None) {
                        for j in 0..run.prog.count {
                            let p = run.prog.pos(j);
                            assert_eq!(geo.position(r, run.prog.row(j)), p);
                            assert_eq!((p % 12) % 3, o);
                            seen[p] += 1;
                        }
                    }
                }
                let want: Vec<usize> = (0..48).map(|p| usize::from((p % 12) % 3 == o)).collect();
                assert_eq!(seen, want, "{layout:?} h={h}");
            }
        }
    }
}
