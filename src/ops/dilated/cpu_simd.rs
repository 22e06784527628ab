//! AVX-512 fast path of the forward tile (f32, head dim a multiple of 16, at most 128).
//!
//! # Design
//!
//! The generic path multiplies `Q·Kᵀ` and `P·V` through the `gemm` crate, which packs its
//! operands on every call; for 64×64×64 tiles the packing costs as much as the product.
//! Here both products are broadcast-FMA micro-kernels that need no packing:
//!
//! * the query tile is gathered **transposed** once per tile, `Qᵀ` (`D × 64`, scaled,
//!   zero-padded past `bq`), and scores are computed transposed,
//!   `Sᵀ[j, i] = Σ_d K[j, d] · Qᵀ[d, i]`: six key rows × four 16-lane query blocks in 24
//!   registers, `K[j, d]` broadcast straight from the (strided) key rows;
//! * in `Sᵀ` the online softmax runs **down the columns**: the running max, the `exp` and
//!   the running sum of query `i` are lane `i` of a vector, with no horizontal reduction;
//! * `acc[i, :] += Σ_j Pᵀ[j, i] · V[j, :]` broadcasts `Pᵀ[j, i]` against rows of `V`
//!   read in place (up to 4 query rows × `D/16` vectors of accumulators).
//!
//! The state left in the scratch (`m`, `l`, `acc`) is exactly what the generic
//! `fwd_accumulate` leaves, so `merge_tile` and the ring driver do not know which path ran.
//! Tested against the oracle by `tests/cpu_vs_oracle.rs` (`simd_head_dims_*`).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::cpu_kernel::{Prog, View, BK, BQ};
use crate::dtype::fast_exp_f32;

/// Query columns of the transposed tiles (`BQ` rounded to whole vectors).
const QC: usize = BQ;
const _: () = assert!(BQ == 64 && BK == 64, "the AVX-512 tiles assume 64 × 64");

/// Whether the fast path can run for head dim `d` on this CPU.
pub(crate) fn available(d: usize) -> bool {
    d.is_multiple_of(16)
        && (16..=128).contains(&d)
        && std::arch::is_x86_feature_detected!("avx512f")
}

/// Scratch of the fast path (per worker).
pub(crate) struct SimdScratch {
    qt: Vec<f32>, // D × QC
    st: Vec<f32>, // BK × QC
    mx: Vec<f32>, // QC
    l: Vec<f32>,  // QC
    kpos: Vec<usize>,
    kok: Vec<bool>,
}

impl SimdScratch {
    pub fn new(d: usize) -> Self {
        SimdScratch {
            qt: vec![0.0; d * QC],
            st: vec![0.0; BK * QC],
            mx: vec![0.0; QC],
            l: vec![0.0; QC],
            kpos: vec![0; BK],
            kok: vec![true; BK],
        }
    }
}

/// Inputs of one query tile.
pub(crate) struct TileIn<'a> {
    pub q: View<'a, f32>,
    pub k: View<'a, f32>,
    pub v: View<'a, f32>,
    pub kmask: Option<&'a [bool]>,
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
    (b, h, g): (usize, usize, usize),
    qp: Prog,
    kp: Prog,
    m_out: &mut [f32],
    l_out: &mut [f32],
    acc_out: &mut [f32],
) {
    let d = t.q.d;
    let bq = qp.count;
    debug_assert!(bq <= QC && d.is_multiple_of(16));
    // Qᵀ, scaled, zero past bq.
    ss.qt.fill(0.0);
    for i in 0..bq {
        let src = &t.q.data[t.q.at(b, qp.row(i), h)..][..d];
        for (dd, &x) in src.iter().enumerate() {
            ss.qt[dd * QC + i] = x * t.scale;
        }
    }
    ss.mx.fill(f32::NEG_INFINITY);
    ss.l.fill(0.0);
    let acc = &mut acc_out[..bq * d];
    acc.fill(0.0);
    let qmin = qp.pos(0);
    let qmax = qp.pos(bq - 1);

    let mut k0 = 0;
    while k0 < kp.count {
        let bk = BK.min(kp.count - k0);
        let kt = kp.sub(k0, bk);
        if t.causal && kt.pos0 > qmax {
            break;
        }
        let k_start = t.k.at(b, kt.row0, g);
        let k_stride = kt.row_step * t.k.heads * d;
        let v_start = t.v.at(b, kt.row0, g);
        let v_stride = kt.row_step * t.v.heads * d;
        let krows = &t.k.data[k_start..];
        let vrows = &t.v.data[v_start..];
        assert!(krows.len() >= (bk - 1) * k_stride + d && vrows.len() >= (bk - 1) * v_stride + d);

        // Sᵀ = K · Qᵀ.
        // SAFETY: rows j < bk of K lie in `krows` (asserted), Qᵀ is d × QC, Sᵀ is BK × QC.
        unsafe { scores_t(&mut ss.st, &ss.qt, krows, k_stride, bk, d) };

        // Masks: padding mask per key row, causal per (key, query).
        let mut any_mask = false;
        for j in 0..bk {
            ss.kpos[j] = kt.pos(j);
            ss.kok[j] = t.kmask.is_none_or(|m| m[b * t.k.rows + kt.row(j)]);
            any_mask |= !ss.kok[j];
        }
        let kmax = ss.kpos[bk - 1];
        if any_mask || (t.causal && kmax > qmin) {
            for j in 0..bk {
                let row = &mut ss.st[j * QC..j * QC + QC];
                if !ss.kok[j] {
                    row.fill(f32::NEG_INFINITY);
                } else if t.causal && ss.kpos[j] > qmin {
                    for (i, x) in row[..bq].iter_mut().enumerate() {
                        if ss.kpos[j] > qp.pos(i) {
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
        unsafe { col_max(&mut mnew, &ss.mx, &ss.st, bk) };
        for i in 0..QC {
            msafe[i] = if mnew[i] == f32::NEG_INFINITY {
                0.0
            } else {
                mnew[i]
            };
            alpha[i] = fast_exp_f32(ss.mx[i] - msafe[i]);
            ss.mx[i] = mnew[i];
        }
        let mut sums = [0.0f32; QC];
        for j in 0..bk {
            let row = &mut ss.st[j * QC..j * QC + QC];
            for i in 0..QC {
                let p = fast_exp_f32(row[i] - msafe[i]);
                row[i] = p;
                sums[i] += p;
            }
        }
        for i in 0..QC {
            ss.l[i] = ss.l[i] * alpha[i] + sums[i];
        }
        for (i, &a) in alpha.iter().enumerate().take(bq) {
            if a != 1.0 {
                for x in &mut acc[i * d..(i + 1) * d] {
                    *x *= a;
                }
            }
        }
        // acc += P · V.
        // SAFETY: rows j < bk of V lie in `vrows` (asserted); Pᵀ is BK × QC; acc is bq × d.
        unsafe { pv(acc, &ss.st, vrows, v_stride, bq, bk, d) };
        k0 += bk;
    }
    m_out[..bq].copy_from_slice(&ss.mx[..bq]);
    l_out[..bq].copy_from_slice(&ss.l[..bq]);
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

/// `acc[i, :] += Σ_{j<bk} Pᵀ[j, i] · V[j, :]` for `i < bq`.
///
/// # Safety
/// AVX-512F; `v` holds rows `j < bk` at `j·vs`, each `d` long, `d % 16 == 0`, `d ≤ 128`;
/// `pt` is `BK × QC`; `acc` is `bq × d`.
#[target_feature(enable = "avx512f")]
unsafe fn pv(acc: &mut [f32], pt: &[f32], v: &[f32], vs: usize, bq: usize, bk: usize, d: usize) {
    macro_rules! run {
        ($c:literal, $rb:literal) => {{
            let mut i = 0;
            while i + $rb <= bq {
                // SAFETY: forwarded contract.
                unsafe { pv_block::<$c, $rb>(acc, pt, v, vs, i, bk) };
                i += $rb;
            }
            while i < bq {
                // SAFETY: forwarded contract.
                unsafe { pv_block::<$c, 1>(acc, pt, v, vs, i, bk) };
                i += 1;
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
unsafe fn pv_block<const C: usize, const RB: usize>(
    acc: &mut [f32],
    pt: &[f32],
    v: &[f32],
    vs: usize,
    i0: usize,
    bk: usize,
) {
    let d = C * 16;
    let ap = acc.as_mut_ptr();
    let mut a = [[_mm512_setzero_ps(); C]; RB];
    for (r, row) in a.iter_mut().enumerate() {
        for (c, x) in row.iter_mut().enumerate() {
            // SAFETY: row i0 + r < bq of acc (bq × d), chunk c < d / 16.
            *x = unsafe { _mm512_loadu_ps(ap.add((i0 + r) * d + c * 16)) };
        }
    }
    let vp = v.as_ptr();
    let pp = pt.as_ptr();
    for j in 0..bk {
        let mut vv = [_mm512_setzero_ps(); C];
        for (c, x) in vv.iter_mut().enumerate() {
            // SAFETY: key row j < bk of V, chunk c.
            *x = unsafe { _mm512_loadu_ps(vp.add(j * vs + c * 16)) };
        }
        for (r, row) in a.iter_mut().enumerate() {
            // SAFETY: Pᵀ[j, i0 + r], j < BK, i0 + r < QC.
            let p = _mm512_set1_ps(unsafe { *pp.add(j * QC + i0 + r) });
            for c in 0..C {
                row[c] = _mm512_fmadd_ps(p, vv[c], row[c]);
            }
        }
    }
    for (r, row) in a.iter().enumerate() {
        for (c, x) in row.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { _mm512_storeu_ps(ap.add((i0 + r) * d + c * 16), *x) };
        }
    }
}
