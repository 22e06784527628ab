//! The GPU-resident ring (feature `nccl`): SPEC §2 forward and backward on device
//! buffers, one GPU per rank. The attention runs in this crate's CUDA kernels on the
//! compute stream ([`Cuda::stream`]); K/V blocks move with NCCL on the communicator's own
//! stream, one step ahead, so the next block's transfer runs under the current block's
//! kernels.
//!
//! # Decomposition
//! With chunk length `c` (`n` for `Contiguous`, `n/2` for `Zigzag`) every pattern
//! `(w', r)` of the schedule is one of
//!
//! * **local** — `w'` divides `c`: every segment lies inside one chunk, so the pattern is
//!   the single-GPU kernel on the rank's own rows. All local patterns run in one launch.
//! * **spanning** — `c` divides `w'` and `r` divides `c`: a segment covers whole chunks
//!   of several ranks. Within a chunk the rows that take part for one head are
//!   `chunk start + o + t·r`, `t < c/r`: a *compact* block of `c/r` rows, and on compact
//!   rows the pattern is dense attention (causal: a key chunk before the query chunk is
//!   fully visible, the same chunk is the causal diagonal, a later one is skipped). The
//!   compact K/V blocks (the dilated `1/r` of the rows, nothing else) rotate around the
//!   segment's owner ranks (the same exchange groups as the CPU ring driver); each
//!   (query chunk, key chunk) pair is one launch of the dense kernel, and its partial
//!   `(out, L)` is merged into an `f32` accumulator with the log-sum-exp rule.
//!
//! Other shapes (a segment that straddles a chunk edge without covering it, or a
//! dilation that does not divide `c` for a spanning pattern) are an `Err` naming the
//! pattern; the host ring ([`super::try_forward`]) takes any shape. A key padding mask
//! travels as one byte per compact key row, so a spanning pattern with a mask must give
//! every head the same rows (dilation 1, or HeadGroups); under Lse with dilation > 1 that
//! is an `Err`, as is `detach_weights`.
//!
//! # Backward
//! Per SPEC §1a the LSE combine is softmax over the union of the patterns' key sets, so
//! every pattern's backward uses the final `out`, `L` and `dO` (and Δ = rowsum(dO·out));
//! under HeadGroups the kernels apply the factor `1/G` to `dP` and `dV`. `dQ` accumulates
//! locally in `f32`. A block's `dK`/`dV` accumulator (`f32`) trails its K/V by one step:
//! at step `t` the exchange carries the K/V this rank holds (on to the next member) and
//! the finished accumulator of the block computed at step `t-1`, and brings the
//! accumulator of the block being computed now; after the last member the accumulator
//! takes one more hop home and is scattered into the local `dK`/`dV`.
//!
//! # Overlap and statistics
//! Before each exchange the communication stream waits for an event of the compute
//! stream (the data to send is ready, the receive buffer is free); before a received
//! block is used the compute stream waits for the exchange's event, bracketed by two
//! timing events: the time between them is communication that compute did not hide
//! (`RingStats::wait`). `RingStats::compute` is the kernel time of the block launches,
//! measured with CUDA events; the host also polls each exchange within the
//! communicator's timeout, so a dead or stalled peer gives `Err` (rank, step) instead of
//! a hang.

use std::time::Duration;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::comm::{CommFault, RingComm, RingStats, Tag};
use super::driver::{comm_error, groups, ring_geometry, seg_owners};
use super::layout::{Geometry, Layout};
use super::nccl::NcclComm;
use crate::error::{Error, Result};
use crate::ops::dilated::cuda_kernel::{backward_launch, forward_launch, function, Prob};
use crate::shape::{check_len, Combine, Dims, Plan};
use crate::tensor::cuda::{
    check_qkv_batch, dev_err, typed_forward, typed_grads, Cuda, CudaBnh, CudaBnhd, CudaElement,
    CudaKeyMask,
};

/// Output of a GPU ring forward on one rank.
#[derive(Debug)]
pub struct DeviceRingForward<E> {
    /// Local output rows `(batch, n, heads, dim)`.
    pub out: CudaSlice<E>,
    /// Local `L` `(batch, n, heads)`, `f32`.
    pub lse: CudaSlice<f32>,
    /// Bytes moved, kernel time, exposed communication time, blocks.
    pub stats: RingStats,
}

/// Gradients of a GPU ring backward on one rank.
#[derive(Debug)]
pub struct DeviceRingGrads<E> {
    /// `(batch, n, heads, dim)`.
    pub dq: CudaSlice<E>,
    /// `(batch, n, kv_heads, dim)`.
    pub dk: CudaSlice<E>,
    /// `(batch, n, kv_heads, dim)`.
    pub dv: CudaSlice<E>,
    /// Bytes moved, kernel time, exposed communication time, blocks.
    pub stats: RingStats,
}

/// The compact-block map, mirrored field by field by `struct RowMap` in `gpu.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RowMap {
    b: i32,
    n: i32,
    hs: i32,
    m: i32,
    hc: i32,
    e: i32,
    row0: i32,
    r: i32,
    hb: i32,
    hdiv: i32,
    ob: i32,
    per_head: i32,
    fixed: i32,
    atomic: i32,
}

// SAFETY: plain old data, `#[repr(C)]`, 14 × i32 exactly as `struct RowMap` in gpu.cu.
unsafe impl DeviceRepr for RowMap {}

impl RowMap {
    fn compact_len(&self) -> usize {
        self.rows() * (self.e as usize)
    }
    fn rows(&self) -> usize {
        (self.b as usize) * (self.m as usize) * (self.hc as usize)
    }
    fn with_e(self, e: usize) -> Self {
        RowMap {
            e: e as i32,
            ..self
        }
    }
}

/// How compact heads `j < hc` map to local heads and offsets (see `gpu.cu`).
#[derive(Debug, Clone, Copy)]
struct Side {
    hc: usize,
    hb: usize,
    hdiv: usize,
    per_head: bool,
    fixed: usize,
}

/// A spanning pattern: its compact geometry.
#[derive(Debug, Clone)]
struct Span {
    i: usize,
    w: usize,
    r: usize,
    /// Compact rows per chunk.
    m: usize,
    q: Side,
    kv: Side,
    /// Dims of one dense block launch.
    bdims: Dims,
}

fn fits(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Device {
        msg: format!("GPU ring: {what} = {x} does not fit 32 bits"),
    })
}

/// Classify the patterns: `(local pattern indices, spanning patterns)`.
fn classify(plan: &Plan, geo: &Geometry, has_mask: bool) -> Result<(Vec<usize>, Vec<Span>)> {
    let dm = *plan.dims();
    let cl = geo.chunk_len();
    let grp = dm.group();
    let (mut local, mut span) = (Vec::new(), Vec::new());
    for (i, p) in plan.patterns().iter().enumerate() {
        let (w, r) = (p.segment, p.dilation);
        if w <= cl {
            if !cl.is_multiple_of(w) {
                return Err(Error::Ring {
                    msg: format!(
                        "GPU ring: pattern {i} (segment {w}) does not divide the chunk length {cl}; \
                         segments must lie inside one chunk or cover whole chunks (the host ring takes any shape)"
                    ),
                });
            }
            local.push(i);
            continue;
        }
        if !w.is_multiple_of(cl) || !cl.is_multiple_of(r) {
            return Err(Error::Ring {
                msg: format!(
                    "GPU ring: pattern {i} (segment {w}, dilation {r}) spans chunks of {cl} rows; \
                     it needs the chunk length to divide the segment and the dilation to divide \
                     the chunk length (the host ring takes any shape)"
                ),
            });
        }
        let (hq, fixed) = match plan.options().combine {
            Combine::Lse => (0..dm.heads, (r == 1).then_some(0)),
            Combine::HeadGroups => (plan.head_group(i), Some(i % r)),
        };
        let per_head = fixed.is_none();
        if per_head && has_mask {
            return Err(Error::Ring {
                msg: format!(
                    "GPU ring: a key padding mask with pattern {i} (segment {w}, dilation {r}) under \
                     the Lse combine is not supported (its heads read different rows of the \
                     travelling blocks); use HeadGroups, or the host ring"
                ),
            });
        }
        let q = Side {
            hc: hq.len(),
            hb: hq.start,
            hdiv: 1,
            per_head,
            fixed: fixed.unwrap_or(0),
        };
        // K/V heads: the kv heads of the pattern's query heads when they all share one
        // offset and the head range is whole kv groups; otherwise one compact kv head per
        // query head (GQA expanded: each query head may need other rows).
        let aligned = !per_head && hq.start.is_multiple_of(grp) && hq.end.is_multiple_of(grp);
        let kv = if aligned {
            Side {
                hc: hq.len() / grp,
                hb: hq.start / grp,
                hdiv: 1,
                ..q
            }
        } else {
            Side {
                hc: hq.len(),
                hb: hq.start,
                hdiv: grp,
                ..q
            }
        };
        let m = cl / r;
        span.push(Span {
            i,
            w,
            r,
            m,
            q,
            kv,
            bdims: Dims {
                batch: dm.batch,
                seq: m,
                heads: q.hc,
                kv_heads: kv.hc,
                head_dim: dm.head_dim,
            },
        });
    }
    Ok((local, span))
}

/// The map of the compact blocks of the chunk starting at local row `row0`, for one side
/// (`hs` heads in the local buffer).
fn row_map(plan: &Plan, geo: &Geometry, s: &Span, side: &Side, hs: usize, row0: usize) -> RowMap {
    let dm = plan.dims();
    RowMap {
        b: dm.batch as i32,
        n: geo.local as i32,
        hs: hs as i32,
        m: s.m as i32,
        hc: side.hc as i32,
        e: dm.head_dim as i32,
        row0: row0 as i32,
        r: s.r as i32,
        hb: side.hb as i32,
        hdiv: side.hdiv as i32,
        ob: side.hb as i32,
        per_head: i32::from(side.per_head),
        fixed: side.fixed as i32,
        atomic: i32::from(side.hdiv > 1),
    }
}

/// Grid of the elementwise helper kernels (grid-stride loops).
fn elementwise(count: usize) -> LaunchConfig {
    let blocks = count.div_ceil(256).clamp(1, 16384) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What the compute stream does between a pair of timing events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Span2 {
    Compute,
    Stall,
}

/// The compact K/V of some chunks, `[K0, V0, K1, V1, ...]`, with their key padding
/// masks `[M0, M1, ...]` (empty without a mask).
struct Pack<E> {
    kv: Vec<CudaSlice<E>>,
    mask: Vec<CudaSlice<u8>>,
}

impl<E> Pack<E> {
    fn empty() -> Self {
        Pack {
            kv: Vec::new(),
            mask: Vec::new(),
        }
    }
    fn slots(&self) -> usize {
        self.kv.len() / 2
    }
    fn k(&self, i: usize) -> &CudaSlice<E> {
        &self.kv[2 * i]
    }
    fn v(&self, i: usize) -> &CudaSlice<E> {
        &self.kv[2 * i + 1]
    }
    fn mask(&self, i: usize) -> Option<&CudaSlice<u8>> {
        self.mask.get(i)
    }
}

/// An exchange in flight: its event and the buffers NCCL may still touch.
struct Flight<E> {
    ev: CudaEvent,
    peer: usize,
    what: String,
    /// Received K/V blocks (with masks) and `dK`/`dV` accumulators.
    kv: Pack<E>,
    acc: Vec<CudaSlice<f32>>,
}

/// What an exchange brought: K/V blocks and `dK`/`dV` accumulators.
type Landed<E> = (Pack<E>, Vec<CudaSlice<f32>>);

/// Per-call state of one rank.
struct Gpu<'a> {
    dev: &'a Cuda,
    /// This rank's key padding mask `(B, n)` (nonzero = attend), if any.
    mask: Option<&'a CudaSlice<u8>>,
    comm: &'a NcclComm,
    plan: &'a Plan,
    geo: Geometry,
    rank: usize,
    stats: RingStats,
    step: usize,
    at: (usize, usize),
    events: Vec<(Span2, CudaEvent, CudaEvent)>,
    held: usize,
    held_bytes: u64,
    /// Phase events when `DILATED_RING_PROFILE` is set (printed to stderr at the end).
    marks: Option<Vec<(String, CudaEvent)>>,
}

impl<'a> Gpu<'a> {
    fn new(
        dev: &'a Cuda,
        comm: &'a NcclComm,
        plan: &'a Plan,
        layout: Layout,
        mask: Option<&'a CudaSlice<u8>>,
    ) -> Result<Self> {
        let (world, rank) = (comm.world_size(), comm.rank());
        if comm.device() != dev.ordinal() {
            return Err(Error::Ring {
                msg: format!(
                    "rank {rank}: the communicator is on GPU {}, the tensors on GPU {}",
                    comm.device(),
                    dev.ordinal()
                ),
            });
        }
        let geo = ring_geometry(plan, layout, world, rank)?;
        fits("local rows·heads", geo.local * plan.dims().heads)?;
        if let Some(m) = mask {
            check_len("mask", plan.dims().batch * geo.local, m.len())?;
        }
        let g = Gpu {
            dev,
            mask,
            comm,
            plan,
            geo,
            rank,
            stats: RingStats::new(rank, world),
            step: 0,
            at: (0, 0),
            events: Vec::new(),
            held: 0,
            held_bytes: 0,
            marks: std::env::var_os("DILATED_RING_PROFILE").map(|_| Vec::new()),
        };
        Ok(g)
    }

    /// Record a profiling mark (no-op unless `DILATED_RING_PROFILE` is set).
    fn mark(&mut self, what: impl FnOnce() -> String) -> Result<()> {
        if self.marks.is_some() {
            let e = self.event()?;
            if let Some(m) = self.marks.as_mut() {
                m.push((what(), e));
            }
        }
        Ok(())
    }

    fn event(&self) -> Result<CudaEvent> {
        self.dev
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(dev_err("event record"))
    }

    fn err(&self, f: CommFault) -> Error {
        comm_error(self.rank, self.step, self.at, f)
    }

    /// The map of compact blocks of chunk `row0` (local rows) for one side.
    fn map(&self, s: &Span, side: &Side, hs: usize, row0: usize) -> RowMap {
        row_map(self.plan, &self.geo, s, side, hs, row0)
    }

    /// The identity map of the whole local buffer (query side).
    fn identity(&self) -> RowMap {
        let dm = self.plan.dims();
        RowMap {
            b: dm.batch as i32,
            n: self.geo.local as i32,
            hs: dm.heads as i32,
            m: self.geo.local as i32,
            hc: dm.heads as i32,
            e: dm.head_dim as i32,
            row0: 0,
            r: 1,
            hb: 0,
            hdiv: 1,
            ob: 0,
            per_head: 0,
            fixed: 0,
            atomic: 0,
        }
    }

    fn gather<T: CudaElement>(&self, m: RowMap, src: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        let len = m.compact_len();
        let mut dst = self.dev.output::<T>(len)?;
        let name = format!("ring_gather_{}", T::NAME);
        let f = function(self.dev, &name)?;
        let one = 1f32;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&m).arg(src).arg(&mut dst).arg(&one);
        // SAFETY: `ring_gather_*(RowMap, const T*, T*, float)`; `dst` holds the map's
        // compact length and every source index lies in the local buffer `src`
        // (B·n·hs·E elements: rows row0 + o + t·r < row0 + c <= n by construction).
        unsafe { b.launch(elementwise(32 * m.rows())) }.map_err(dev_err(&name))?;
        Ok(dst)
    }

    /// Compact key padding mask of one chunk (bytes, `(B, m)`).
    fn gather_mask(&self, m: RowMap, src: &CudaSlice<u8>) -> Result<CudaSlice<u8>> {
        let len = m.compact_len();
        // SAFETY: the kernel below writes all `len` bytes.
        let mut dst =
            unsafe { self.dev.stream().alloc::<u8>(len) }.map_err(dev_err("device allocation"))?;
        let f = function(self.dev, "ring_gather_u8")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&m).arg(src).arg(&mut dst);
        // SAFETY: `ring_gather_u8(RowMap, const u8*, u8*)`; `dst` holds the compact
        // length, sources are rows of the local `(B, n)` mask (E = 1, one head).
        unsafe { b.launch(elementwise(32 * m.rows())) }.map_err(dev_err("ring_gather_u8"))?;
        Ok(dst)
    }

    fn scatter_add<T: CudaElement>(
        &self,
        m: RowMap,
        dst: &mut CudaSlice<f32>,
        src: &CudaSlice<T>,
    ) -> Result<()> {
        let len = m.compact_len();
        check_len("compact block", len, src.len())?;
        let name = format!("ring_scatter_add_{}", T::NAME);
        let f = function(self.dev, &name)?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&m).arg(dst).arg(src);
        // SAFETY: `ring_scatter_add_*(RowMap, float*, const T*)`; `src` has the compact
        // length (checked), `dst` is the local f32 buffer the map addresses; atomic adds
        // where compact heads share a local head (`hdiv > 1`), else one writer each.
        unsafe { b.launch(elementwise(32 * m.rows())) }.map_err(dev_err(&name))?;
        Ok(())
    }

    fn merge<T: CudaElement>(
        &self,
        m: RowMap,
        acc_o: &mut CudaSlice<f32>,
        acc_l: &mut CudaSlice<f32>,
        o: &CudaSlice<T>,
        l: &CudaSlice<f32>,
    ) -> Result<()> {
        check_len("partial out", m.compact_len(), o.len())?;
        check_len("partial L", m.with_e(1).compact_len(), l.len())?;
        let name = format!("ring_merge_{}", T::NAME);
        let f = function(self.dev, &name)?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&m).arg(acc_o).arg(acc_l).arg(o).arg(l);
        // SAFETY: `ring_merge_*(RowMap, float*, float*, const T*, const float*)`; one warp
        // per compact row (32 threads each), distinct rows write distinct local rows
        // (query-side maps are one-to-one); lengths checked above.
        unsafe { b.launch(elementwise(32 * m.rows())) }.map_err(dev_err(&name))?;
        Ok(())
    }

    fn add<T: CudaElement>(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<T>) -> Result<()> {
        check_len("accumulator", acc.len(), x.len())?;
        let name = format!("ring_add_{}", T::NAME);
        let f = function(self.dev, &name)?;
        let count = x.len() as i64;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&count).arg(acc).arg(x);
        // SAFETY: `ring_add_*(long long, float*, const T*)`, both of `count` elements.
        unsafe { b.launch(elementwise(x.len())) }.map_err(dev_err(&name))?;
        Ok(())
    }

    fn convert<T: CudaElement>(&self, x: &CudaSlice<f32>, s: f32) -> Result<CudaSlice<T>> {
        let mut y = self.dev.output::<T>(x.len())?;
        let name = format!("ring_convert_{}", T::NAME);
        let f = function(self.dev, &name)?;
        let count = x.len() as i64;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&count).arg(x).arg(&mut y).arg(&s);
        // SAFETY: `ring_convert_*(long long, const float*, T*, float)`, both `count` long.
        unsafe { b.launch(elementwise(x.len())) }.map_err(dev_err(&name))?;
        Ok(y)
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.dev
            .stream()
            .alloc_zeros::<f32>(len)
            .map_err(dev_err("device allocation"))
    }

    /// A new f32 buffer filled with `-inf` (the empty log-sum-exp).
    fn neg_inf(&self, len: usize) -> Result<CudaSlice<f32>> {
        let mut x = self.dev.output::<f32>(len)?;
        let f = function(self.dev, "ring_fill_f32")?;
        let (count, val) = (len as i64, f32::NEG_INFINITY);
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&count).arg(&mut x).arg(&val);
        // SAFETY: `ring_fill_f32(long long, float*, float)`, `x` holds `count` floats.
        unsafe { b.launch(elementwise(len)) }.map_err(dev_err("ring_fill_f32"))?;
        Ok(x)
    }

    /// Chunks of `rank` in the segments of a group, `(chunk, local row)`.
    fn group_chunks(&self, s: &Span, members: &[usize], rank: usize) -> Vec<(usize, usize)> {
        let cl = self.geo.chunk_len();
        self.geo
            .chunks_of(rank)
            .into_iter()
            .filter(|&(c, _)| seg_owners(&self.geo, s.w, c * cl / s.w) == members)
            .collect()
    }

    /// Exchange with the group neighbours, after the compute stream's work so far.
    fn exchange<E: CudaElement>(
        &mut self,
        next: usize,
        prev: usize,
        send_kv: Option<&Pack<E>>,
        send_acc: &[CudaSlice<f32>],
        kv: Pack<E>,
        acc: Vec<CudaSlice<f32>>,
    ) -> Result<Flight<E>> {
        self.step += 1;
        self.stats.steps += 1;
        let after = self
            .dev
            .stream()
            .record_event(None)
            .map_err(dev_err("event record"))?;
        let stream = self.dev.stream();
        let es = std::mem::size_of::<E>();
        let mut sends = Vec::new();
        if let Some(p) = send_kv {
            for b in &p.kv {
                sends.push((b.device_ptr(stream).0, b.len() * es));
            }
            for b in &p.mask {
                sends.push((b.device_ptr(stream).0, b.len()));
            }
        }
        for b in send_acc {
            sends.push((b.device_ptr(stream).0, b.len() * 4));
        }
        let mut recvs = Vec::new();
        for b in &kv.kv {
            recvs.push((b.device_ptr(stream).0, b.len() * es));
        }
        for b in &kv.mask {
            recvs.push((b.device_ptr(stream).0, b.len()));
        }
        for b in &acc {
            recvs.push((b.device_ptr(stream).0, b.len() * 4));
        }
        let sent: usize = sends.iter().map(|x| x.1).sum();
        let got: usize = recvs.iter().map(|x| x.1).sum();
        self.stats.bytes_sent += sent as u64;
        self.stats.bytes_recv += got as u64;
        self.held += kv.slots();
        self.stats.max_remote_blocks = self.stats.max_remote_blocks.max(self.held);
        self.held_bytes += got as u64;
        self.stats.peak_remote_bytes = self.stats.peak_remote_bytes.max(self.held_bytes);
        let what = format!(
            "pattern {} step {}: send {sent} bytes to rank {next}, receive {got} from rank {prev}",
            self.at.0, self.at.1
        );
        // SAFETY: every pointer covers its buffer's bytes on this GPU (the compute
        // stream's device); the send buffers are held by the caller until the flight is
        // waited for, the receive buffers move into the returned flight, and on a failed
        // wait `Flight` is leaked (`land`), so NCCL never writes freed memory.
        let ev = unsafe {
            self.comm
                .exchange_raw(&after, Some(next), &sends, Some(prev), &recvs, &what)
        }
        .map_err(|f| self.err(f))?;
        Ok(Flight {
            ev,
            peer: prev,
            what,
            kv,
            acc,
        })
    }

    /// Make the compute stream wait for a flight (timed) and poll it from the host
    /// within the timeout. On failure the flight's buffers are leaked.
    fn land<E>(&mut self, fl: Flight<E>) -> Result<Landed<E>> {
        let a = self.event()?;
        self.dev
            .stream()
            .wait(&fl.ev)
            .map_err(dev_err("stream wait"))?;
        let b = self.event()?;
        self.events.push((Span2::Stall, a, b));
        if let Err(f) = self.comm.wait_device(&fl.ev, Some(fl.peer), &fl.what) {
            let e = self.err(f);
            std::mem::forget(fl);
            return Err(e);
        }
        Ok((fl.kv, fl.acc))
    }

    fn release(&mut self, slots: usize, bytes: u64) {
        self.held = self.held.saturating_sub(slots);
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
    }

    /// Time a piece of compute-stream work.
    fn timed<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        let a = self.event()?;
        let r = f(self)?;
        let b = self.event()?;
        self.events.push((Span2::Compute, a, b));
        Ok(r)
    }

    /// Sum the timing events into the statistics (synchronizes the compute stream).
    fn finish_stats(&mut self) -> Result<RingStats> {
        self.dev.synchronize()?;
        let ms = |a: &CudaEvent, b: &CudaEvent| -> Result<Duration> {
            let t = a.elapsed_ms(b).map_err(dev_err("event timing"))?;
            Ok(Duration::from_secs_f64(f64::from(t.max(0.0)) / 1e3))
        };
        if let Some(m) = &self.marks {
            let mut line = format!("rank {} GPU timeline:", self.rank);
            for w in m.windows(2) {
                line += &format!(
                    " {} {:.2} ms;",
                    w[1].0,
                    ms(&w[0].1, &w[1].1)?.as_secs_f64() * 1e3
                );
            }
            eprintln!("{line}");
        }
        for (kind, a, b) in &self.events {
            let t = ms(a, b)?;
            match kind {
                Span2::Compute => self.stats.compute += t,
                Span2::Stall => self.stats.wait += t,
            }
        }
        Ok(self.stats.clone())
    }

    /// End-of-call health check: every rank reports in (an all-reduce), so a rank that
    /// failed after its last exchange still makes the others return `Err`.
    fn health(&mut self) -> Result<()> {
        self.at = (usize::MAX, 0);
        let tag = Tag {
            pattern: u32::MAX,
            group: 0,
            step: 0,
            kind: 2,
        };
        self.comm
            .all_reduce_max(tag, 0.0)
            .map(|_| ())
            .map_err(|f| self.err(f))
    }
}

/// Relation of a (query chunk, key chunk) pair of one spanning pattern: `None` if no
/// query sees a key (other segment, or causal future), else `Some(diagonal)`.
fn relation(plan: &Plan, geo: &Geometry, s: &Span, cq: usize, ck: usize) -> Option<bool> {
    let cl = geo.chunk_len();
    if cq * cl / s.w != ck * cl / s.w {
        return None;
    }
    if plan.options().causal {
        match ck.cmp(&cq) {
            std::cmp::Ordering::Greater => None,
            std::cmp::Ordering::Equal => Some(true),
            std::cmp::Ordering::Less => Some(false),
        }
    } else {
        Some(false)
    }
}

/// Query-side compact blocks of the local chunks of a group (forward).
struct QSide<E> {
    chunks: Vec<(usize, usize)>,
    q: Vec<CudaSlice<E>>,
}

/// Run `f` on a fresh per-call state and return its result with the statistics; on
/// error abort the communicator so the peers stop waiting for this rank.
fn with_ring<R>(
    dev: &Cuda,
    comm: &NcclComm,
    plan: &Plan,
    layout: Layout,
    mask: Option<&CudaSlice<u8>>,
    f: impl FnOnce(&mut Gpu<'_>) -> Result<R>,
) -> Result<(R, RingStats)> {
    let mut step = 0;
    let r = (|| -> Result<(R, RingStats)> {
        let mut g = Gpu::new(dev, comm, plan, layout, mask)?;
        let r = f(&mut g);
        step = g.step;
        let r = r?;
        Ok((r, g.finish_stats()?))
    })();
    if let Err(e) = &r {
        comm.abort(step, &e.to_string());
    }
    r
}

fn check_local<E>(
    plan: &Plan,
    n: usize,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
) -> Result<()> {
    let dm = plan.dims();
    check_len("q", dm.batch * n * dm.heads * dm.head_dim, q.len())?;
    check_len("k", dm.batch * n * dm.kv_heads * dm.head_dim, k.len())?;
    check_len("v", dm.batch * n * dm.kv_heads * dm.head_dim, v.len())?;
    Ok(())
}

/// Ring forward on one rank, on the GPU (SPEC §2).
///
/// `plan` is the **global** problem; `q` `(batch, n, heads, dim)` and `k`/`v`
/// `(batch, n, kv_heads, dim)` are this rank's rows in the local order of `layout`, on
/// the communicator's GPU. Every rank calls this with the same plan and layout. Returns
/// the local `out`, `L` (f32) and statistics; a fault on any rank gives every rank `Err`
/// within the communicator's timeout. `mask` is this rank's key padding mask `(batch, n)`
/// as bytes (nonzero = attend), in the same local order.
#[allow(clippy::too_many_arguments)]
pub fn try_forward<E: CudaElement>(
    dev: &Cuda,
    comm: &NcclComm,
    plan: &Plan,
    layout: Layout,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
    mask: Option<&CudaSlice<u8>>,
) -> Result<DeviceRingForward<E>> {
    let ((out, lse), stats) =
        with_ring(dev, comm, plan, layout, mask, |g| forward_inner(g, q, k, v))?;
    Ok(DeviceRingForward { out, lse, stats })
}

fn forward_inner<E: CudaElement>(
    g: &mut Gpu<'_>,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
) -> Result<(CudaSlice<E>, CudaSlice<f32>)> {
    let plan = g.plan;
    let dm = *plan.dims();
    let n = g.geo.local;
    check_local(plan, n, q, k, v)?;
    let (local, spans) = classify(plan, &g.geo, g.mask.is_some())?;
    g.mark(|| "start".into())?;
    if spans.is_empty() {
        // Every segment lies inside a chunk: the single-GPU kernel on the local rows is
        // the whole answer (no accumulator, no exchange).
        g.at = (local[0], 0);
        let pr = Prob::patterns(plan, n, &local, plan.pattern_factor(), g.mask.is_some())?;
        let f = g.timed(|g| forward_launch(g.dev, &pr, q, k, v, g.mask))?;
        g.stats.blocks_computed += 1;
        g.health()?;
        return Ok((f.out, f.lse));
    }
    let mut acc_o = g.zeros(dm.batch * n * dm.heads * dm.head_dim)?;
    let mut acc_l = g.neg_inf(dm.batch * n * dm.heads)?;
    g.mark(|| "init".into())?;
    if !local.is_empty() {
        g.at = (local[0], 0);
        let pr = Prob::patterns(plan, n, &local, 1.0, g.mask.is_some())?;
        let id = g.identity();
        g.timed(|g| {
            let f = forward_launch(g.dev, &pr, q, k, v, g.mask)?;
            g.merge(id, &mut acc_o, &mut acc_l, &f.out, &f.lse)
        })?;
        g.stats.blocks_computed += 1;
    }
    for s in &spans {
        let groups = groups(&g.geo, s.w, g.rank);
        for (_, members) in groups {
            fwd_group(g, s, &members, q, k, v, &mut acc_o, &mut acc_l)?;
        }
        // Segments of several chunks that all lie on this rank (zigzag's middle chunks,
        // or W = 1): no exchange.
        let solo = g.group_chunks(s, &[g.rank], g.rank);
        if !solo.is_empty() {
            g.at = (s.i, 0);
            let qs = q_side(g, s, &solo, q)?;
            let kv = kv_block(g, s, &solo, k, v)?;
            fwd_blocks(g, s, &qs, &solo, &kv, &mut acc_o, &mut acc_l)?;
        }
    }
    g.health()?;
    g.mark(|| "health".into())?;
    let out = g.convert::<E>(&acc_o, plan.pattern_factor() as f32)?;
    g.mark(|| "convert".into())?;
    Ok((out, acc_l))
}

#[allow(clippy::too_many_arguments)]
fn fwd_group<E: CudaElement>(
    g: &mut Gpu<'_>,
    s: &Span,
    members: &[usize],
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
    acc_o: &mut CudaSlice<f32>,
    acc_l: &mut CudaSlice<f32>,
) -> Result<()> {
    let kk = members.len();
    let idx = members.iter().position(|&x| x == g.rank).unwrap_or(0);
    let (next, prev) = (members[(idx + 1) % kk], members[(idx + kk - 1) % kk]);
    let chunks = g.group_chunks(s, members, g.rank);
    let qs = q_side(g, s, &chunks, q)?;
    let mut cur = kv_block(g, s, &chunks, k, v)?;
    g.mark(|| format!("p{} gathers", s.i))?;
    let block_len = s.bdims.batch * s.m * s.kv.hc * s.bdims.head_dim;
    for t in 0..kk {
        g.at = (s.i, t);
        let origin = members[(idx + kk - t) % kk];
        let flight = if t + 1 < kk {
            let from = members[(idx + kk - t - 1) % kk];
            let slots = g.group_chunks(s, members, from).len();
            let bufs = recv_pack::<E>(g, s, slots)?;
            Some(g.exchange(next, prev, Some(&cur), &[], bufs, Vec::new())?)
        } else {
            None
        };
        let kchunks = g.group_chunks(s, members, origin);
        fwd_blocks(g, s, &qs, &kchunks, &cur, acc_o, acc_l)?;
        g.mark(|| format!("p{} step {t} compute", s.i))?;
        if let Some(fl) = flight {
            let (kv, _) = g.land(fl)?;
            g.mark(|| format!("p{} step {t} land", s.i))?;
            if t > 0 {
                let bytes = (cur.kv.len() * block_len * std::mem::size_of::<E>()) as u64;
                g.release(cur.slots(), bytes);
            }
            cur = kv;
        }
    }
    Ok(())
}

/// Compact queries of `chunks`.
fn q_side<E: CudaElement>(
    g: &Gpu<'_>,
    s: &Span,
    chunks: &[(usize, usize)],
    q: &CudaSlice<E>,
) -> Result<QSide<E>> {
    let h = g.plan.dims().heads;
    Ok(QSide {
        q: chunks
            .iter()
            .map(|&(_, row0)| g.gather(g.map(s, &s.q, h, row0), q))
            .collect::<Result<_>>()?,
        chunks: chunks.to_vec(),
    })
}

/// Compact K, V (and key padding masks) of `chunks`.
fn kv_block<E: CudaElement>(
    g: &Gpu<'_>,
    s: &Span,
    chunks: &[(usize, usize)],
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
) -> Result<Pack<E>> {
    let hkv = g.plan.dims().kv_heads;
    let mut out = Pack::empty();
    for &(_, row0) in chunks {
        let m = g.map(s, &s.kv, hkv, row0);
        out.kv.push(g.gather(m, k)?);
        out.kv.push(g.gather(m, v)?);
        if let Some(mask) = g.mask {
            // One offset for every head (checked by `classify`): one row per position.
            let mm = RowMap {
                hs: 1,
                hc: 1,
                e: 1,
                hb: 0,
                hdiv: 1,
                atomic: 0,
                ..m
            };
            out.mask.push(g.gather_mask(mm, mask)?);
        }
    }
    Ok(out)
}

/// Receive buffers for the compact K/V (and masks) of `slots` chunks.
fn recv_pack<E: CudaElement>(g: &Gpu<'_>, s: &Span, slots: usize) -> Result<Pack<E>> {
    let block_len = s.bdims.batch * s.m * s.kv.hc * s.bdims.head_dim;
    let mut p = Pack::empty();
    for _ in 0..slots {
        p.kv.push(g.dev.output::<E>(block_len)?);
        p.kv.push(g.dev.output::<E>(block_len)?);
        if g.mask.is_some() {
            p.mask.push(g.dev.zeros::<u8>(s.bdims.batch * s.m)?);
        }
    }
    Ok(p)
}

/// Compact query side of the backward for `chunks`.
#[allow(clippy::too_many_arguments)]
fn b_side<E: CudaElement>(
    g: &Gpu<'_>,
    s: &Span,
    chunks: &[(usize, usize)],
    q: &CudaSlice<E>,
    out: &CudaSlice<E>,
    grad_out: &CudaSlice<E>,
    lse: &CudaSlice<f32>,
) -> Result<BSide<E>> {
    let h = g.plan.dims().heads;
    let mut side = BSide {
        chunks: chunks.to_vec(),
        q: Vec::new(),
        o: Vec::new(),
        go: Vec::new(),
        l: Vec::new(),
    };
    for &(_, row0) in chunks {
        let m = g.map(s, &s.q, h, row0);
        side.q.push(g.gather(m, q)?);
        side.o.push(g.gather(m, out)?);
        side.go.push(g.gather(m, grad_out)?);
        side.l.push(g.gather(m.with_e(1), lse)?);
    }
    Ok(side)
}

/// Every (local query chunk, key chunk of the block) pair of a spanning pattern.
fn fwd_blocks<E: CudaElement>(
    g: &mut Gpu<'_>,
    s: &Span,
    qs: &QSide<E>,
    kchunks: &[(usize, usize)],
    kv: &Pack<E>,
    acc_o: &mut CudaSlice<f32>,
    acc_l: &mut CudaSlice<f32>,
) -> Result<()> {
    let dm = *g.plan.dims();
    for (qi, &(cq, row0)) in qs.chunks.iter().enumerate() {
        for (ki, &(ck, _)) in kchunks.iter().enumerate() {
            let Some(diag) = relation(g.plan, &g.geo, s, cq, ck) else {
                g.stats.blocks_skipped += 1;
                continue;
            };
            g.stats.blocks_computed += 1;
            let pr = Prob::dense_block(g.plan, s.bdims, diag, 1.0, g.mask.is_some())?;
            let m = g.map(s, &s.q, dm.heads, row0);
            g.timed(|g| {
                let f = forward_launch(g.dev, &pr, &qs.q[qi], kv.k(ki), kv.v(ki), kv.mask(ki))?;
                g.merge(m, acc_o, acc_l, &f.out, &f.lse)
            })?;
        }
    }
    Ok(())
}

/// Ring backward on one rank, on the GPU, from the saved local `out` and `L` of
/// [`try_forward`] and the local upstream gradient `grad_out`. Returns the local `dq`,
/// `dk`, `dv` (equal to the rows of the single-device gradients).
#[allow(clippy::too_many_arguments)]
pub fn try_backward<E: CudaElement>(
    dev: &Cuda,
    comm: &NcclComm,
    plan: &Plan,
    layout: Layout,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
    mask: Option<&CudaSlice<u8>>,
    out: &CudaSlice<E>,
    lse: &CudaSlice<f32>,
    grad_out: &CudaSlice<E>,
) -> Result<DeviceRingGrads<E>> {
    let ((dq, dk, dv), stats) = with_ring(dev, comm, plan, layout, mask, |g| {
        backward_inner(g, q, k, v, out, lse, grad_out)
    })?;
    Ok(DeviceRingGrads { dq, dk, dv, stats })
}

/// Query-side compact blocks of the backward.
struct BSide<E> {
    chunks: Vec<(usize, usize)>,
    q: Vec<CudaSlice<E>>,
    o: Vec<CudaSlice<E>>,
    go: Vec<CudaSlice<E>>,
    l: Vec<CudaSlice<f32>>,
}

type Grads3<E> = (CudaSlice<E>, CudaSlice<E>, CudaSlice<E>);

fn backward_inner<E: CudaElement>(
    g: &mut Gpu<'_>,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
    out: &CudaSlice<E>,
    lse: &CudaSlice<f32>,
    grad_out: &CudaSlice<E>,
) -> Result<Grads3<E>> {
    let plan = g.plan;
    let dm = *plan.dims();
    let n = g.geo.local;
    check_local(plan, n, q, k, v)?;
    let (ql, kl) = (
        dm.batch * n * dm.heads * dm.head_dim,
        dm.batch * n * dm.kv_heads * dm.head_dim,
    );
    check_len("out", ql, out.len())?;
    check_len("lse", dm.batch * n * dm.heads, lse.len())?;
    check_len("grad_out", ql, grad_out.len())?;
    if plan.options().detach_weights && plan.options().combine == Combine::Lse {
        return Err(Error::Ring {
            msg: "GPU ring: detach_weights is not supported (use the host ring)".into(),
        });
    }
    let (local, spans) = classify(plan, &g.geo, g.mask.is_some())?;
    let fac = plan.pattern_factor();
    g.mark(|| "start".into())?;
    if spans.is_empty() {
        g.at = (local[0], 0);
        let pr = Prob::patterns(plan, n, &local, fac, g.mask.is_some())?;
        let gr =
            g.timed(|g| backward_launch(g.dev, &pr, false, q, k, v, g.mask, out, lse, grad_out))?;
        g.stats.blocks_computed += 1;
        g.health()?;
        return Ok((gr.dq, gr.dk, gr.dv));
    }
    let mut dq = g.zeros(ql)?;
    let mut dk = g.zeros(kl)?;
    let mut dv = g.zeros(kl)?;
    if !local.is_empty() {
        g.at = (local[0], 0);
        let pr = Prob::patterns(plan, n, &local, fac, g.mask.is_some())?;
        g.timed(|g| {
            let gr = backward_launch(g.dev, &pr, false, q, k, v, g.mask, out, lse, grad_out)?;
            g.add(&mut dq, &gr.dq)?;
            g.add(&mut dk, &gr.dk)?;
            g.add(&mut dv, &gr.dv)
        })?;
        g.stats.blocks_computed += 1;
    }
    for s in &spans {
        let groups = groups(&g.geo, s.w, g.rank);
        for (_, members) in groups {
            bwd_group(
                g,
                s,
                &members,
                (q, k, v),
                (out, lse, grad_out),
                (&mut dq, &mut dk, &mut dv),
            )?;
        }
        let solo = g.group_chunks(s, &[g.rank], g.rank);
        if !solo.is_empty() {
            g.at = (s.i, 0);
            let side = b_side(g, s, &solo, q, out, grad_out, lse)?;
            let kv = kv_block(g, s, &solo, k, v)?;
            let block_len = s.bdims.batch * s.m * s.kv.hc * s.bdims.head_dim;
            let mut fresh = (0..2 * solo.len())
                .map(|_| g.zeros(block_len))
                .collect::<Result<Vec<_>>>()?;
            bwd_blocks(g, s, &side, &solo, &kv, &mut fresh, &mut dq)?;
            let hkv = plan.dims().kv_heads;
            for (si, &(_, row0)) in solo.iter().enumerate() {
                let m = g.map(s, &s.kv, hkv, row0);
                g.scatter_add(m, &mut dk, &fresh[2 * si])?;
                g.scatter_add(m, &mut dv, &fresh[2 * si + 1])?;
            }
        }
    }
    g.health()?;
    g.mark(|| "health".into())?;
    let r = (
        g.convert::<E>(&dq, 1.0)?,
        g.convert::<E>(&dk, 1.0)?,
        g.convert::<E>(&dv, 1.0)?,
    );
    g.mark(|| "convert".into())?;
    Ok(r)
}

type Ins<'x, E> = (&'x CudaSlice<E>, &'x CudaSlice<E>, &'x CudaSlice<E>);
type Saved<'x, E> = (&'x CudaSlice<E>, &'x CudaSlice<f32>, &'x CudaSlice<E>);
type Accs<'x> = (
    &'x mut CudaSlice<f32>,
    &'x mut CudaSlice<f32>,
    &'x mut CudaSlice<f32>,
);

fn bwd_group<E: CudaElement>(
    g: &mut Gpu<'_>,
    s: &Span,
    members: &[usize],
    (q, k, v): Ins<'_, E>,
    (out, lse, grad_out): Saved<'_, E>,
    (dq, dk, dv): Accs<'_>,
) -> Result<()> {
    let dm = *g.plan.dims();
    let kk = members.len();
    let idx = members.iter().position(|&x| x == g.rank).unwrap_or(0);
    let (next, prev) = (members[(idx + 1) % kk], members[(idx + kk - 1) % kk]);
    let chunks = g.group_chunks(s, members, g.rank);
    let side = b_side(g, s, &chunks, q, out, grad_out, lse)?;
    let mut cur = kv_block(g, s, &chunks, k, v)?;
    g.mark(|| format!("p{} gathers", s.i))?;
    let block_len = s.bdims.batch * s.m * s.kv.hc * s.bdims.head_dim;
    let es = std::mem::size_of::<E>();
    // The finished accumulator of the block computed at the previous step.
    let mut done: Vec<CudaSlice<f32>> = Vec::new();
    for t in 0..=kk {
        g.at = (s.i, t);
        // What arrives: K/V of the next block (t + 1 < k), the accumulator of the block
        // computed now (t >= 1; at t = k: this rank's own block, complete).
        let from_kv = members[(idx + 2 * kk - t - 1) % kk];
        let from_acc = members[(idx + kk - t) % kk];
        let kv_slots = if t + 1 < kk {
            g.group_chunks(s, members, from_kv).len()
        } else {
            0
        };
        let acc_slots = if t >= 1 {
            g.group_chunks(s, members, from_acc).len()
        } else {
            0
        };
        let flight = if kv_slots + acc_slots > 0 || !done.is_empty() {
            let kvb = recv_pack::<E>(g, s, kv_slots)?;
            let accb = (0..2 * acc_slots)
                .map(|_| g.zeros(block_len))
                .collect::<Result<Vec<_>>>()?;
            let send_kv = (t + 1 < kk).then_some(&cur);
            Some(g.exchange(next, prev, send_kv, &done, kvb, accb)?)
        } else {
            None
        };
        // This step's contribution to the block it holds.
        let mut fresh: Vec<CudaSlice<f32>> = Vec::new();
        if t < kk {
            let origin = members[(idx + kk - t) % kk];
            let kchunks = g.group_chunks(s, members, origin);
            fresh = (0..2 * kchunks.len())
                .map(|_| g.zeros(block_len))
                .collect::<Result<_>>()?;
            bwd_blocks(g, s, &side, &kchunks, &cur, &mut fresh, dq)?;
            g.mark(|| format!("p{} step {t} compute", s.i))?;
        }
        let sent_done = std::mem::take(&mut done);
        if let Some(fl) = flight {
            let (kv, acc) = g.land(fl)?;
            g.mark(|| format!("p{} step {t} land", s.i))?;
            drop(sent_done);
            if t == kk {
                // Our own block's accumulator, home after visiting every member.
                for (si, &(_, row0)) in chunks.iter().enumerate() {
                    let m = g.map(s, &s.kv, dm.kv_heads, row0);
                    g.scatter_add(m, dk, &acc[2 * si])?;
                    g.scatter_add(m, dv, &acc[2 * si + 1])?;
                }
            } else {
                for (f, a) in fresh.iter_mut().zip(&acc) {
                    g.add(f, a)?;
                }
            }
            if t > 0 && t < kk {
                let bytes = (cur.kv.len() * block_len * es) as u64;
                g.release(cur.slots(), bytes);
            }
            if t + 1 < kk {
                cur = kv;
            }
        }
        done = fresh;
    }
    Ok(())
}

/// Backward of every (local query chunk, key chunk of the block) pair: `dq` (local f32)
/// and the block's fresh `dK`/`dV` accumulators.
fn bwd_blocks<E: CudaElement>(
    g: &mut Gpu<'_>,
    s: &Span,
    side: &BSide<E>,
    kchunks: &[(usize, usize)],
    kv: &Pack<E>,
    fresh: &mut [CudaSlice<f32>],
    dq: &mut CudaSlice<f32>,
) -> Result<()> {
    let dm = *g.plan.dims();
    let fac = g.plan.pattern_factor();
    for (qi, &(cq, row0)) in side.chunks.iter().enumerate() {
        for (ki, &(ck, _)) in kchunks.iter().enumerate() {
            let Some(diag) = relation(g.plan, &g.geo, s, cq, ck) else {
                g.stats.blocks_skipped += 1;
                continue;
            };
            g.stats.blocks_computed += 1;
            let pr = Prob::dense_block(g.plan, s.bdims, diag, fac, g.mask.is_some())?;
            let m = g.map(s, &s.q, dm.heads, row0);
            let (fk, fv) = fresh.split_at_mut(2 * ki + 1);
            g.timed(|g| {
                let gr = backward_launch(
                    g.dev,
                    &pr,
                    false,
                    &side.q[qi],
                    kv.k(ki),
                    kv.v(ki),
                    kv.mask(ki),
                    &side.o[qi],
                    &side.l[qi],
                    &side.go[qi],
                )?;
                g.scatter_add(m, dq, &gr.dq)?;
                g.add(&mut fk[2 * ki], &gr.dk)?;
                g.add(&mut fv[0], &gr.dv)
            })?;
        }
    }
    Ok(())
}

/// The typed front door on the GPU: [`RingDilatedAttention`](super::RingDilatedAttention)
/// over an [`NcclComm`], on device tensors. The same compile-time checks as the CPU path
/// (`LOCAL·WORLD` against the schedule, heads, kv heads, dims); the world size is checked
/// when the ring is built.
///
/// ```no_run
/// use dilated_attention::prelude::*;
/// use dilated_attention::ring::{nccl, CommConfig, Layout, NcclComm, RingDilatedAttention};
/// use dilated_attention::tensor::cuda::Cuda;
/// type S = (Seg<2048, 1>, Seg<16384, 4>);
/// let comms = NcclComm::from_devices(2, CommConfig::default())?;
/// let res = nccl::run(comms, |comm| {
///     let dev = Cuda::new(comm.device())?;
///     let attn = RingDilatedAttention::<_, S, LseCombine, 8192, 2>::try_new(&comm, Layout::Zigzag)?
///         .causal(true);
///     let x = vec![half::bf16::from_f32(0.1); 8192 * 8 * 64];
///     let q = dev.tensor_from_vec(&x, (Const::<1>, Const::<8192>, Const::<8>, Const::<64>))?;
///     let (out, lse, stats) = attn.try_forward_cuda(&dev, &q, &q, &q, None)?;
///     Ok(stats.bytes_sent)
/// });
/// # Ok::<(), dilated_attention::Error>(())
/// ```
impl<S, C, const LOCAL: usize, const WORLD: usize>
    super::RingDilatedAttention<'_, NcclComm, S, C, LOCAL, WORLD>
where
    S: crate::shape::typed::Schedule,
    C: crate::shape::typed::CombineKind,
{
    /// GPU ring forward on this rank: local `(out, L)` and the call's statistics.
    #[allow(clippy::type_complexity)]
    pub fn try_forward_cuda<
        B: dfdx::shapes::Dim,
        const H: usize,
        const HKV: usize,
        const D: usize,
        E: CudaElement,
    >(
        &self,
        dev: &Cuda,
        q: &CudaBnhd<B, LOCAL, H, D, E>,
        k: &CudaBnhd<B, LOCAL, HKV, D, E>,
        v: &CudaBnhd<B, LOCAL, HKV, D, E>,
        mask: Option<&CudaKeyMask<B, LOCAL>>,
    ) -> Result<(CudaBnhd<B, LOCAL, H, D, E>, CudaBnh<B, LOCAL, H>, RingStats)> {
        check_qkv_batch(q, k, v, mask)?;
        let plan = self.plan::<H, HKV, D>(q.shape().0.size())?;
        let (q_, k_, v_) = (q.slice(), k.slice(), v.slice());
        let m = mask.map(|m| m.slice());
        let f = try_forward(dev, self.comm(), &plan, self.layout(), q_, k_, v_, m)?;
        let (out, lse) = typed_forward(dev, q, f.out, f.lse)?;
        Ok((out, lse, f.stats))
    }

    /// GPU ring backward on this rank from the saved local `out`, `L`: local
    /// `(dq, dk, dv)` and the call's statistics.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    pub fn try_backward_cuda<
        B: dfdx::shapes::Dim,
        const H: usize,
        const HKV: usize,
        const D: usize,
        E: CudaElement,
    >(
        &self,
        dev: &Cuda,
        q: &CudaBnhd<B, LOCAL, H, D, E>,
        k: &CudaBnhd<B, LOCAL, HKV, D, E>,
        v: &CudaBnhd<B, LOCAL, HKV, D, E>,
        mask: Option<&CudaKeyMask<B, LOCAL>>,
        out: &CudaBnhd<B, LOCAL, H, D, E>,
        lse: &CudaBnh<B, LOCAL, H>,
        grad_out: &CudaBnhd<B, LOCAL, H, D, E>,
    ) -> Result<(
        CudaBnhd<B, LOCAL, H, D, E>,
        CudaBnhd<B, LOCAL, HKV, D, E>,
        CudaBnhd<B, LOCAL, HKV, D, E>,
        RingStats,
    )> {
        check_qkv_batch(q, k, v, mask)?;
        let plan = self.plan::<H, HKV, D>(q.shape().0.size())?;
        let (q_, k_, v_) = (q.slice(), k.slice(), v.slice());
        let m = mask.map(|m| m.slice());
        let (o, l, go) = (out.slice(), lse.slice(), grad_out.slice());
        let g = try_backward(
            dev,
            self.comm(),
            &plan,
            self.layout(),
            q_,
            k_,
            v_,
            m,
            o,
            l,
            go,
        )?;
        let (dq, dk, dv) = typed_grads(dev, q, k, (g.dq, g.dk, g.dv))?;
        Ok((dq, dk, dv, g.stats))
    }
}

#[cfg(test)]
mod tests {
    //! The decomposition, checked on the host (no GPU): compact blocks hold exactly the
    //! rows SPEC §1 lets each head use, and the chunk relation gives exactly its key sets.
    use super::*;
    use crate::shape::{Options, Pattern};
    use std::collections::BTreeSet;

    /// `map_local` of gpu.cu: compact `(t, j)` -> local `(row, head)` (batch 0).
    fn local(m: &RowMap, t: usize, j: usize) -> (usize, usize) {
        let j = j as i32;
        let o = if m.per_head != 0 {
            (m.ob + j) % m.r
        } else {
            m.fixed
        };
        let row = (m.row0 + o) as usize + t * m.r as usize;
        (row, ((m.hb + j) / m.hdiv) as usize)
    }

    fn plans() -> Vec<(Plan, Layout, usize)> {
        let mut v = Vec::new();
        let scheds: [&[(usize, usize)]; 4] = [
            &[(64, 1)],
            &[(8, 1), (32, 2), (64, 4)],
            &[(16, 2), (64, 8), (64, 2)],
            &[(4, 4), (32, 1), (64, 16)],
        ];
        for sched in scheds {
            for combine in [Combine::Lse, Combine::HeadGroups] {
                for (heads, kv) in [(4, 4), (6, 3), (8, 2)] {
                    for causal in [false, true] {
                        let dims = Dims {
                            batch: 1,
                            seq: 64,
                            heads,
                            kv_heads: kv,
                            head_dim: 2,
                        };
                        let pats: Vec<Pattern> =
                            sched.iter().map(|&(w, r)| Pattern::new(w, r)).collect();
                        let opts = Options::default().causal(causal).combine(combine);
                        let Ok(p) = Plan::new(dims, &pats, opts) else {
                            continue;
                        };
                        for (layout, world) in [
                            (Layout::Contiguous, 2),
                            (Layout::Contiguous, 4),
                            (Layout::Zigzag, 2),
                            (Layout::Zigzag, 4),
                            (Layout::Zigzag, 1),
                        ] {
                            v.push((p.clone(), layout, world));
                        }
                    }
                }
            }
        }
        v
    }

    #[test]
    fn compact_blocks_hold_exactly_the_dilated_rows() {
        let mut spans_seen = 0;
        for (plan, layout, world) in plans() {
            let dm = *plan.dims();
            let geo = Geometry::new(layout, world, dm.seq / world).unwrap();
            let cl = geo.chunk_len();
            // Shapes the GPU ring does not take are covered by the next tests.
            let Ok((_, spans)) = classify(&plan, &geo, false) else {
                continue;
            };
            for s in &spans {
                spans_seen += 1;
                for rank in 0..world {
                    for (c, row0) in geo.chunks_of(rank) {
                        let a = (c * cl / s.w) * s.w; // segment start
                        let qm = row_map(&plan, &geo, s, &s.q, dm.heads, row0);
                        let km = row_map(&plan, &geo, s, &s.kv, dm.kv_heads, row0);
                        // Query side: exactly the (row, head) pairs taking part.
                        let got: BTreeSet<_> = (0..s.m)
                            .flat_map(|t| (0..s.q.hc).map(move |j| (t, j)))
                            .map(|(t, j)| local(&qm, t, j))
                            .collect();
                        let want: BTreeSet<_> = (row0..row0 + cl)
                            .flat_map(|row| (0..dm.heads).map(move |h| (row, h)))
                            .filter(|&(row, h)| {
                                let p = geo.position(rank, row);
                                plan.offset(s.i, h) == Some((p - a) % s.r)
                            })
                            .collect();
                        assert_eq!(got, want, "{plan:?} {layout:?} W={world} pattern {}", s.i);
                        assert_eq!(got.len(), s.m * s.q.hc, "no duplicates");
                        // Key side: compact query head j reads compact kv head
                        // j / (hc_q / hc_kv): the rows and kv head SPEC gives it.
                        let grp = s.q.hc / s.kv.hc;
                        for j in 0..s.q.hc {
                            for t in 0..s.m {
                                let (qrow, h) = local(&qm, t, j);
                                let (krow, g) = local(&km, t, j / grp);
                                assert_eq!(g, h / dm.group(), "kv head of query head {h}");
                                assert_eq!(krow, qrow, "same offset and order");
                            }
                        }
                    }
                }
            }
        }
        assert!(
            spans_seen > 50,
            "the cases exercise spanning patterns ({spans_seen})"
        );
    }

    #[test]
    fn chunk_relation_gives_the_key_sets() {
        for (plan, layout, world) in plans() {
            let geo = Geometry::new(layout, world, plan.dims().seq / world).unwrap();
            let cl = geo.chunk_len();
            let Ok((_, spans)) = classify(&plan, &geo, false) else {
                continue;
            };
            let causal = plan.options().causal;
            for s in &spans {
                for cq in 0..geo.num_chunks() {
                    for ck in 0..geo.num_chunks() {
                        let same = cq * cl / s.w == ck * cl / s.w;
                        // Visible pairs of compact rows (tq, tk) by SPEC: same segment,
                        // causal => key position <= query position.
                        let vis = |tq: usize, tk: usize| {
                            same && (!causal || ck * cl + tk * s.r <= cq * cl + tq * s.r)
                        };
                        let want: Vec<bool> = (0..s.m)
                            .flat_map(|tq| (0..s.m).map(move |tk| (tq, tk)))
                            .map(|(tq, tk)| vis(tq, tk))
                            .collect();
                        let got: Vec<bool> = match relation(&plan, &geo, s, cq, ck) {
                            None => vec![false; s.m * s.m],
                            Some(diag) => (0..s.m)
                                .flat_map(|tq| (0..s.m).map(move |tk| !diag || tk <= tq))
                                .collect(),
                        };
                        assert_eq!(got, want, "{plan:?} chunks {cq} {ck}");
                    }
                }
            }
        }
    }

    #[test]
    fn masks_need_one_offset_per_travelling_block() {
        let geo = Geometry::new(Layout::Zigzag, 2, 256).unwrap();
        let dims = Dims::mha(1, 512, 4, 4);
        let lse = Plan::new(dims, &[Pattern::new(512, 2)], Options::default()).unwrap();
        assert!(classify(&lse, &geo, false).is_ok());
        let e = classify(&lse, &geo, true).unwrap_err().to_string();
        assert!(e.contains("mask") && e.contains("pattern 0"), "{e}");
        let hg = Plan::new(
            dims,
            &[Pattern::new(512, 2)],
            Options::default().combine(Combine::HeadGroups),
        )
        .unwrap();
        assert!(classify(&hg, &geo, true).is_ok());
        let dense = Plan::new(dims, &[Pattern::new(512, 1)], Options::default()).unwrap();
        assert!(classify(&dense, &geo, true).is_ok());
    }

    #[test]
    fn unsupported_shapes_are_errors_naming_the_pattern() {
        // Zigzag, n = 96: chunk 48; 64 neither divides 48 nor is a multiple of it.
        let plan = Plan::new(
            Dims::mha(1, 192, 2, 4),
            &[Pattern::new(64, 1)],
            Options::default(),
        )
        .unwrap();
        let geo = Geometry::new(Layout::Zigzag, 2, 96).unwrap();
        let e = classify(&plan, &geo, false).unwrap_err().to_string();
        assert!(e.contains("pattern 0") && e.contains("48"), "{e}");
        // A spanning pattern whose dilation does not divide the chunk.
        let plan = Plan::new(
            Dims::mha(1, 192, 2, 4),
            &[Pattern::new(192, 5)],
            Options::default(),
        )
        .unwrap();
        let e = classify(&plan, &geo, false).unwrap_err().to_string();
        assert!(e.contains("dilation 5"), "{e}");
    }
}
