//! AVX-512 fast paths of the forward and backward tiles (f32, head dim a multiple of 16,
//! at most 128).
//!
//! # Design
//!
//! The generic path multiplies `Q·Kᵀ` and `P·V` through the `gemm` crate, which packs its
//! operands on every call; for 64×64×64 tiles the packing costs as much as the product.
//! Here both products are broadcast-FMA micro-kernels that need no packing of the
//! `gemm` kind (panels in the micro-kernel's order):
//!
//! * the query tile is gathered **transposed** once per tile, `Qᵀ` (`D × 64`, scaled,
//!   zero-padded past `bq`), and scores are computed transposed,
//!   `Sᵀ[j, i] = Σ_d K[j, d] · Qᵀ[d, i]`: six key rows × four 16-lane query blocks in 24
//!   registers, `K[j, d]` broadcast from the key rows;
//! * in `Sᵀ` the online softmax runs **down the columns**: the running max, the `exp` and
//!   the running sum of query `i` are lane `i` of a vector, with no horizontal reduction;
//! * `acc[i, :] += Σ_j Pᵀ[j, i] · V[j, :]` broadcasts `Pᵀ[j, i]` against rows of `V`
//!   (up to 4 query rows × `D/16` vectors of accumulators);
//! * K and V rows are **packed** per key tile ([`pack_keys`]) and the products read the
//!   copy. In the `(B, N, H, D)` inputs a head's rows lie `H·D·r` floats apart (2 KiB at
//!   H = 8, D = 64, r = 1), a power-of-two stride that maps a tile's 64 rows onto a few
//!   cache sets: `P·V`, which reads every V row once per 4 query rows, and every query
//!   tile of a segment, which reads all of its key tiles, went beyond L1 and L2 for them.
//! * **Chunks** ([`fwd_chunk`]): the single-device forward hands a worker up to 8 query
//!   tiles of one (batch, head, segment) at once; each key tile is packed once and every
//!   tile of the chunk runs on it. Each tile's operations, and their order, are those of a
//!   one-tile call, so the result is the same bit for bit (`cpu_kernel`'s unit test).
//!   Measured on the project's 2-core AVX-512 VM (one thread, head groups, N = 4096,
//!   `RAYON_NUM_THREADS=1`): forward 134 → 88–93 ms (perf before: `acc_rows` 46 %,
//!   `scores_t` 32 % of the samples; after: the products run at 150–170 GFLOP/s, about
//!   85–95 % of the core's measured FMA rate of ~179 GFLOP/s).
//!
//! The state left in the scratch (`m`, `l`, `acc`) is exactly what the generic
//! `fwd_accumulate` leaves, so `merge_tile` and the ring driver do not know which path ran.
//!
//! The backward reuses the layout: `Pᵀ = exp(K·(scale·Q)ᵀ − L)` and
//! `dSᵀ = Pᵀ ∘ (V·dO'ᵀ − Δ)` are computed transposed by the same score kernel on packed key
//! tiles ([`pack_keys`]), and one accumulate kernel ([`acc_rows`]) does `P·V`,
//! `dV += Pᵀ·dO'`, `dK += dSᵀ·Q` and `dQ += dS·K` by choosing which way it reads the
//! transposed tile. The single-device backward runs in chunks too (`cpu_kernel`'s
//! `backward_chunked`): pass A's chunks of key tiles share each query tile's gathered and
//! transposed side ([`BwdQ`]), pass B's chunks of query tiles share each packed key tile;
//! where a chunk holds a whole segment, pass A adds `dS·K` into dQ too and pass B is
//! skipped.
//! Tested against the oracle by `tests/cpu_vs_oracle.rs` (`simd_head_dims_*`).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::cpu_kernel::{Prog, View, BK, BQ};

/// Query columns of the transposed tiles (`BQ` rounded to whole vectors).
const QC: usize = BQ;
const _: () = assert!(BQ == 64 && BK == 64, "the AVX-512 tiles assume 64 × 64");

/// Whether the fast path can run for head dim `d` on this CPU.
pub(crate) fn available(d: usize) -> bool {
    d.is_multiple_of(16)
        && (16..=128).contains(&d)
        && std::arch::is_x86_feature_detected!("avx512f")
}

/// Online-softmax state of one query tile: `Qᵀ` (scaled, `D × QC`, zero past `bq`), the
/// running max and sum per query, and the unnormalised output (`BQ × D`).
pub(crate) struct QState {
    qt: Vec<f32>,
    pub mx: Vec<f32>,
    pub l: Vec<f32>,
    pub acc: Vec<f32>,
}

impl QState {
    fn new(d: usize) -> Self {
        QState {
            qt: vec![0.0; d * QC],
            mx: vec![0.0; QC],
            l: vec![0.0; QC],
            acc: vec![0.0; BQ * d],
        }
    }
}

/// Scratch of the fast path (per worker).
pub(crate) struct SimdScratch {
    d: usize,
    /// One state per query tile of a chunk ([`fwd_chunk`]); `tiles[0]` serves
    /// [`fwd_accumulate`].
    tiles: Vec<QState>,
    st: Vec<f32>, // BK × QC
    keys: PackedKeys,
}

impl SimdScratch {
    pub fn new(d: usize) -> Self {
        SimdScratch {
            d,
            tiles: vec![QState::new(d)],
            st: vec![0.0; BK * QC],
            keys: PackedKeys::new(d),
        }
    }

    /// The states of the last [`fwd_chunk`] (or `fwd_accumulate`), tile by tile.
    pub fn tiles(&self) -> &[QState] {
        &self.tiles
    }
}

/// Inputs of one query tile.
pub(crate) struct TileIn<'a> {
    pub q: View<'a, f32>,
    pub kv: KvIn<'a>,
    pub causal: bool,
    pub scale: f32,
}

/// The forward accumulation of one query tile (see the module docs). Writes the running
/// max into `m_out[..bq]`, the sum into `l_out[..bq]` (0 when nothing was attended) and
/// the unnormalised output into `acc_out[..bq·d]`.
///
/// # Safety
/// [`available`]`(d)` must be true.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn fwd_accumulate(
    ss: &mut SimdScratch,
    t: &TileIn<'_>,
    bhg: (usize, usize, usize),
    qp: Prog,
    kp: Prog,
    m_out: &mut [f32],
    l_out: &mut [f32],
    acc_out: &mut [f32],
) {
    let (d, bq) = (t.q.d, qp.count);
    // SAFETY: forwarded contract.
    unsafe { fwd_chunk(ss, t, bhg, &[qp], kp) };
    let st = &ss.tiles[0];
    m_out[..bq].copy_from_slice(&st.mx[..bq]);
    l_out[..bq].copy_from_slice(&st.l[..bq]);
    acc_out[..bq * d].copy_from_slice(&st.acc[..bq * d]);
}

/// The forward accumulation of several query tiles `qps` of one (batch, head, segment,
/// offset) against their common key progression `kp`. Key tile by key tile: the tile's K
/// and V rows are packed once (see [`pack_rows`]) and every query tile that attends any
/// of it runs its scores, softmax and `P·V` on the packed copy. Each tile's floating-point
/// operations are those of a single-tile call, in the same order, so the results are
/// bitwise the same; the states are left in [`SimdScratch::tiles`].
///
/// # Safety
/// [`available`]`(d)` must be true; every `qps[c]` has `1..=BQ` rows.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn fwd_chunk(
    ss: &mut SimdScratch,
    t: &TileIn<'_>,
    (b, h, g): (usize, usize, usize),
    qps: &[Prog],
    kp: Prog,
) {
    let d = t.q.d;
    assert!(d == ss.d && d.is_multiple_of(16));
    while ss.tiles.len() < qps.len() {
        ss.tiles.push(QState::new(d));
    }
    let mut qmax_all = 0;
    for (st, qp) in ss.tiles.iter_mut().zip(qps) {
        let bq = qp.count;
        assert!((1..=BQ).contains(&bq));
        // Qᵀ, scaled, zero past bq.
        st.qt.fill(0.0);
        for i in 0..bq {
            let src = &t.q.data[t.q.at(b, qp.row(i), h)..][..d];
            for (dd, &x) in src.iter().enumerate() {
                st.qt[dd * QC + i] = x * t.scale;
            }
        }
        st.mx.fill(f32::NEG_INFINITY);
        st.l.fill(0.0);
        st.acc[..bq * d].fill(0.0);
        qmax_all = qmax_all.max(qp.pos(bq - 1));
    }

    let mut k0 = 0;
    while k0 < kp.count {
        let bk = BK.min(kp.count - k0);
        let kt = kp.sub(k0, bk);
        if t.causal && kt.pos0 > qmax_all {
            break; // positions increase: no tile attends a later key
        }
        // SAFETY: AVX-512F (this function's contract); kt is a tile inside the inputs.
        unsafe { pack_keys(&mut ss.keys, &t.kv, (b, g), &kt) };
        for (st, qp) in ss.tiles.iter_mut().zip(qps) {
            if t.causal && kt.pos0 > qp.pos(qp.count - 1) {
                continue; // this tile attends none of these keys
            }
            // SAFETY: forwarded contract; the keys were packed for kt.
            unsafe { key_tile(st, &mut ss.st, &ss.keys, qp, t.causal, d) };
        }
        k0 += bk;
    }
}

/// One query tile against one key tile: `Sᵀ = K·Qᵀ`, masks, the online softmax down the
/// columns of `Sᵀ`, `acc = α·acc + P·V`.
///
/// # Safety
/// AVX-512F; `keys` was packed for head dim `d`; `sbuf` is `BK × QC`; `st` is sized for
/// `d`.
#[target_feature(enable = "avx512f")]
unsafe fn key_tile(
    st: &mut QState,
    sbuf: &mut [f32],
    keys: &PackedKeys,
    qp: &Prog,
    causal: bool,
    d: usize,
) {
    let (bq, bk) = (qp.count, keys.bk);
    let qmin = qp.pos(0);
    // SAFETY: the packed K tile holds bk rows of d, Qᵀ is d × QC, Sᵀ is BK × QC.
    unsafe { scores_t(sbuf, &st.qt, &keys.k, d, bk, d) };
    if keys.any_masked || (causal && keys.pos[bk - 1] > qmin) {
        for j in 0..bk {
            let row = &mut sbuf[j * QC..j * QC + QC];
            if !keys.ok[j] {
                row.fill(f32::NEG_INFINITY);
            } else if causal && keys.pos[j] > qmin {
                for (i, x) in row[..bq].iter_mut().enumerate() {
                    if keys.pos[j] > qp.pos(i) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    // Online softmax down the columns of Sᵀ.
    let mut alpha = [1.0f32; QC];
    let mut msafe = [0.0f32; QC];
    let mut mnew = [f32::NEG_INFINITY; QC];
    // SAFETY: `mx` has QC = 64 floats, Sᵀ rows j < bk ≤ BK have QC floats each.
    unsafe { col_max(&mut mnew, &st.mx, sbuf, bk) };
    for i in 0..QC {
        msafe[i] = if mnew[i] == f32::NEG_INFINITY {
            0.0
        } else {
            mnew[i]
        };
    }
    let mut ms = [_mm512_setzero_ps(); 4];
    let mut sums = [_mm512_setzero_ps(); 4];
    // SAFETY: `mx`, `l` have QC = 64 floats; Sᵀ rows j < bk ≤ BK have QC floats each.
    unsafe {
        for (c, m) in ms.iter_mut().enumerate() {
            *m = _mm512_loadu_ps(msafe.as_ptr().add(16 * c));
            let old = _mm512_loadu_ps(st.mx.as_ptr().add(16 * c));
            _mm512_storeu_ps(
                alpha.as_mut_ptr().add(16 * c),
                exp16(_mm512_sub_ps(old, *m)),
            );
        }
        let sp = sbuf.as_mut_ptr();
        for j in 0..bk {
            for c in 0..4 {
                let at = sp.add(j * QC + 16 * c);
                let p = exp16(_mm512_sub_ps(_mm512_loadu_ps(at), ms[c]));
                _mm512_storeu_ps(at, p);
                sums[c] = _mm512_add_ps(sums[c], p);
            }
        }
        for (c, sum) in sums.iter().enumerate() {
            let (l, a) = (st.l.as_mut_ptr().add(16 * c), alpha.as_ptr().add(16 * c));
            let old = _mm512_mul_ps(_mm512_loadu_ps(l), _mm512_loadu_ps(a));
            _mm512_storeu_ps(l, _mm512_add_ps(old, *sum));
        }
    }
    st.mx.copy_from_slice(&mnew);
    let acc = &mut st.acc[..bq * d];
    for (i, &a) in alpha.iter().enumerate().take(bq) {
        if a != 1.0 {
            for x in &mut acc[i * d..(i + 1) * d] {
                *x *= a;
            }
        }
    }
    // acc += P · V.
    // SAFETY: the packed V tile holds bk rows of d; Pᵀ is BK × QC; acc is bq × d.
    unsafe { acc_rows(acc, sbuf, (1, QC), &keys.v, d, bq, bk, d) };
}

/// Copy `bk` rows of `d` floats (row `j` at `src[j·stride..]`) into `dst` back to back:
/// the tile's rows are `H·D·r` floats apart in the input, a stride that maps them onto a
/// few L1 sets, so the products read them from a packed copy instead.
///
/// # Safety
/// AVX-512F; `d % 16 == 0`.
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows(dst: &mut [f32], src: &[f32], stride: usize, bk: usize, d: usize) {
    assert!(dst.len() >= bk * d && (bk == 0 || src.len() >= (bk - 1) * stride + d));
    let (dp, sp) = (dst.as_mut_ptr(), src.as_ptr());
    // A mask the compiler cannot see through: a plain load/store loop becomes one
    // `memmove` call per row, several times slower on rows of 64–512 bytes.
    let all = std::hint::black_box(0xffff_u16);
    for j in 0..bk {
        for c in (0..d).step_by(16) {
            // SAFETY: in bounds by the assert above (d % 16 == 0).
            unsafe {
                let x = _mm512_maskz_loadu_ps(all, sp.add(j * stride + c));
                _mm512_mask_storeu_ps(dp.add(j * d + c), all, x);
            }
        }
    }
}

/// `e^x` on 16 lanes, the fast path's exponential (`0` below −87.3, where `fast_exp_f32`
/// also gives 0, so masked scores and `L = +inf` give `P = 0`; NaN stays NaN).
///
/// `x = (n + f)·ln 2` with `n = round(x·log₂e)`, `f = x·log₂e − n ∈ [−½, ½]` computed by two
/// FMAs from a split `log₂e` (the product `x·log₂e` is exact inside each), `2^f` by its
/// degree-6 Taylor polynomial, and the
/// result `2^f·2^n` by `vscalefps`: relative error 2.2·10⁻⁷ at worst over [−87, 80] (the
/// test below). Twelve instructions for 16 values; the scalar
/// `fast_exp_f32` that the compiler vectorised took about 17.
#[target_feature(enable = "avx512f")]
#[inline]
fn exp16(x: __m512) -> __m512 {
    const L2E_HI: f32 = std::f32::consts::LOG2_E; // log₂e rounded to f32
    const L2E_LO: f32 = (std::f64::consts::LOG2_E - L2E_HI as f64) as f32;
    // (ln 2)^k / k!
    const C: [f32; 6] = [
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
    ];
    // Lanes at or above the cut (or NaN) keep their value; below it the result is 0.
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-87.3));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(L2E_HI)),
    );
    let f = _mm512_fmsub_ps(x, _mm512_set1_ps(L2E_HI), n);
    let f = _mm512_fmadd_ps(x, _mm512_set1_ps(L2E_LO), f);
    let mut p = _mm512_set1_ps(C[5]);
    for &c in C[..5].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
    _mm512_maskz_scalef_ps(keep, p, n)
}

/// `out[i] = max(m[i], max_j Sᵀ[j, i])` over the `QC` columns, in four registers.
///
/// # Safety
/// AVX-512F; `st` holds at least `bk` rows of `QC` floats.
#[target_feature(enable = "avx512f")]
unsafe fn col_max(out: &mut [f32; QC], m: &[f32], st: &[f32], bk: usize) {
    assert!(m.len() >= QC && st.len() >= bk * QC);
    let (mp, sp) = (m.as_ptr(), st.as_ptr());
    // SAFETY: in bounds by the assert above.
    unsafe {
        let mut v = [
            _mm512_loadu_ps(mp),
            _mm512_loadu_ps(mp.add(16)),
            _mm512_loadu_ps(mp.add(32)),
            _mm512_loadu_ps(mp.add(48)),
        ];
        for j in 0..bk {
            for (c, x) in v.iter_mut().enumerate() {
                *x = _mm512_max_ps(*x, _mm512_loadu_ps(sp.add(j * QC + c * 16)));
            }
        }
        for (c, x) in v.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), *x);
        }
    }
}

/// `Sᵀ[j, :] = Σ_d K[j, d] · Qᵀ[d, :]` for `j < bk` (all `QC` columns).
///
/// # Safety
/// AVX-512F; `k` holds rows `j < bk` at `j·ks`, each `d` long; `qt` is `d × QC`;
/// `st` is at least `bk × QC`.
#[target_feature(enable = "avx512f")]
unsafe fn scores_t(st: &mut [f32], qt: &[f32], k: &[f32], ks: usize, bk: usize, d: usize) {
    const JB: usize = 6;
    let mut j = 0;
    while j + JB <= bk {
        // SAFETY: forwarded contract.
        unsafe { scores_block::<JB>(st, qt, k, ks, j, d) };
        j += JB;
    }
    if j + 4 <= bk {
        // SAFETY: forwarded contract.
        unsafe { scores_block::<4>(st, qt, k, ks, j, d) };
        j += 4;
    }
    while j < bk {
        // SAFETY: forwarded contract.
        unsafe { scores_block::<1>(st, qt, k, ks, j, d) };
        j += 1;
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scores_block<const JB: usize>(
    st: &mut [f32],
    qt: &[f32],
    k: &[f32],
    ks: usize,
    j0: usize,
    d: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; JB];
    let kp = k.as_ptr();
    let qp = qt.as_ptr();
    for dd in 0..d {
        // SAFETY: dd < d rows of Qᵀ, each QC = 64 floats (4 vectors).
        let qv = unsafe {
            [
                _mm512_loadu_ps(qp.add(dd * QC)),
                _mm512_loadu_ps(qp.add(dd * QC + 16)),
                _mm512_loadu_ps(qp.add(dd * QC + 32)),
                _mm512_loadu_ps(qp.add(dd * QC + 48)),
            ]
        };
        for (jj, a) in acc.iter_mut().enumerate() {
            // SAFETY: key row j0 + jj < bk, element dd < d (caller's contract).
            let kb = _mm512_set1_ps(unsafe { *kp.add((j0 + jj) * ks + dd) });
            for c in 0..4 {
                a[c] = _mm512_fmadd_ps(kb, qv[c], a[c]);
            }
        }
    }
    let sp = st.as_mut_ptr();
    for (jj, a) in acc.iter().enumerate() {
        for (c, v) in a.iter().enumerate() {
            // SAFETY: row j0 + jj < bk ≤ BK of Sᵀ, columns c·16..c·16+16 < QC.
            unsafe { _mm512_storeu_ps(sp.add((j0 + jj) * QC + c * 16), *v) };
        }
    }
}

/// `acc[o, :] += Σ_{s < ns} A(o, s) · B[s, :]` for `o < no`, where `A(o, s)` is
/// `a[o·a_os + s·a_ss]` (a scalar broadcast) and row `s` of `B` is `b[s·bs..][..d]`;
/// `acc` is `no × d` row-major. The one accumulate kernel of the fast path: `P·V` in the
/// forward (`A = Pᵀ` read down a column), and `dV`, `dK`, `dQ` in the backward.
///
/// # Safety
/// AVX-512F; `d % 16 == 0`, `16 <= d <= 128`; every index above in bounds.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn acc_rows(
    acc: &mut [f32],
    a: &[f32],
    (a_os, a_ss): (usize, usize),
    b: &[f32],
    bs: usize,
    no: usize,
    ns: usize,
    d: usize,
) {
    assert!(acc.len() >= no * d);
    if no > 0 && ns > 0 {
        assert!(a.len() > (no - 1) * a_os + (ns - 1) * a_ss);
        assert!(b.len() >= (ns - 1) * bs + d);
    }
    macro_rules! run {
        ($c:literal, $rb:literal) => {{
            let mut o = 0;
            while o + $rb <= no {
                // SAFETY: in bounds by the asserts above.
                unsafe { acc_block::<$c, $rb>(acc, a, (a_os, a_ss), b, bs, o, ns) };
                o += $rb;
            }
            while o < no {
                // SAFETY: as above.
                unsafe { acc_block::<$c, 1>(acc, a, (a_os, a_ss), b, bs, o, ns) };
                o += 1;
            }
        }};
    }
    match d / 16 {
        1 => run!(1, 8),
        2 => run!(2, 6),
        3 => run!(3, 6),
        4 => run!(4, 4),
        5 => run!(5, 3),
        6 => run!(6, 3),
        7 => run!(7, 2),
        _ => run!(8, 2),
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn acc_block<const C: usize, const RB: usize>(
    acc: &mut [f32],
    a: &[f32],
    (a_os, a_ss): (usize, usize),
    b: &[f32],
    bs: usize,
    o0: usize,
    ns: usize,
) {
    let d = C * 16;
    let ap = acc.as_mut_ptr();
    let mut r_acc = [[_mm512_setzero_ps(); C]; RB];
    for (r, row) in r_acc.iter_mut().enumerate() {
        for (c, x) in row.iter_mut().enumerate() {
            // SAFETY: output row o0 + r < no, chunk c < d / 16 (caller's bounds).
            *x = unsafe { _mm512_loadu_ps(ap.add((o0 + r) * d + c * 16)) };
        }
    }
    let bp = b.as_ptr();
    let wp = a.as_ptr();
    for s in 0..ns {
        let mut bv = [_mm512_setzero_ps(); C];
        for (c, x) in bv.iter_mut().enumerate() {
            // SAFETY: row s < ns of B, chunk c.
            *x = unsafe { _mm512_loadu_ps(bp.add(s * bs + c * 16)) };
        }
        for (r, row) in r_acc.iter_mut().enumerate() {
            // SAFETY: A(o0 + r, s) in bounds (caller's bounds).
            let w = _mm512_set1_ps(unsafe { *wp.add((o0 + r) * a_os + s * a_ss) });
            for c in 0..C {
                row[c] = _mm512_fmadd_ps(w, bv[c], row[c]);
            }
        }
    }
    for (r, row) in r_acc.iter().enumerate() {
        for (c, x) in row.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { _mm512_storeu_ps(ap.add((o0 + r) * d + c * 16), *x) };
        }
    }
}

/// The query side of one tile in the fast backward: `scale·Qᵀ` and `dO'ᵀ` (`D × QC`,
/// zero past `bq`), `L` (`+inf` past `bq` and where `L = −inf`, so `P = 0`), `Δ`, positions.
pub(crate) struct BwdQ {
    qt: Vec<f32>,
    got: Vec<f32>,
    lsafe: [f32; QC],
    delta: [f32; QC],
    qpos: [usize; QC],
    bq: usize,
}

impl BwdQ {
    pub fn new(d: usize) -> Self {
        BwdQ {
            qt: vec![0.0; d * QC],
            got: vec![0.0; d * QC],
            lsafe: [f32::INFINITY; QC],
            delta: [0.0; QC],
            qpos: [0; QC],
            bq: 0,
        }
    }
}

/// One key tile, forward or backward: its K and V rows packed back to back (see
/// [`pack_rows`]), positions and padding mask.
pub(crate) struct PackedKeys {
    k: Vec<f32>,
    v: Vec<f32>,
    pos: [usize; BK],
    ok: [bool; BK],
    /// Whether any row is masked out.
    any_masked: bool,
    bk: usize,
}

impl PackedKeys {
    /// Rows of the packed tile.
    pub fn rows(&self) -> usize {
        self.bk
    }

    pub fn new(d: usize) -> Self {
        PackedKeys {
            k: vec![0.0; BK * d],
            v: vec![0.0; BK * d],
            pos: [0; BK],
            ok: [true; BK],
            any_masked: false,
            bk: 0,
        }
    }
}

/// Scratch of the fast backward (per worker): `Pᵀ` and `dSᵀ` of the current tile pair.
pub(crate) struct SimdBwdScratch {
    pt: Vec<f32>,  // BK × QC: Pᵀ
    dst: Vec<f32>, // BK × QC: dSᵀ
}

impl SimdBwdScratch {
    pub fn new() -> Self {
        SimdBwdScratch {
            pt: vec![0.0; BK * QC],
            dst: vec![0.0; BK * QC],
        }
    }
}

/// The key side of the inputs: K, V and the key padding mask.
pub(crate) struct KvIn<'a> {
    pub k: View<'a, f32>,
    pub v: View<'a, f32>,
    pub kmask: Option<&'a [bool]>,
}

/// Load the query side of a tile: `q` (scaled) and `go` (`dO'`) are the row-major tiles
/// the generic path gathered (`bq × d`), `lse`/`delta` the tile's `L` and `Δ`.
/// Columns past `bq` get `L = +inf` (so `P = 0`) and zero `dO'`.
pub(crate) fn bwd_load_q(
    bs: &mut BwdQ,
    q: &[f32],
    go: &[f32],
    lse: &[f32],
    delta: &[f32],
    qp: &Prog,
    d: usize,
) {
    let bq = qp.count;
    bs.bq = bq;
    bs.qt.fill(0.0);
    bs.got.fill(0.0);
    for i in 0..bq {
        for dd in 0..d {
            bs.qt[dd * QC + i] = q[i * d + dd];
            bs.got[dd * QC + i] = go[i * d + dd];
        }
        // L = -inf: the query attends nothing, P must be 0 (exp(s - inf) = 0).
        bs.lsafe[i] = if lse[i] == f32::NEG_INFINITY {
            f32::INFINITY
        } else {
            lse[i]
        };
        bs.delta[i] = delta[i];
        bs.qpos[i] = qp.pos(i);
    }
    for i in bq..QC {
        bs.lsafe[i] = f32::INFINITY;
        bs.delta[i] = 0.0;
    }
}

/// Pack key tile `kt` (kv head `g` of batch `b`): its K and V rows and metadata.
///
/// # Safety
/// AVX-512F ([`available`]`(d)`); `kt` has `1..=BK` rows inside the inputs.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pack_keys(
    keys: &mut PackedKeys,
    t: &KvIn<'_>,
    (b, g): (usize, usize),
    kt: &Prog,
) {
    let d = t.k.d;
    let bk = kt.count;
    assert!((1..=BK).contains(&bk));
    let ks = kt.row_step * t.k.heads * d;
    let vs = kt.row_step * t.v.heads * d;
    // SAFETY: AVX-512F (this function's contract); bounds asserted inside.
    unsafe {
        pack_rows(&mut keys.k, &t.k.data[t.k.at(b, kt.row0, g)..], ks, bk, d);
        pack_rows(&mut keys.v, &t.v.data[t.v.at(b, kt.row0, g)..], vs, bk, d);
    }
    keys.any_masked = false;
    for j in 0..bk {
        keys.pos[j] = kt.pos(j);
        keys.ok[j] = t.kmask.is_none_or(|m| m[b * t.k.rows + kt.row(j)]);
        keys.any_masked |= !keys.ok[j];
    }
    keys.bk = bk;
}

/// `Pᵀ = exp(Sᵀ - L)` and `dSᵀ = Pᵀ ∘ (dPᵀ - Δ)` for a packed key tile against a query
/// tile, with `Sᵀ = K·(scale·Q)ᵀ` and `dPᵀ = V·dO'ᵀ`; masked pairs get `P = 0`.
///
/// # Safety
/// AVX-512F ([`available`]`(d)`); `q` and `keys` were loaded for head dim `d`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn bwd_p_ds(
    bs: &mut SimdBwdScratch,
    q: &BwdQ,
    keys: &PackedKeys,
    causal: bool,
    d: usize,
) {
    let bk = keys.bk;
    // SAFETY: the packed tiles hold bk rows of d; tiles sized D × QC, BK × QC.
    unsafe {
        scores_t(&mut bs.pt, &q.qt, &keys.k, d, bk, d);
        scores_t(&mut bs.dst, &q.got, &keys.v, d, bk, d);
    }
    let bq = q.bq;
    let qmin = q.qpos[0];
    for j in 0..bk {
        let kpos = keys.pos[j];
        let prow = &mut bs.pt[j * QC..j * QC + QC];
        let drow = &mut bs.dst[j * QC..j * QC + QC];
        if !keys.ok[j] {
            prow.fill(0.0);
            drow.fill(0.0);
            continue;
        }
        // SAFETY: both rows and both query-side arrays have QC = 64 floats.
        unsafe {
            for c in (0..QC).step_by(16) {
                let l = _mm512_loadu_ps(q.lsafe.as_ptr().add(c));
                let p = exp16(_mm512_sub_ps(_mm512_loadu_ps(prow.as_ptr().add(c)), l));
                _mm512_storeu_ps(prow.as_mut_ptr().add(c), p);
                let dp = _mm512_sub_ps(
                    _mm512_loadu_ps(drow.as_ptr().add(c)),
                    _mm512_loadu_ps(q.delta.as_ptr().add(c)),
                );
                _mm512_storeu_ps(drow.as_mut_ptr().add(c), _mm512_mul_ps(p, dp));
            }
        }
        if causal && kpos > qmin {
            for i in 0..bq {
                if kpos > q.qpos[i] {
                    prow[i] = 0.0;
                    drow[i] = 0.0;
                }
            }
        }
    }
}

/// Pass A: `dV[j] += Σ_i P[i, j] · dO'[i]`, `dK[j] += Σ_i dS[i, j] · (scale·q)[i]` into the
/// `bk × d` tiles, after [`bwd_p_ds`] for a query tile of `bq` rows.
///
/// # Safety
/// AVX-512F; `go`, `q` are the `bq × d` row-major tiles given to [`bwd_load_q`].
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bwd_acc_kv(
    bs: &SimdBwdScratch,
    bq: usize,
    dv: &mut [f32],
    dk: &mut [f32],
    go: &[f32],
    q: &[f32],
    bk: usize,
    d: usize,
) {
    // SAFETY: A = Pᵀ/dSᵀ (BK × QC) read along rows, B = the bq × d query-side tiles.
    unsafe {
        acc_rows(dv, &bs.pt, (QC, 1), go, d, bk, bq, d);
        acc_rows(dk, &bs.dst, (QC, 1), q, d, bk, bq, d);
    }
}

/// Pass B: `dQ[i] += Σ_j dS[i, j] · K[j]` (unscaled) into the `bq × d` tile, after
/// [`bwd_p_ds`] for the packed key tile `keys`.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn bwd_acc_q(
    bs: &SimdBwdScratch,
    bq: usize,
    dq: &mut [f32],
    keys: &PackedKeys,
    d: usize,
) {
    // SAFETY: A = dSᵀ read down a column, B = the packed key rows (bounds asserted inside).
    unsafe { acc_rows(dq, &bs.dst, (1, QC), &keys.k, d, bq, keys.bk, d) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp16` against f64 `exp`: relative error within 5·10⁻⁷ where the result is normal,
    /// exactly 0 below the cut and for −inf, NaN kept.
    #[test]
    fn exp16_matches_f64() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let mut xs: Vec<f32> = (0..=200_000)
            .map(|i| -87.0 + i as f32 * (87.0 + 80.0) / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 88.0, -87.29]);
        let n = xs.len().next_multiple_of(16);
        xs.resize(n, 0.0);
        let mut worst = 0.0f64;
        for chunk in xs.chunks_exact(16) {
            // SAFETY: AVX-512F checked above; 16 floats in and out.
            let y = unsafe {
                let mut out = [0.0f32; 16];
                _mm512_storeu_ps(out.as_mut_ptr(), exp16(_mm512_loadu_ps(chunk.as_ptr())));
                out
            };
            for (&x, &e) in chunk.iter().zip(&y) {
                let want = (x as f64).exp();
                let rel = ((e as f64) - want).abs() / want;
                worst = worst.max(rel);
                assert!(rel < 5e-7, "exp16({x}) = {e}, want {want} (rel {rel:.2e})");
            }
        }
        eprintln!("exp16: worst relative error {worst:.2e}");
        // SAFETY: as above.
        let special = unsafe {
            let x = [
                f32::NEG_INFINITY,
                -87.31,
                -1000.0,
                f32::NAN,
                -0.0,
                0.0,
                1.0,
                -1.0,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
            ];
            let mut out = [0.0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), exp16(_mm512_loadu_ps(x.as_ptr())));
            out
        };
        assert_eq!(&special[..3], &[0.0, 0.0, 0.0]);
        assert!(special[3].is_nan());
        assert_eq!(&special[4..6], &[1.0, 1.0]);
    }
}
