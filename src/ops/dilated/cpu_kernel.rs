//! The CPU kernel: blocked online softmax over compact tiles of dilated rows.
//!
//! # Design
//!
//! For pattern `i`, head `h` with offset `o` and segment `s` (start `a`), the rows that
//! take part form an arithmetic progression `a + o + j·r`, `j < m`. The kernel never
//! materialises `N×N` scores or a `w×w` segment matrix: it gathers a tile of `BQ` query
//! rows and walks the key progression in tiles of `BK` rows, keeping the running max,
//! running sum and accumulator of the online softmax (FlashAttention's recurrence).
//! Scratch per worker is `O(BQ·D + BK·D + BQ·BK)`; nothing grows with `N`.
//!
//! Patterns run one after another. Inside a pattern every (batch, position, head) is owned
//! by exactly one work item, so items run in parallel (rayon) and merge their partial
//! `(out_i, lse_i)` straight into the output with the log-sum-exp rule — which is both
//! the LSE combine of SPEC §1a and, with factor `1/G`, the head-group combine of §1b.
//!
//! The inner routines work on [`Prog`]ressions of (buffer row, global position), not on
//! "the whole sequence", so the ring driver reuses them for a local query chunk against a
//! received key block: causal and mask decisions always use global positions.
//!
//! Backward (FlashAttention-2 style, recomputing scores): per pattern, one parallel pass
//! owns key tiles and accumulates `dK`, `dV` over all query tiles that see them; a second
//! pass owns query tiles and accumulates `dQ`. `Δ = dO·O` (or the per-pattern `dO·out_i`
//! with `detach_weights`) is precomputed, one scalar per (batch, position, head).
//!
//! The tile products (`Q·Kᵀ`, `P·V`, `Pᵀ·dO`, `dSᵀ·Q`, `dS·K`) go through the `gemm`
//! crate's single-threaded micro-kernels (runtime CPU dispatch); parallelism is over tiles.
//! For f32 with `D % 16 == 0` on AVX-512 CPUs, `cpu_simd.rs` replaces the per-tile work
//! with its own micro-kernels (its module docs explain the transposed layout), and the
//! single-device passes hand each worker a chunk of up to `CHUNK` (8) tiles of one segment
//! (`forward_chunked`, `backward_chunked`), which share each key tile's packed rows or
//! each query tile's gathered ones; scratch then grows to a few hundred KiB per worker,
//! still nothing with `N`. Where a segment has at most 64 key tiles and there are enough
//! segments to share out, one backward item takes all of a segment's key tiles and also
//! computes its queries' dQ (five tile products per pair instead of seven; up to ~4 MiB of
//! scratch per worker at D = 64), and the second pass is skipped. The chunked and fused
//! passes give bitwise the per-tile results (tested below).

#![allow(clippy::too_many_arguments)]

use crate::dtype::Element;
use crate::shape::Plan;
use rayon::prelude::*;

/// Query rows per tile.
pub(crate) const BQ: usize = 64;
/// Key rows per tile.
pub(crate) const BK: usize = 64;

/// An arithmetic progression of rows: element `j` is buffer row `row0 + j·row_step` at
/// global position `pos0 + j·pos_step`. Positions increase with `j`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Prog {
    pub row0: usize,
    pub row_step: usize,
    pub pos0: usize,
    pub pos_step: usize,
    pub count: usize,
}

impl Prog {
    #[inline(always)]
    pub fn row(&self, j: usize) -> usize {
        self.row0 + j * self.row_step
    }
    #[inline(always)]
    pub fn pos(&self, j: usize) -> usize {
        self.pos0 + j * self.pos_step
    }
    /// Elements `[start, start + len)` of this progression.
    #[inline(always)]
    pub fn sub(&self, start: usize, len: usize) -> Prog {
        Prog {
            row0: self.row(start),
            pos0: self.pos(start),
            count: len,
            ..*self
        }
    }
}

/// A read-only `(batch, rows, heads, D)` buffer.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub heads: usize,
    pub d: usize,
}

impl<T> View<'_, T> {
    #[inline(always)]
    pub fn at(&self, b: usize, row: usize, h: usize) -> usize {
        ((b * self.rows + row) * self.heads + h) * self.d
    }
}

/// A raw pointer shared by workers that write disjoint rows.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
// SAFETY: the pointer is only dereferenced by workers that, by construction of the work
// decomposition (documented at each use), touch disjoint elements; the buffer outlives
// the parallel region because it is borrowed mutably for the whole call.
unsafe impl<T: Send> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SyncPtr<T> {}

/// A mutable `(batch, rows, heads, D)` buffer written through a raw pointer.
#[derive(Clone, Copy)]
pub(crate) struct ViewMut<T> {
    pub ptr: SyncPtr<T>,
    pub len: usize,
    pub rows: usize,
    pub heads: usize,
    pub d: usize,
}

impl<T> ViewMut<T> {
    pub fn new(data: &mut [T], rows: usize, heads: usize, d: usize) -> Self {
        ViewMut {
            ptr: SyncPtr(data.as_mut_ptr()),
            len: data.len(),
            rows,
            heads,
            d,
        }
    }
    #[inline(always)]
    fn at(&self, b: usize, row: usize, h: usize) -> usize {
        ((b * self.rows + row) * self.heads + h) * self.d
    }
    /// # Safety
    /// No other thread may access elements `[at(b,row,h), +d)` during the borrow.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)] // the raw pointer, not `&self`, grants the access
    pub unsafe fn row_mut(&self, b: usize, row: usize, h: usize) -> &mut [T] {
        let i = self.at(b, row, h);
        assert!(i + self.d <= self.len, "row out of bounds");
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.0.add(i), self.d) }
    }
}

/// Everything a forward block needs besides the progressions.
pub(crate) struct FwdCtx<'a, T> {
    pub q: View<'a, T>,
    pub k: View<'a, T>,
    pub v: View<'a, T>,
    /// Key padding mask over the kv buffer's rows: `(batch, rows)`.
    pub kmask: Option<&'a [bool]>,
    pub causal: bool,
    pub scale: T,
    /// Output `(batch, q rows, H, D)` and `L` `(batch, q rows, H)` (with `d = 1`).
    pub out: ViewMut<T>,
    pub lse: ViewMut<T>,
}

/// Per-worker scratch, allocated once per rayon job split.
pub(crate) struct Scratch<T> {
    q: Vec<T>,   // BQ × D (scaled)
    s: Vec<T>,   // BQ × BK
    acc: Vec<T>, // BQ × D
    m: Vec<T>,   // BQ
    l: Vec<T>,   // BQ
    dkt: Vec<T>, // BK × D (backward)
    dvt: Vec<T>, // BK × D (backward)
    go: Vec<T>,  // BQ × D (backward: dO·fac)
    ds: Vec<T>,  // BQ × BK (backward)
    qp: Vec<usize>,
    kp: Vec<usize>,
    kok: Vec<bool>,
    /// The AVX-512 forward path's scratch, when it applies (f32, D % 16 == 0, CPU).
    #[cfg(target_arch = "x86_64")]
    simd: Option<super::cpu_simd::SimdScratch>,
    /// The AVX-512 backward path's scratch (same conditions).
    #[cfg(target_arch = "x86_64")]
    simd_bwd: Option<SimdBwd>,
}

/// The AVX-512 backward's per-worker state: one query tile, one packed key tile, and the
/// tile pair's `Pᵀ`, `dSᵀ`.
#[cfg(target_arch = "x86_64")]
pub(crate) struct SimdBwd {
    bs: super::cpu_simd::SimdBwdScratch,
    q: super::cpu_simd::BwdQ,
    keys: super::cpu_simd::PackedKeys,
}

#[cfg(target_arch = "x86_64")]
impl SimdBwd {
    fn new(d: usize) -> Self {
        SimdBwd {
            bs: super::cpu_simd::SimdBwdScratch::new(),
            q: super::cpu_simd::BwdQ::new(d),
            keys: super::cpu_simd::PackedKeys::new(d),
        }
    }
}

impl<T: Element> Scratch<T> {
    pub fn new(d: usize) -> Self {
        let z = T::zero();
        Scratch {
            q: vec![z; BQ * d],
            s: vec![z; BQ * BK],
            acc: vec![z; BQ * d],
            m: vec![z; BQ],
            l: vec![z; BQ],
            dkt: vec![z; BK * d],
            dvt: vec![z; BK * d],
            go: vec![z; BQ * d],
            ds: vec![z; BQ * BK],
            qp: vec![0; BQ],
            kp: vec![0; BK],
            kok: vec![false; BK],
            #[cfg(target_arch = "x86_64")]
            simd: (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
                && super::cpu_simd::available(d))
            .then(|| super::cpu_simd::SimdScratch::new(d)),
            #[cfg(target_arch = "x86_64")]
            simd_bwd: (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
                && super::cpu_simd::available(d))
            .then(|| SimdBwd::new(d)),
        }
    }
}

/// Gather query rows of `qp` (at most `BQ`) for batch `b`, head `h`, times `mul`.
#[inline]
fn gather_rows<T: Element>(dst: &mut [T], src: View<'_, T>, b: usize, h: usize, p: &Prog, mul: T) {
    let d = src.d;
    for j in 0..p.count {
        let s = &src.data[src.at(b, p.row(j), h)..][..d];
        for (x, y) in dst[j * d..(j + 1) * d].iter_mut().zip(s) {
            *x = *y * mul;
        }
    }
}

/// `dst (m×n, row stride dst_rs) (+)= lhs (m×k) · rhs (k×n)`, strides in elements
/// (`*_rs` between rows, `*_cs` between columns). Runs the `gemm` crate's
/// runtime-dispatched (AVX2/AVX-512/NEON) micro-kernels on one thread: the parallelism
/// is over tiles, one level up.
#[allow(clippy::too_many_arguments)]
#[inline]
fn mm<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(T::zero());
            }
        }
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(last(dst_rs, 1, m, n) < dst.len(), "mm: dst too small");
    assert!(last(lhs_rs, lhs_cs, m, k) < lhs.len(), "mm: lhs too small");
    assert!(last(rhs_rs, rhs_cs, k, n) < rhs.len(), "mm: rhs too small");
    // SAFETY: the three asserts above prove every element the (m, n, k) product touches
    // lies inside its slice; `dst` is borrowed mutably and cannot alias `lhs`/`rhs`. T is
    // f32 or f64 (the `Element` impls), both supported by `gemm`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The rows of progression `p` (batch `b`, head `g`) of `src`, in place: the slice
/// starting at the first row and the element stride between consecutive rows. Tile
/// products read K and V through this view, so key rows are never copied.
#[inline(always)]
fn rows_view<'a, T>(src: View<'a, T>, b: usize, g: usize, p: &Prog) -> (&'a [T], usize) {
    let start = src.at(b, p.row0, g);
    (&src.data[start..], p.row_step * src.heads * src.d)
}

/// `S[i, j] = sum_d Q[i, d] · K[j, d]` for `i < bq`, `j < bk`; row `j` of K is
/// `k[j·ks..][..d]`.
#[inline]
fn scores<T: Element>(
    s: &mut [T],
    q: &[T],
    (k, ks): (&[T], usize),
    bq: usize,
    bk: usize,
    d: usize,
) {
    mm((bq, bk, d), s, BK, false, q, (d, 1), k, (1, ks));
}

/// Maximum of a row, in eight independent lanes so that it vectorises.
#[inline]
fn row_max<T: Element>(row: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); 8];
    let mut it = row.chunks_exact(8);
    for c in &mut it {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    let mut m = T::neg_infinity();
    for &x in lanes.iter().chain(it.remainder()) {
        m = if x > m { x } else { m };
    }
    m
}

/// Set masked scores to `-inf`: key invalid, or causal future.
#[inline]
fn apply_mask<T: Element>(s: &mut [T], qpos: &[usize], kpos: &[usize], kok: &[bool], causal: bool) {
    let ninf = T::neg_infinity();
    let (Some(&kmax), Some(&qmin)) = (kpos.last(), qpos.first()) else {
        return;
    };
    if kok.iter().all(|&x| x) && (!causal || kmax <= qmin) {
        return; // nothing masked in this tile (positions increase along both sides)
    }
    for (i, &qp) in qpos.iter().enumerate() {
        let row = &mut s[i * BK..i * BK + kpos.len()];
        for ((x, &kp), &ok) in row.iter_mut().zip(kpos).zip(kok) {
            if !ok || (causal && kp > qp) {
                *x = ninf;
            }
        }
    }
}

/// Fill `kpos`, `kok` (mask only) for the key tile.
#[inline]
fn key_meta(
    kpos: &mut [usize],
    kok: &mut [bool],
    kmask: Option<&[bool]>,
    rows: usize,
    b: usize,
    p: &Prog,
) {
    for j in 0..p.count {
        kpos[j] = p.pos(j);
        kok[j] = kmask.is_none_or(|m| m[b * rows + p.row(j)]);
    }
}

/// Forward of one query tile `qp` (at most `BQ` rows) of head `h` against the key
/// progression `kp` (kv head `g`), merged into `out`/`lse` with factor `fac`.
///
/// # Safety
/// No other thread may touch the `out`/`lse` rows of `(b, qp rows, h)` during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn fwd_tile<T: Element>(
    sc: &mut Scratch<T>,
    cx: &FwdCtx<'_, T>,
    b: usize,
    h: usize,
    g: usize,
    qp: Prog,
    kp: Prog,
    fac: T,
) {
    fwd_accumulate(sc, cx, b, h, g, qp, kp);
    // SAFETY: forwarded contract.
    unsafe { merge_tile(sc, cx, b, h, qp, fac) };
}

/// Online-softmax accumulation of one query tile against a key progression. On return,
/// for tile row `i`: `sc.m[i]` running max, `sc.l[i]` sum (0 if no key), `sc.acc` the
/// unnormalised output.
pub(crate) fn fwd_accumulate<T: Element>(
    sc: &mut Scratch<T>,
    cx: &FwdCtx<'_, T>,
    b: usize,
    h: usize,
    g: usize,
    qp: Prog,
    kp: Prog,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(ss) = sc.simd.as_mut() {
        // `simd` is only built when T is f32 (TypeId checked in Scratch::new).
        let t = tile_in(cx);
        // SAFETY: `simd` exists only when `cpu_simd::available(d)` held.
        unsafe {
            super::cpu_simd::fwd_accumulate(
                ss,
                &t,
                (b, h, g),
                qp,
                kp,
                f32s_mut(&mut sc.m),
                f32s_mut(&mut sc.l),
                f32s_mut(&mut sc.acc),
            )
        };
        return;
    }
    let d = cx.q.d;
    let bq = qp.count;
    debug_assert!(bq <= BQ);
    let ninf = T::neg_infinity();
    gather_rows(&mut sc.q, cx.q, b, h, &qp, cx.scale);
    for j in 0..bq {
        sc.qp[j] = qp.pos(j);
    }
    let qmax = sc.qp[bq - 1];
    sc.m[..bq].fill(ninf);
    sc.l[..bq].fill(T::zero());
    sc.acc[..bq * d].fill(T::zero());

    let mut k0 = 0;
    while k0 < kp.count {
        let bk = BK.min(kp.count - k0);
        let kt = kp.sub(k0, bk);
        if cx.causal && kt.pos0 > qmax {
            break; // positions increase: every later key is in the future
        }
        key_meta(&mut sc.kp, &mut sc.kok, cx.kmask, cx.k.rows, b, &kt);
        scores(&mut sc.s, &sc.q, rows_view(cx.k, b, g, &kt), bq, bk, d);
        apply_mask(
            &mut sc.s,
            &sc.qp[..bq],
            &sc.kp[..bk],
            &sc.kok[..bk],
            cx.causal,
        );
        for i in 0..bq {
            let row = &mut sc.s[i * BK..i * BK + bk];
            let mx = row_max(row);
            let m_new = sc.m[i].max(mx);
            if m_new == ninf {
                row.fill(T::zero()); // nothing valid yet for this query: P = 0
                continue;
            }
            let alpha = (sc.m[i] - m_new).exp();
            let sum = T::exp_sub_sum(row, m_new);
            sc.l[i] = sc.l[i] * alpha + sum;
            sc.m[i] = m_new;
            let acc = &mut sc.acc[i * d..(i + 1) * d];
            if alpha != T::one() {
                for a in acc.iter_mut() {
                    *a *= alpha;
                }
            }
        }
        // acc += P · V (rows with nothing valid yet hold P = 0).
        let (vrows, vs) = rows_view(cx.v, b, g, &kt);
        mm(
            (bq, d, bk),
            &mut sc.acc,
            d,
            true,
            &sc.s,
            (BK, 1),
            vrows,
            (vs, 1),
        );
        k0 += bk;
    }
}

/// Merge a tile's accumulated `(out_i, lse_i)` into `out`/`lse` with the log-sum-exp rule,
/// `out_i` weighted by `fac`.
///
/// # Safety
/// No other thread may touch the `out`/`lse` rows of `(b, qp rows, h)` during the call.
pub(crate) unsafe fn merge_tile<T: Element>(
    sc: &Scratch<T>,
    cx: &FwdCtx<'_, T>,
    b: usize,
    h: usize,
    qp: Prog,
    fac: T,
) {
    // SAFETY: forwarded contract.
    unsafe { merge_rows((&sc.m, &sc.l, &sc.acc), cx, b, h, qp, fac) }
}

/// [`merge_tile`] from a tile's running max `m`, sum `l` and unnormalised output `acc`.
///
/// # Safety
/// As [`merge_tile`].
unsafe fn merge_rows<T: Element>(
    (m, l_sum, acc_all): (&[T], &[T], &[T]),
    cx: &FwdCtx<'_, T>,
    b: usize,
    h: usize,
    qp: Prog,
    fac: T,
) {
    let d = cx.q.d;
    let ninf = T::neg_infinity();
    for i in 0..qp.count {
        if l_sum[i] == T::zero() {
            continue; // empty key set: lse_i = -inf, out_i = 0, nothing to merge
        }
        let lse_i = m[i] + l_sum[i].ln();
        let row = qp.row(i);
        // SAFETY: exclusivity of (b, row, h) is this function's contract.
        let (o, l) = unsafe { (cx.out.row_mut(b, row, h), cx.lse.row_mut(b, row, h)) };
        let l_old = l[0];
        let l_new = if l_old == ninf {
            lse_i
        } else {
            let mx = l_old.max(lse_i);
            mx + ((l_old - mx).exp() + (lse_i - mx).exp()).ln()
        };
        let w_old = if l_old == ninf {
            T::zero()
        } else {
            (l_old - l_new).exp()
        };
        let w_new = (lse_i - l_new).exp() * fac / l_sum[i];
        let acc = &acc_all[i * d..(i + 1) * d];
        for (x, &a) in o.iter_mut().zip(acc) {
            *x = *x * w_old + a * w_new;
        }
        l[0] = l_new;
    }
}

/// The whole single-device forward: `out`, `lse` are overwritten.
pub(crate) fn forward<T: Element>(
    plan: &Plan,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
    out: &mut [T],
    lse: &mut [T],
) {
    forward_with(plan, [q, k, v], mask, (out, lse), true);
}

/// [`forward`], with `chunked = false` forcing one query tile per work item (the
/// per-tile path the chunked one must reproduce bit for bit; tested below).
fn forward_with<T: Element>(
    plan: &Plan,
    [q, k, v]: [&[T]; 3],
    mask: Option<&[bool]>,
    (out, lse): (&mut [T], &mut [T]),
    chunked: bool,
) {
    let dm = *plan.dims();
    out.fill(T::zero());
    lse.fill(T::neg_infinity());
    let (n, d) = (dm.seq, dm.head_dim);
    let cx = FwdCtx {
        q: View {
            data: q,
            rows: n,
            heads: dm.heads,
            d,
        },
        k: View {
            data: k,
            rows: n,
            heads: dm.kv_heads,
            d,
        },
        v: View {
            data: v,
            rows: n,
            heads: dm.kv_heads,
            d,
        },
        kmask: mask,
        causal: plan.options().causal,
        scale: T::of(plan.scale()),
        out: ViewMut::new(out, n, dm.heads, d),
        lse: ViewMut::new(lse, n, dm.heads, 1),
    };
    let fac = T::of(plan.pattern_factor());
    #[cfg(target_arch = "x86_64")]
    if chunked
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && super::cpu_simd::available(d)
    {
        forward_chunked(plan, &cx, fac);
        return;
    }
    let _ = chunked;
    for i in 0..plan.num_patterns() {
        let total = query_tiles(plan, i);
        (0..total).into_par_iter().for_each_init(
            || Scratch::new(d),
            |sc, item| {
                let Some(QueryTile { b, h, qp, kp }) = query_tile(plan, i, item) else {
                    return;
                };
                // SAFETY: within pattern i, the item (b, h, s, qt) is the only one that
                // covers rows a + (qt·BQ + j)·r of head h in batch b.
                unsafe { fwd_tile(sc, &cx, b, h, h / dm.group(), qp, kp, fac) };
            },
        );
    }
}

/// [`forward`] on the AVX-512 path (`T` = f32): work items are chunks of up to
/// [`CHUNK`] query tiles of one (batch, head, segment), which share each packed key tile
/// ([`super::cpu_simd::fwd_chunk`]). The input rows of a head lie `H·D` floats apart, a
/// stride that maps a segment's rows onto a few cache sets: one tile per item re-read
/// every key tile from beyond L2 for each of its query tiles.
#[cfg(target_arch = "x86_64")]
fn forward_chunked<T: Element>(plan: &Plan, cx: &FwdCtx<'_, T>, fac: T) {
    let dm = *plan.dims();
    let d = dm.head_dim;
    let t = tile_in(cx);
    for i in 0..plan.num_patterns() {
        let chunks = QueryChunks::new(plan, i);
        (0..chunks.items).into_par_iter().for_each_init(
            || super::cpu_simd::SimdScratch::new(d),
            |ss, item| {
                let mut qps = [Prog::default(); CHUNK];
                let Some((QueryTile { b, h, kp, .. }, n)) = chunks.tiles(plan, i, item, &mut qps)
                else {
                    return;
                };
                // SAFETY: `SimdScratch` exists only where `cpu_simd::available(d)` held
                // (checked by the caller); every tile has 1..=BQ rows.
                unsafe {
                    super::cpu_simd::fwd_chunk(ss, &t, (b, h, h / dm.group()), &qps[..n], kp)
                };
                for (st, qp) in ss.tiles().iter().zip(&qps[..n]) {
                    let bq = qp.count;
                    // SAFETY: within pattern i, the tile (b, h, s, qt) is the only one that
                    // covers its rows of head h in batch b.
                    unsafe {
                        merge_rows(
                            (ts(&st.mx[..bq]), ts(&st.l[..bq]), ts(&st.acc[..bq * d])),
                            cx,
                            b,
                            h,
                            *qp,
                            fac,
                        )
                    };
                }
            },
        );
    }
}

/// Query tiles per work item of [`forward_chunked`].
#[cfg(target_arch = "x86_64")]
const CHUNK: usize = 8;

/// Tiles per chunk where `total` tiles, at most `per_segment` in one segment, go to the
/// workers: about four items per worker, at most [`CHUNK`] tiles, within one segment.
#[cfg(target_arch = "x86_64")]
fn chunk_len(total: usize, per_segment: usize) -> usize {
    (total / (4 * rayon::current_num_threads()).max(1)).clamp(1, CHUNK.min(per_segment))
}

/// The work items of a chunked pass over the query tiles of pattern `i`: chunks of
/// consecutive tiles of one (batch, head, segment), in [`query_tile`]'s order.
#[cfg(target_arch = "x86_64")]
struct QueryChunks {
    /// Query tiles per segment.
    nqt: usize,
    /// Tiles per chunk.
    chunk: usize,
    /// Chunks per segment.
    nch: usize,
    /// Work items of the pass.
    items: usize,
}

#[cfg(target_arch = "x86_64")]
impl QueryChunks {
    fn new(plan: &Plan, i: usize) -> Self {
        let p = plan.patterns()[i];
        let nqt = p.segment.div_ceil(p.dilation).div_ceil(BQ);
        let total = query_tiles(plan, i);
        let chunk = chunk_len(total, nqt);
        let nch = nqt.div_ceil(chunk);
        QueryChunks {
            nqt,
            chunk,
            nch,
            items: total / nqt * nch,
        }
    }

    /// Item `item`'s query tiles into `qps`: the first tile (its batch, head and key
    /// progression are every tile's) and their count; `None` where the item has none.
    fn tiles(
        &self,
        plan: &Plan,
        i: usize,
        item: usize,
        qps: &mut [Prog; CHUNK],
    ) -> Option<(QueryTile, usize)> {
        let (seg, c) = (item / self.nch, item % self.nch);
        let mut first = None;
        let mut n = 0;
        for qt in c * self.chunk..((c + 1) * self.chunk).min(self.nqt) {
            if let Some(tile) = query_tile(plan, i, seg * self.nqt + qt) {
                qps[n] = tile.qp;
                first.get_or_insert(tile);
                n += 1;
            }
        }
        first.map(|tile| (tile, n))
    }
}

/// Work item `item` of a per-pattern pass over query tiles: items enumerate
/// `(batch, head, segment, query tile)` with the tile index fastest.
pub(crate) struct QueryTile {
    pub b: usize,
    pub h: usize,
    /// The tile's query rows (at most `BQ`).
    pub qp: Prog,
    /// The whole key progression of the tile's segment and offset.
    pub kp: Prog,
}

/// Number of work items of [`query_tile`] for pattern `i`.
pub(crate) fn query_tiles(plan: &Plan, i: usize) -> usize {
    let dm = plan.dims();
    let p = plan.patterns()[i];
    let nqt = p.segment.div_ceil(p.dilation).div_ceil(BQ);
    dm.batch * dm.heads * (dm.seq / p.segment) * nqt
}

/// Decode work item `item` of pattern `i`; `None` if the head takes no part or the tile
/// lies past the dilated rows of its offset.
#[inline]
pub(crate) fn query_tile(plan: &Plan, i: usize, item: usize) -> Option<QueryTile> {
    let dm = plan.dims();
    let p = plan.patterns()[i];
    let (w, r) = (p.segment, p.dilation);
    let nseg = dm.seq / w;
    let nqt = w.div_ceil(r).div_ceil(BQ);
    let qt = item % nqt;
    let s = (item / nqt) % nseg;
    let h = (item / (nqt * nseg)) % dm.heads;
    let b = item / (nqt * nseg * dm.heads);
    let o = plan.offset(i, h)?;
    let m = plan.rows_per_segment(i, o);
    if qt * BQ >= m {
        return None;
    }
    let a = s * w + o;
    let kp = Prog {
        row0: a,
        row_step: r,
        pos0: a,
        pos_step: r,
        count: m,
    };
    let qp = kp.sub(qt * BQ, BQ.min(m - qt * BQ));
    Some(QueryTile { b, h, qp, kp })
}

/// `&[T]` as `&[f32]` when `T` is `f32` (the fast paths only exist then).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn f32s<T: 'static>(x: &[T]) -> &[f32] {
    assert!(std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>());
    // SAFETY: T is f32 (asserted), so this is the identity.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) }
}

/// `&[f32]` as `&[T]` when `T` is `f32`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn ts<T: 'static>(x: &[f32]) -> &[T] {
    assert!(std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>());
    // SAFETY: T is f32 (asserted), so this is the identity.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<T>(), x.len()) }
}

/// `&mut [T]` as `&mut [f32]` when `T` is `f32`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn f32s_mut<T: 'static>(x: &mut [T]) -> &mut [f32] {
    assert!(std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>());
    // SAFETY: T is f32 (asserted), so this is the identity.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) }
}

/// The fast forward's view of a context (`T` = f32).
#[cfg(target_arch = "x86_64")]
fn tile_in<'a, T: Element>(cx: &FwdCtx<'a, T>) -> super::cpu_simd::TileIn<'a> {
    super::cpu_simd::TileIn {
        q: view_f32(cx.q),
        kv: kv_in(cx.k, cx.v, cx.kmask),
        causal: cx.causal,
        scale: cx.scale.f64() as f32,
    }
}

/// The fast paths' view of the key side (`T` = f32).
#[cfg(target_arch = "x86_64")]
fn kv_in<'a, T: 'static>(
    k: View<'a, T>,
    v: View<'a, T>,
    kmask: Option<&'a [bool]>,
) -> super::cpu_simd::KvIn<'a> {
    super::cpu_simd::KvIn {
        k: view_f32(k),
        v: view_f32(v),
        kmask,
    }
}

/// The fast backward's view of a context's key side (`T` = f32).
#[cfg(target_arch = "x86_64")]
fn bwd_in<'a, T: Element>(cx: &BwdCtx<'a, T>) -> super::cpu_simd::KvIn<'a> {
    kv_in(cx.k, cx.v, cx.kmask)
}

/// A `View<T>` as a `View<f32>` when `T` is `f32`.
#[cfg(target_arch = "x86_64")]
fn view_f32<T: 'static>(v: View<'_, T>) -> View<'_, f32> {
    View {
        data: f32s(v.data),
        rows: v.rows,
        heads: v.heads,
        d: v.d,
    }
}

/// Load the fast backward's query side for tile `qp` (after `load_q_side`).
#[cfg(target_arch = "x86_64")]
fn simd_load_q<T: Element>(
    bs: &mut super::cpu_simd::BwdQ,
    sc: &Scratch<T>,
    cx: &BwdCtx<'_, T>,
    b: usize,
    h: usize,
    qp: &Prog,
) {
    let mut lse = [0.0f32; BQ];
    let mut delta = [0.0f32; BQ];
    for i in 0..qp.count {
        let row = qp.row(i);
        lse[i] = cx.lse.data[cx.lse.at(b, row, h)].f64() as f32;
        delta[i] = cx.delta.data[cx.delta.at(b, row, h)].f64() as f32;
    }
    super::cpu_simd::bwd_load_q(bs, f32s(&sc.q), f32s(&sc.go), &lse, &delta, qp, cx.q.d);
}

/// Everything a backward block needs.
pub(crate) struct BwdCtx<'a, T> {
    pub q: View<'a, T>,
    pub k: View<'a, T>,
    pub v: View<'a, T>,
    pub kmask: Option<&'a [bool]>,
    pub causal: bool,
    pub scale: T,
    /// Upstream gradient `(batch, q rows, H, D)`.
    pub go: View<'a, T>,
    /// Saved `L` `(batch, q rows, H)` (`d = 1`).
    pub lse: View<'a, T>,
    /// `Δ` `(batch, q rows, H)` (`d = 1`).
    pub delta: View<'a, T>,
    /// Factor on the upstream gradient (1 or `1/G`).
    pub fac: T,
}

/// Recompute `P = exp(S - L)` and `dS = P·(dO'·v - Δ)` for one (query tile, key tile)
/// pair. On return `sc.s` holds `P` and `ds` holds `dS`.
/// Requires `sc.q` (scaled Q), `sc.go` (dO'), `sc.kt`, `sc.vt`, key meta set.
#[inline]
fn p_ds<T: Element>(
    sc: &mut Scratch<T>,
    cx: &BwdCtx<'_, T>,
    (b, h, g): (usize, usize, usize),
    qp: &Prog,
    kt: &Prog,
    ds: &mut [T],
) {
    let d = cx.q.d;
    let bq = qp.count;
    let bk = kt.count;
    scores(&mut sc.s, &sc.q, rows_view(cx.k, b, g, kt), bq, bk, d);
    apply_mask(
        &mut sc.s,
        &sc.qp[..bq],
        &sc.kp[..bk],
        &sc.kok[..bk],
        cx.causal,
    );
    // dP = dO' · Vᵀ into ds.
    scores(ds, &sc.go, rows_view(cx.v, b, g, kt), bq, bk, d);
    for i in 0..bq {
        let row = qp.row(i);
        let l = cx.lse.data[cx.lse.at(b, row, h)];
        let delta = cx.delta.data[cx.delta.at(b, row, h)];
        let srow = &mut sc.s[i * BK..i * BK + bk];
        let drow = &mut ds[i * BK..i * BK + bk];
        if l == T::neg_infinity() {
            srow.fill(T::zero());
            drow.fill(T::zero());
            continue;
        }
        T::exp_sub_sum(srow, l);
        for (x, y) in srow.iter().zip(drow.iter_mut()) {
            *y = *x * (*y - delta);
        }
    }
}

/// Load the query-side tiles for backward: scaled Q, dO', positions.
#[inline]
fn load_q_side<T: Element>(sc: &mut Scratch<T>, cx: &BwdCtx<'_, T>, b: usize, h: usize, qp: &Prog) {
    gather_rows(&mut sc.q, cx.q, b, h, qp, cx.scale);
    gather_rows(&mut sc.go, cx.go, b, h, qp, cx.fac);
    for j in 0..qp.count {
        sc.qp[j] = qp.pos(j);
    }
}

/// Load the key-side tiles for backward: Kᵀ, Vᵀ, K rows (for dQ), meta.
#[inline]
fn load_k_side<T: Element>(sc: &mut Scratch<T>, cx: &BwdCtx<'_, T>, b: usize, kt: &Prog) {
    key_meta(&mut sc.kp, &mut sc.kok, cx.kmask, cx.k.rows, b, kt);
}

/// `dK`, `dV` of the key tile `kt` (at most `BK` rows, kv head `g`) from the query
/// progressions `qps` (each with its head). Accumulates into `dk`, `dv` rows.
///
/// # Safety
/// No other thread may touch the `dk`/`dv` rows of `(b, kt rows, g)` during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bwd_kv_tile<T: Element>(
    sc: &mut Scratch<T>,
    cx: &BwdCtx<'_, T>,
    b: usize,
    g: usize,
    kt: Prog,
    qps: &[(usize, Prog)],
    dk: &ViewMut<T>,
    dv: &ViewMut<T>,
) {
    let d = cx.q.d;
    let bk = kt.count;
    load_k_side(sc, cx, b, &kt);
    let kmin = kt.pos0;
    sc.dkt[..bk * d].fill(T::zero());
    sc.dvt[..bk * d].fill(T::zero());
    let mut ds = std::mem::take(&mut sc.ds);
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = sc.simd_bwd.as_mut() {
        // SAFETY: `simd_bwd` exists only when `cpu_simd::available(d)` held; kt is a
        // tile of at most BK rows inside the inputs.
        unsafe { super::cpu_simd::pack_keys(&mut f.keys, &bwd_in(cx), (b, g), &kt) };
    }
    for &(h, qfull) in qps {
        let mut q0 = 0;
        // Causal: skip query tiles entirely before the key tile.
        if cx.causal {
            while q0 < qfull.count && qfull.pos((q0 + BQ).min(qfull.count) - 1) < kmin {
                q0 += BQ;
            }
        }
        while q0 < qfull.count {
            let bq = BQ.min(qfull.count - q0);
            let qp = qfull.sub(q0, bq);
            load_q_side(sc, cx, b, h, &qp);
            #[cfg(target_arch = "x86_64")]
            if let Some(mut f) = sc.simd_bwd.take() {
                simd_load_q(&mut f.q, sc, cx, b, h, &qp);
                // SAFETY: `simd_bwd` exists only when `cpu_simd::available(d)` held; its
                // keys were packed for kt above.
                unsafe {
                    super::cpu_simd::bwd_p_ds(&mut f.bs, &f.q, &f.keys, cx.causal, d);
                    let (dvt, dkt) = (&mut sc.dvt, &mut sc.dkt);
                    super::cpu_simd::bwd_acc_kv(
                        &f.bs,
                        bq,
                        f32s_mut(dvt),
                        f32s_mut(dkt),
                        f32s(&sc.go),
                        f32s(&sc.q),
                        bk,
                        d,
                    );
                }
                sc.simd_bwd = Some(f);
                q0 += bq;
                continue;
            }
            p_ds(sc, cx, (b, h, g), &qp, &kt, &mut ds);
            // dV += Pᵀ · dO';  dK += dSᵀ · (scale·Q)  (q is pre-scaled).
            mm(
                (bk, d, bq),
                &mut sc.dvt,
                d,
                true,
                &sc.s,
                (1, BK),
                &sc.go,
                (d, 1),
            );
            mm(
                (bk, d, bq),
                &mut sc.dkt,
                d,
                true,
                &ds,
                (1, BK),
                &sc.q,
                (d, 1),
            );
            q0 += bq;
        }
    }
    sc.ds = ds;
    for j in 0..bk {
        let row = kt.row(j);
        // SAFETY: exclusivity of (b, row, g) is this function's contract.
        let (dkr, dvr) = unsafe { (dk.row_mut(b, row, g), dv.row_mut(b, row, g)) };
        for (x, &y) in dkr.iter_mut().zip(&sc.dkt[j * d..(j + 1) * d]) {
            *x += y;
        }
        for (x, &y) in dvr.iter_mut().zip(&sc.dvt[j * d..(j + 1) * d]) {
            *x += y;
        }
    }
}

/// `dQ` of the query tile `qp` (head `h`, kv head `g`) from the key progression `kp`.
///
/// # Safety
/// No other thread may touch the `dq` rows of `(b, qp rows, h)` during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bwd_q_tile<T: Element>(
    sc: &mut Scratch<T>,
    cx: &BwdCtx<'_, T>,
    b: usize,
    h: usize,
    g: usize,
    qp: Prog,
    kp: Prog,
    dq: &ViewMut<T>,
) {
    let d = cx.q.d;
    let bq = qp.count;
    load_q_side(sc, cx, b, h, &qp);
    let qmax = qp.pos(bq - 1);
    let mut dqt = std::mem::take(&mut sc.dkt); // BQ × D ≤ BK × D
    dqt[..bq * d].fill(T::zero());
    #[cfg(target_arch = "x86_64")]
    let mut fast = sc.simd_bwd.take();
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = fast.as_mut() {
        simd_load_q(&mut f.q, sc, cx, b, h, &qp);
    }
    let mut ds = std::mem::take(&mut sc.ds);
    let mut k0 = 0;
    while k0 < kp.count {
        let bk = BK.min(kp.count - k0);
        let kt = kp.sub(k0, bk);
        if cx.causal && kt.pos0 > qmax {
            break;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = fast.as_mut() {
            // SAFETY: `simd_bwd` exists only when `cpu_simd::available(d)` held.
            unsafe {
                super::cpu_simd::pack_keys(&mut f.keys, &bwd_in(cx), (b, g), &kt);
                super::cpu_simd::bwd_p_ds(&mut f.bs, &f.q, &f.keys, cx.causal, d);
                super::cpu_simd::bwd_acc_q(&f.bs, bq, f32s_mut(&mut dqt), &f.keys, d);
            }
            k0 += bk;
            continue;
        }
        load_k_side(sc, cx, b, &kt);
        p_ds(sc, cx, (b, h, g), &qp, &kt, &mut ds);
        // dQ += dS · K (scaled once at the end).
        let (krows, ks) = rows_view(cx.k, b, g, &kt);
        mm((bq, d, bk), &mut dqt, d, true, &ds, (BK, 1), krows, (ks, 1));
        k0 += bk;
    }
    for i in 0..bq {
        // SAFETY: exclusivity of (b, row, h) is this function's contract.
        let r = unsafe { dq.row_mut(b, qp.row(i), h) };
        for (x, &y) in r.iter_mut().zip(&dqt[i * d..(i + 1) * d]) {
            *x += y * cx.scale;
        }
    }
    sc.ds = ds;
    sc.dkt = dqt;
    #[cfg(target_arch = "x86_64")]
    {
        sc.simd_bwd = fast;
    }
}

/// `Δ = rowsum(dO ∘ O)` per (batch, row, head).
pub(crate) fn delta_full<T: Element>(go: &[T], out: &[T], d: usize, delta: &mut [T]) {
    delta
        .par_chunks_mut(1024)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (k, x) in chunk.iter_mut().enumerate() {
                let i = (c * 1024 + k) * d;
                *x = go[i..i + d]
                    .iter()
                    .zip(&out[i..i + d])
                    .map(|(a, b)| *a * *b)
                    .sum();
            }
        });
}

/// The whole single-device backward. `dq`, `dk`, `dv` are overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Element>(
    plan: &Plan,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
    out: &[T],
    lse: &[T],
    go: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    backward_with(
        plan,
        [q, k, v],
        mask,
        (out, lse, go),
        [dq, dk, dv],
        BwdPath::Auto,
    );
}

/// Which work decomposition [`backward_with`] uses (the tests pin each; all give the same
/// bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // `Chunked` and `Fused` are pinned by tests only
enum BwdPath {
    /// One tile per work item in both passes.
    PerTile,
    /// Chunks in both passes (AVX-512 path), never the fused pass A.
    Chunked,
    /// Chunks, with pass A fused (dQ too) wherever a segment's key tiles fit one chunk.
    Fused,
    /// [`BwdPath::Fused`] where the segments also keep the workers busy, else `Chunked`.
    Auto,
}

/// [`backward`] along `path` (the per-tile path is what the chunked and fused ones must
/// reproduce bit for bit; tested below).
fn backward_with<T: Element>(
    plan: &Plan,
    [q, k, v]: [&[T]; 3],
    mask: Option<&[bool]>,
    (out, lse, go): (&[T], &[T], &[T]),
    [dq, dk, dv]: [&mut [T]; 3],
    path: BwdPath,
) {
    let _ = path;
    let dm = *plan.dims();
    let (n, d) = (dm.seq, dm.head_dim);
    dq.fill(T::zero());
    dk.fill(T::zero());
    dv.fill(T::zero());
    let detach =
        plan.options().detach_weights && plan.options().combine == crate::shape::Combine::Lse;
    let mut delta = vec![T::zero(); dm.lse_len()];
    if !detach {
        delta_full(go, out, d, &mut delta);
    }
    let qv = View {
        data: q,
        rows: n,
        heads: dm.heads,
        d,
    };
    let kv = View {
        data: k,
        rows: n,
        heads: dm.kv_heads,
        d,
    };
    let vv = View {
        data: v,
        rows: n,
        heads: dm.kv_heads,
        d,
    };
    let dqv = ViewMut::new(dq, n, dm.heads, d);
    let dkv = ViewMut::new(dk, n, dm.kv_heads, d);
    let dvv = ViewMut::new(dv, n, dm.kv_heads, d);
    let fac = T::of(plan.pattern_factor());
    let group = dm.group();
    for (i, pat) in plan.patterns().iter().enumerate() {
        let (w, r) = (pat.segment, pat.dilation);
        let nseg = n / w;
        if detach {
            pattern_delta(plan, i, q, k, v, mask, go, &mut delta);
        }
        let cx = BwdCtx {
            q: qv,
            k: kv,
            v: vv,
            kmask: mask,
            causal: plan.options().causal,
            scale: T::of(plan.scale()),
            go: View {
                data: go,
                rows: n,
                heads: dm.heads,
                d,
            },
            lse: View {
                data: lse,
                rows: n,
                heads: dm.heads,
                d: 1,
            },
            delta: View {
                data: &delta,
                rows: n,
                heads: dm.heads,
                d: 1,
            },
            fac,
        };
        // Distinct offsets per kv head (at most H/Hkv of them).
        let offsets: Vec<Vec<usize>> = (0..dm.kv_heads)
            .map(|g| {
                let mut os: Vec<usize> = (g * group..(g + 1) * group)
                    .filter_map(|h| plan.offset(i, h))
                    .collect();
                os.sort_unstable();
                os.dedup();
                os
            })
            .collect();
        let nkt = w.div_ceil(r).div_ceil(BK);
        #[cfg(target_arch = "x86_64")]
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && super::cpu_simd::available(d)
            && path != BwdPath::PerTile
        {
            backward_chunked(plan, i, &cx, &offsets, (&dqv, &dkv, &dvv), path);
            continue;
        }
        // Pass A: dK, dV. Item = (b, g, offset slot, segment, key tile).
        let total = dm.batch * dm.kv_heads * group * nseg * nkt;
        (0..total).into_par_iter().for_each_init(
            || (Scratch::new(d), Vec::with_capacity(group)),
            |(sc, qps), item| {
                let Some(KvItem {
                    b,
                    g,
                    inner: kt_i,
                    full,
                }) = kv_item(plan, i, &offsets, nkt, item, qps)
                else {
                    return;
                };
                let m = full.count;
                if kt_i * BK >= m {
                    return;
                }
                let kt = full.sub(kt_i * BK, BK.min(m - kt_i * BK));
                // SAFETY: within pattern i, rows a + j·r (this tile's j) of kv head g in
                // batch b belong to exactly this (b, g, offset, s, tile) item.
                unsafe { bwd_kv_tile(sc, &cx, b, g, kt, qps, &dkv, &dvv) };
            },
        );
        // Pass B: dQ. Item = (b, h, segment, query tile).
        let total = query_tiles(plan, i);
        (0..total).into_par_iter().for_each_init(
            || Scratch::new(d),
            |sc, item| {
                let Some(QueryTile { b, h, qp, kp }) = query_tile(plan, i, item) else {
                    return;
                };
                // SAFETY: the item (b, h, s, qt) is the only one covering these dq rows.
                unsafe { bwd_q_tile(sc, &cx, b, h, h / group, qp, kp, &dqv) };
            },
        );
    }
}

/// A work item of pass A (dK, dV) of pattern `i`: batch `b`, kv head `g`, the key
/// progression `full` of one (offset, segment), and the item's index `inner` within it.
struct KvItem {
    b: usize,
    g: usize,
    inner: usize,
    full: Prog,
}

/// Decode pass-A item `item`, which enumerates `(b, g, offset slot, segment, inner)` with
/// `inner` (`ninner` values) fastest, and list in `qps` the heads of kv head `g` that
/// take that offset (each with the segment's progression). `None` where kv head `g` has
/// fewer offsets than the slot.
fn kv_item(
    plan: &Plan,
    i: usize,
    offsets: &[Vec<usize>],
    ninner: usize,
    item: usize,
    qps: &mut Vec<(usize, Prog)>,
) -> Option<KvItem> {
    let dm = plan.dims();
    let (group, p) = (dm.group(), plan.patterns()[i]);
    let nseg = dm.seq / p.segment;
    let inner = item % ninner;
    let s = (item / ninner) % nseg;
    let slot = (item / (ninner * nseg)) % group;
    let g = (item / (ninner * nseg * group)) % dm.kv_heads;
    let b = item / (ninner * nseg * group * dm.kv_heads);
    let &o = offsets[g].get(slot)?;
    let a = s * p.segment + o;
    let full = Prog {
        row0: a,
        row_step: p.dilation,
        pos0: a,
        pos_step: p.dilation,
        count: plan.rows_per_segment(i, o),
    };
    qps.clear();
    qps.extend(
        (g * group..(g + 1) * group)
            .filter(|&h| plan.offset(i, h) == Some(o))
            .map(|h| (h, full)),
    );
    Some(KvItem { b, g, inner, full })
}

/// Pattern `i` of [`backward`] on the AVX-512 path (`T` = f32): pass A's items are chunks
/// of up to [`CHUNK`] key tiles of one (batch, kv head, offset, segment), which share each
/// query tile's gathered and transposed rows; pass B's are chunks of query tiles, which
/// share each packed key tile (see [`forward_chunked`]). Each tile's operations are the
/// per-tile path's, in the same order.
#[cfg(target_arch = "x86_64")]
fn backward_chunked<T: Element>(
    plan: &Plan,
    i: usize,
    cx: &BwdCtx<'_, T>,
    offsets: &[Vec<usize>],
    (dqv, dkv, dvv): (&ViewMut<T>, &ViewMut<T>, &ViewMut<T>),
    path: BwdPath,
) {
    let dm = *plan.dims();
    let (n, d, group) = (dm.seq, dm.head_dim, dm.group());
    let pat = plan.patterns()[i];
    let (w, r) = (pat.segment, pat.dilation);
    let nseg = n / w;
    let nkt = w.div_ceil(r).div_ceil(BK);
    let threads = rayon::current_num_threads();
    let bin = bwd_in(cx);

    // Pass A: dK, dV. Item = (b, g, offset slot, segment, chunk of key tiles). Where one
    // chunk can hold all of a segment's key tiles and the segments alone keep the workers
    // busy enough, the chunk is the whole segment and the item owns its queries' dQ rows too:
    // it adds dS·K into each query tile's dQ right there (the five products of a fused
    // backward instead of seven), and pass B does not run.
    let segs = dm.batch * dm.kv_heads * group * nseg;
    let valid = dm.batch * nseg * offsets.iter().map(Vec::len).sum::<usize>();
    let fused = nkt <= FUSED_TILES
        && match path {
            BwdPath::Fused => true,
            // Five products per tile pair on ⌈valid / threads⌉ items per worker against
            // seven spread evenly over the workers.
            BwdPath::Auto => 5 * valid.div_ceil(threads) * threads <= 7 * valid,
            BwdPath::PerTile | BwdPath::Chunked => false,
        };
    let chunk = if fused {
        nkt
    } else {
        chunk_len(segs * nkt, nkt)
    };
    let nch = nkt.div_ceil(chunk);
    (0..segs * nch).into_par_iter().for_each_init(
        || {
            (
                Scratch::<T>::new(d),
                ChunkBwd::new(d),
                Vec::with_capacity(group),
            )
        },
        |(sc, ch, qps), item| {
            let Some(KvItem {
                b,
                g,
                inner: c,
                full,
            }) = kv_item(plan, i, offsets, nch, item, qps)
            else {
                return;
            };
            let m = full.count;
            let mut kts = std::mem::take(&mut ch.kts);
            kts.clear();
            kts.extend(
                (c * chunk..((c + 1) * chunk).min(nkt))
                    .take_while(|&kt_i| kt_i * BK < m)
                    .map(|kt_i| full.sub(kt_i * BK, BK.min(m - kt_i * BK))),
            );
            if kts.is_empty() {
                ch.kts = kts;
                return;
            }
            ch.grow_keys(kts.len(), d);
            for (x, kt) in kts.iter().enumerate() {
                // SAFETY: `available(d)` (the caller's check); kt is a tile inside the inputs.
                unsafe { super::cpu_simd::pack_keys(&mut ch.keys[x], &bin, (b, g), kt) };
                ch.dk[x][..kt.count * d].fill(0.0);
                ch.dv[x][..kt.count * d].fill(0.0);
            }
            let Some(mut f) = sc.simd_bwd.take() else {
                unreachable!("the AVX-512 path has its backward scratch");
            };
            for &(h, qfull) in qps.iter() {
                let mut q0 = 0;
                while q0 < qfull.count {
                    let bq = BQ.min(qfull.count - q0);
                    let qp = qfull.sub(q0, bq);
                    q0 += bq;
                    // The key tiles this query tile reaches (causal: those that start at
                    // or before its last query, the query tiles bwd_kv_tile keeps).
                    let end = kts
                        .iter()
                        .take_while(|kt| !cx.causal || kt.pos0 <= qp.pos(bq - 1))
                        .count();
                    if end == 0 {
                        continue;
                    }
                    load_q_side(sc, cx, b, h, &qp);
                    simd_load_q(&mut f.q, sc, cx, b, h, &qp);
                    if fused {
                        ch.dq[..bq * d].fill(0.0);
                    }
                    let tiles = ch.keys.iter().zip(ch.dk.iter_mut().zip(ch.dv.iter_mut()));
                    for (keys, (dkt, dvt)) in tiles.take(end) {
                        // SAFETY: `available(d)`; the keys were packed for this tile.
                        unsafe {
                            super::cpu_simd::bwd_p_ds(&mut f.bs, &f.q, keys, cx.causal, d);
                            super::cpu_simd::bwd_acc_kv(
                                &f.bs,
                                bq,
                                dvt,
                                dkt,
                                f32s(&sc.go),
                                f32s(&sc.q),
                                keys.rows(),
                                d,
                            );
                            if fused {
                                super::cpu_simd::bwd_acc_q(&f.bs, bq, &mut ch.dq, keys, d);
                            }
                        }
                    }
                    if fused {
                        // SAFETY: the item holds every key tile of (b, g, o, s), so it is
                        // the only one to write these dQ rows in pattern i.
                        unsafe { add_dq(&ch.dq, cx, dqv, b, h, &qp) };
                    }
                }
            }
            sc.simd_bwd = Some(f);
            for (x, kt) in kts.iter().enumerate() {
                for j in 0..kt.count {
                    let row = kt.row(j);
                    // SAFETY: within pattern i, rows a + j·r of kv head g in batch b belong
                    // to exactly this (b, g, offset, s, chunk) item.
                    let (dkr, dvr) = unsafe { (dkv.row_mut(b, row, g), dvv.row_mut(b, row, g)) };
                    for (x, &y) in dkr.iter_mut().zip(&ch.dk[x][j * d..(j + 1) * d]) {
                        *x += T::of(y as f64);
                    }
                    for (x, &y) in dvr.iter_mut().zip(&ch.dv[x][j * d..(j + 1) * d]) {
                        *x += T::of(y as f64);
                    }
                }
            }
            ch.kts = kts;
        },
    );
    if fused {
        return;
    }

    // Pass B: dQ. Item = (b, h, segment, chunk of query tiles).
    let chunks = QueryChunks::new(plan, i);
    (0..chunks.items).into_par_iter().for_each_init(
        || (Scratch::<T>::new(d), ChunkBwd::new(d)),
        |(sc, ch), item| {
            let mut qps = [Prog::default(); CHUNK];
            let Some((QueryTile { b, h, kp, .. }, nq)) = chunks.tiles(plan, i, item, &mut qps)
            else {
                return;
            };
            let g = h / group;
            ch.grow_queries(nq, d);
            let Some(mut f) = sc.simd_bwd.take() else {
                unreachable!("the AVX-512 path has its backward scratch");
            };
            let mut qmax_all = 0;
            for (x, qp) in qps[..nq].iter().enumerate() {
                load_q_side(sc, cx, b, h, qp);
                simd_load_q(&mut ch.qs[x], sc, cx, b, h, qp);
                ch.dqs[x][..qp.count * d].fill(0.0);
                qmax_all = qmax_all.max(qp.pos(qp.count - 1));
            }
            let mut k0 = 0;
            while k0 < kp.count {
                let bk = BK.min(kp.count - k0);
                let kt = kp.sub(k0, bk);
                k0 += bk;
                if cx.causal && kt.pos0 > qmax_all {
                    break;
                }
                // SAFETY: `available(d)`; kt is a tile inside the inputs.
                unsafe { super::cpu_simd::pack_keys(&mut f.keys, &bin, (b, g), &kt) };
                for (x, qp) in qps[..nq].iter().enumerate() {
                    if cx.causal && kt.pos0 > qp.pos(qp.count - 1) {
                        continue;
                    }
                    // SAFETY: the keys were packed for kt; the query side loaded above.
                    unsafe {
                        super::cpu_simd::bwd_p_ds(&mut f.bs, &ch.qs[x], &f.keys, cx.causal, d);
                        super::cpu_simd::bwd_acc_q(&f.bs, qp.count, &mut ch.dqs[x], &f.keys, d);
                    }
                }
            }
            sc.simd_bwd = Some(f);
            for (x, qp) in qps[..nq].iter().enumerate() {
                // SAFETY: the item (b, h, s, tiles) is the only one covering these rows.
                unsafe { add_dq(&ch.dqs[x], cx, dqv, b, h, qp) };
            }
        },
    );
}

/// `dq` rows of query tile `qp` (head `h`, batch `b`) += `scale ·` the tile's unscaled
/// accumulator `acc` (`qp.count × D`).
///
/// # Safety
/// No other thread may touch those rows during the call.
#[cfg(target_arch = "x86_64")]
unsafe fn add_dq<T: Element>(
    acc: &[f32],
    cx: &BwdCtx<'_, T>,
    dqv: &ViewMut<T>,
    b: usize,
    h: usize,
    qp: &Prog,
) {
    let (d, scale) = (cx.q.d, cx.scale.f64() as f32);
    for i in 0..qp.count {
        // SAFETY: exclusivity is this function's contract.
        let row = unsafe { dqv.row_mut(b, qp.row(i), h) };
        for (o, &y) in row.iter_mut().zip(&acc[i * d..(i + 1) * d]) {
            *o += T::of((y * scale) as f64);
        }
    }
}

/// Most key tiles in one pass-A item of [`backward_chunked`] when it also computes dQ
/// (4 MiB of packed tiles and accumulators per worker at D = 64).
#[cfg(target_arch = "x86_64")]
const FUSED_TILES: usize = 64;

/// Per-worker state of [`backward_chunked`]: pass A's packed key tiles with their dK, dV
/// accumulators (and one query tile's dQ accumulator where it is fused), pass B's
/// query-tile states with their dQ accumulators.
#[cfg(target_arch = "x86_64")]
struct ChunkBwd {
    kts: Vec<Prog>,
    keys: Vec<super::cpu_simd::PackedKeys>,
    dk: Vec<Vec<f32>>,
    dv: Vec<Vec<f32>>,
    dq: Vec<f32>,
    qs: Vec<super::cpu_simd::BwdQ>,
    dqs: Vec<Vec<f32>>,
}

#[cfg(target_arch = "x86_64")]
impl ChunkBwd {
    fn new(d: usize) -> Self {
        ChunkBwd {
            kts: Vec::new(),
            keys: Vec::new(),
            dk: Vec::new(),
            dv: Vec::new(),
            dq: vec![0.0; BQ * d],
            qs: Vec::new(),
            dqs: Vec::new(),
        }
    }

    /// Room for `n` key tiles with their dK, dV (pass A).
    fn grow_keys(&mut self, n: usize, d: usize) {
        while self.keys.len() < n {
            self.keys.push(super::cpu_simd::PackedKeys::new(d));
            self.dk.push(vec![0.0; BK * d]);
            self.dv.push(vec![0.0; BK * d]);
        }
    }

    /// Room for `n` query tiles with their dQ (pass B).
    fn grow_queries(&mut self, n: usize, d: usize) {
        while self.qs.len() < n {
            self.qs.push(super::cpu_simd::BwdQ::new(d));
            self.dqs.push(vec![0.0; BQ * d]);
        }
    }
}

/// `Δ_i = dO · out_i` for pattern `i` alone (used with `detach_weights`): recomputes the
/// pattern's normalised output tile by tile and dots it with `dO`.
#[allow(clippy::too_many_arguments)]
fn pattern_delta<T: Element>(
    plan: &Plan,
    i: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
    go: &[T],
    delta: &mut [T],
) {
    let dm = *plan.dims();
    let (n, d) = (dm.seq, dm.head_dim);
    let total = query_tiles(plan, i);
    let dptr = ViewMut::new(delta, n, dm.heads, 1);
    let cx = FwdCtx {
        q: View {
            data: q,
            rows: n,
            heads: dm.heads,
            d,
        },
        k: View {
            data: k,
            rows: n,
            heads: dm.kv_heads,
            d,
        },
        v: View {
            data: v,
            rows: n,
            heads: dm.kv_heads,
            d,
        },
        kmask: mask,
        causal: plan.options().causal,
        scale: T::of(plan.scale()),
        out: dptr, // unused by fwd_accumulate
        lse: dptr,
    };
    (0..total).into_par_iter().for_each_init(
        || Scratch::new(d),
        |sc, item| {
            let Some(QueryTile { b, h, qp, kp }) = query_tile(plan, i, item) else {
                return;
            };
            fwd_accumulate(sc, &cx, b, h, h / dm.group(), qp, kp);
            for j in 0..qp.count {
                let val = if sc.l[j] == T::zero() {
                    T::zero()
                } else {
                    let gi = &go[((b * n + qp.row(j)) * dm.heads + h) * d..][..d];
                    let dot: T = gi
                        .iter()
                        .zip(&sc.acc[j * d..(j + 1) * d])
                        .map(|(x, y)| *x * *y)
                        .sum();
                    dot / sc.l[j]
                };
                // SAFETY: within pattern i the item owns these (b, row, h) entries.
                unsafe { dptr.row_mut(b, qp.row(j), h)[0] = val };
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::{Combine, Dims, Options, Pattern};

    /// `x` and `y` hold the same bits; else fail naming the first element that differs.
    fn same_bits(x: &[f32], y: &[f32], what: &str) {
        assert_eq!(x.len(), y.len(), "{what}: lengths");
        if let Some(i) = (0..x.len()).find(|&i| x[i].to_bits() != y[i].to_bits()) {
            panic!(
                "{what}: element {i} differs: {} vs {} (per tile)",
                x[i], y[i]
            );
        }
    }

    /// The chunked AVX-512 forward and backward give bitwise the per-tile paths' output,
    /// `L`, dQ, dK and dV (every tile's operations are the same, in the same order), with
    /// several tiles per chunk, a partial last tile, GQA, a padding mask and causal or not.
    #[test]
    fn chunked_passes_are_the_per_tile_passes() {
        #[cfg(target_arch = "x86_64")]
        if !super::super::cpu_simd::available(64) {
            eprintln!("skipped: no AVX-512 on this CPU, so no chunked path to compare");
            return;
        }
        let dims = Dims {
            kv_heads: 2, // GQA: two query heads per kv head
            ..Dims::mha(2, 1200, 4, 64)
        };
        let schedule = [
            Pattern::new(400, 1),
            Pattern::new(600, 2),
            Pattern::new(1200, 3),
        ];
        let mut seed = 0x9e37_79b9_u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as f32 / u32::MAX as f32 - 0.5
        };
        let q: Vec<f32> = (0..dims.q_len()).map(|_| rnd()).collect();
        let k: Vec<f32> = (0..dims.kv_len()).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..dims.kv_len()).map(|_| rnd()).collect();
        let mask: Vec<bool> = (0..dims.batch * dims.seq).map(|i| i % 7 != 3).collect();
        // The chunk length follows the worker count: 2 workers give one chunk per segment
        // here, 16 give chunks of 2 tiles (several per segment, the last one partial).
        for workers in [2, 16] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(workers)
                .build()
                .unwrap();
            pool.install(|| same_bits_all_paths(dims, &schedule, [&q, &k, &v], &mask));
        }
    }

    fn same_bits_all_paths(
        dims: Dims,
        schedule: &[Pattern],
        [q, k, v]: [&[f32]; 3],
        mask: &[bool],
    ) {
        for causal in [false, true] {
            for combine in [Combine::Lse, Combine::HeadGroups] {
                let plan = Plan::new(
                    dims,
                    schedule,
                    Options::default().causal(causal).combine(combine),
                )
                .unwrap();
                let run = |chunked: bool| {
                    let mut out = vec![f32::NAN; dims.q_len()];
                    let mut lse = vec![f32::NAN; dims.lse_len()];
                    forward_with(&plan, [q, k, v], Some(mask), (&mut out, &mut lse), chunked);
                    (out, lse)
                };
                let (a, b) = (run(true), run(false));
                same_bits(&a.0, &b.0, &format!("out, causal {causal}, {combine:?}"));
                same_bits(&a.1, &b.1, &format!("L, causal {causal}, {combine:?}"));
                // The backward from that forward: dQ, dK, dV, chunked and per tile.
                let go: Vec<f32> = (0..dims.q_len())
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
                    .collect();
                let grads = |path: BwdPath| {
                    let mut g = [
                        vec![f32::NAN; dims.q_len()],
                        vec![f32::NAN; dims.kv_len()],
                        vec![f32::NAN; dims.kv_len()],
                    ];
                    let [dq, dk, dv] = &mut g;
                    backward_with(
                        &plan,
                        [q, k, v],
                        Some(mask),
                        (&a.0, &a.1, &go),
                        [dq, dk, dv],
                        path,
                    );
                    g
                };
                let gb = grads(BwdPath::PerTile);
                for path in [BwdPath::Chunked, BwdPath::Fused, BwdPath::Auto] {
                    let ga = grads(path);
                    for (name, x, y) in [
                        ("dq", &ga[0], &gb[0]),
                        ("dk", &ga[1], &gb[1]),
                        ("dv", &ga[2], &gb[2]),
                    ] {
                        assert!(x.iter().all(|f| f.is_finite()), "{name} not finite");
                        let what = format!("{name}, {path:?}, causal {causal}, {combine:?}");
                        same_bits(x, y, &what);
                    }
                }
            }
        }
    }
}
