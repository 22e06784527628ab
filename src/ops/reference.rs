//! The float64 oracle: SPEC §1 written as naive loops, forward and gradients.
//!
//! Nothing here is fast or clever on purpose. Every kernel (CPU, CUDA, ring over any
//! communicator) is tested against these functions on random inputs. Memory is
//! `O(N)` per query (one key list at a time), time `O(B·H·N·w·G)`.
//!
//! Gradients follow from SPEC §1a written as one softmax over the multiset union of the
//! patterns' key sets: with `P = exp(s - L)` per (pattern, key) occurrence,
//!
//! ```text
//! dV_k += P · dO_p          dS = P · (dO_p · v_k - Δ)          Δ = dO_p · out_p
//! dQ_p += scale · dS · k_k  dK_k += scale · dS · q_p
//! ```
//!
//! With `detach_weights` the combine weights are constants, which replaces `Δ` by the
//! per-pattern `Δ_i = dO_p · out_i(p)`. Under `Combine::HeadGroups` a head sees one
//! pattern with `P = exp(s - lse_i)` and an upstream gradient `dO / G`. The finite
//! difference tests in `tests/oracle_gradients.rs` check these formulas against
//! [`forward`] itself.

use crate::error::Result;
use crate::shape::{Combine, Plan};

/// Output of the oracle forward.
#[derive(Debug, Clone)]
pub struct RefForward {
    /// `(B, N, H, D)`.
    pub out: Vec<f64>,
    /// `(B, N, H)`, `-inf` where no key is attended.
    pub lse: Vec<f64>,
}

/// Gradients with respect to `q`, `k`, `v`.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads<T> {
    /// `(B, N, H, D)`.
    pub dq: Vec<T>,
    /// `(B, N, Hkv, D)`.
    pub dk: Vec<T>,
    /// `(B, N, Hkv, D)`.
    pub dv: Vec<T>,
}

/// Key positions of `K_i(p, h)` for batch `b` (SPEC §1), or `None` if `p` does not take
/// part in pattern `i` for head `h`.
pub fn key_set(
    plan: &Plan,
    mask: Option<&[bool]>,
    b: usize,
    i: usize,
    h: usize,
    p: usize,
) -> Option<Vec<usize>> {
    let n = plan.dims().seq;
    let pat = plan.patterns()[i];
    let (w, r) = (pat.segment, pat.dilation);
    let o = plan.offset(i, h)?;
    let a = (p / w) * w;
    if (p - a) % r != o {
        return None;
    }
    let keys = (a..a + w)
        .filter(|&k| (k - a) % r == o)
        .filter(|&k| !plan.options().causal || k <= p)
        .filter(|&k| mask.is_none_or(|m| m[b * n + k]))
        .collect();
    Some(keys)
}

struct Idx {
    n: usize,
    h: usize,
    hkv: usize,
    d: usize,
}
impl Idx {
    fn q(&self, b: usize, p: usize, h: usize) -> usize {
        ((b * self.n + p) * self.h + h) * self.d
    }
    fn kv(&self, b: usize, p: usize, g: usize) -> usize {
        ((b * self.n + p) * self.hkv + g) * self.d
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Per-pattern partial for one query: `(lse_i, out_i, keys, scores)`.
type Partial = (f64, Vec<f64>, Vec<usize>, Vec<f64>);

fn partials(
    plan: &Plan,
    ix: &Idx,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: Option<&[bool]>,
    (b, p, h): (usize, usize, usize),
) -> Vec<Option<Partial>> {
    let d = ix.d;
    let g = h / plan.dims().group();
    let qp = &q[ix.q(b, p, h)..][..d];
    (0..plan.num_patterns())
        .map(|i| {
            let keys = key_set(plan, mask, b, i, h, p)?;
            let s: Vec<f64> = keys
                .iter()
                .map(|&kk| plan.scale() * dot(qp, &k[ix.kv(b, kk, g)..][..d]))
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut out = vec![0.0; d];
            if keys.is_empty() {
                return Some((f64::NEG_INFINITY, out, keys, s));
            }
            let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
            let lse = mx + sum.ln();
            for (j, &kk) in keys.iter().enumerate() {
                let pw = (s[j] - lse).exp();
                for (o, x) in out.iter_mut().zip(&v[ix.kv(b, kk, g)..][..d]) {
                    *o += pw * x;
                }
            }
            Some((lse, out, keys, s))
        })
        .collect()
}

fn logsumexp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let mx = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    mx + xs.map(|x| (x - mx).exp()).sum::<f64>().ln()
}

/// The forward of SPEC §1: `out` and `L`.
pub fn forward(
    plan: &Plan,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: Option<&[bool]>,
) -> Result<RefForward> {
    plan.check_inputs(q.len(), k.len(), v.len(), mask.map(<[bool]>::len))?;
    let dm = *plan.dims();
    let ix = Idx {
        n: dm.seq,
        h: dm.heads,
        hkv: dm.kv_heads,
        d: dm.head_dim,
    };
    let mut out = vec![0.0; dm.q_len()];
    let mut lse = vec![f64::NEG_INFINITY; dm.lse_len()];
    let gcount = plan.num_patterns() as f64;
    for b in 0..dm.batch {
        for p in 0..dm.seq {
            for h in 0..dm.heads {
                let parts = partials(plan, &ix, q, k, v, mask, (b, p, h));
                let o = &mut out[ix.q(b, p, h)..][..dm.head_dim];
                let l = &mut lse[(b * dm.seq + p) * dm.heads + h];
                match plan.options().combine {
                    Combine::Lse => {
                        let big_l = logsumexp(parts.iter().flatten().map(|x| x.0));
                        *l = big_l;
                        if big_l == f64::NEG_INFINITY {
                            continue;
                        }
                        for (li, oi, _, _) in parts.iter().flatten() {
                            let wgt = (li - big_l).exp();
                            for (a, x) in o.iter_mut().zip(oi) {
                                *a += wgt * x;
                            }
                        }
                    }
                    Combine::HeadGroups => {
                        // At most one pattern holds this head.
                        if let Some((li, oi, _, _)) = parts.iter().flatten().next() {
                            *l = *li;
                            for (a, x) in o.iter_mut().zip(oi) {
                                *a = x / gcount;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(RefForward { out, lse })
}

/// Gradients of `sum(out * grad_out)` with respect to `q`, `k`, `v` (SPEC §1, exact
/// through the combine weights unless `detach_weights`).
pub fn backward(
    plan: &Plan,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: Option<&[bool]>,
    grad_out: &[f64],
) -> Result<Grads<f64>> {
    backward_impl(plan, q, k, v, mask, grad_out, None)
}

/// [`backward`] with `Δ = dO · out` taken from a *saved* output `out` `(B, N, H, D)` (for
/// example a kernel's output rounded to bf16) instead of the exact one — the contract of a
/// backward "from saved output and L", as FlashAttention computes it. Everything else is
/// exact. With `detach_weights` the per-pattern `Δ_i` do not use `out` and are exact.
pub fn backward_from_saved(
    plan: &Plan,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: Option<&[bool]>,
    grad_out: &[f64],
    out: &[f64],
) -> Result<Grads<f64>> {
    crate::shape::check_len("out", plan.dims().q_len(), out.len())?;
    backward_impl(plan, q, k, v, mask, grad_out, Some(out))
}

fn backward_impl(
    plan: &Plan,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: Option<&[bool]>,
    grad_out: &[f64],
    saved_out: Option<&[f64]>,
) -> Result<Grads<f64>> {
    plan.check_inputs(q.len(), k.len(), v.len(), mask.map(<[bool]>::len))?;
    crate::shape::check_len("grad_out", plan.dims().q_len(), grad_out.len())?;
    let fwd = forward(plan, q, k, v, mask)?;
    let dm = *plan.dims();
    let ix = Idx {
        n: dm.seq,
        h: dm.heads,
        hkv: dm.kv_heads,
        d: dm.head_dim,
    };
    let d = dm.head_dim;
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; dm.q_len()],
        vec![0.0; dm.kv_len()],
        vec![0.0; dm.kv_len()],
    );
    let gcount = plan.num_patterns() as f64;
    let scale = plan.scale();
    for b in 0..dm.batch {
        for p in 0..dm.seq {
            for h in 0..dm.heads {
                let g = h / dm.group();
                let qi = ix.q(b, p, h);
                let d_o = &grad_out[qi..qi + d];
                let out_p = &saved_out.unwrap_or(&fwd.out)[qi..qi + d];
                let big_l = fwd.lse[(b * dm.seq + p) * dm.heads + h];
                if big_l == f64::NEG_INFINITY {
                    continue;
                }
                for (lse_i, out_i, keys, s) in partials(plan, &ix, q, k, v, mask, (b, p, h))
                    .into_iter()
                    .flatten()
                {
                    if keys.is_empty() {
                        continue;
                    }
                    // (reference L, upstream factor, Δ)
                    let (lref, fac, delta) = match plan.options().combine {
                        Combine::Lse if plan.options().detach_weights => {
                            (big_l, 1.0, dot(d_o, &out_i))
                        }
                        Combine::Lse => (big_l, 1.0, dot(d_o, out_p)),
                        Combine::HeadGroups if saved_out.is_some() => {
                            (lse_i, 1.0 / gcount, dot(d_o, out_p))
                        }
                        Combine::HeadGroups => (lse_i, 1.0 / gcount, dot(d_o, &out_i) / gcount),
                    };
                    for (j, &kk) in keys.iter().enumerate() {
                        let pw = (s[j] - lref).exp();
                        let ki = ix.kv(b, kk, g);
                        let dp = fac * dot(d_o, &v[ki..ki + d]);
                        let ds = pw * (dp - delta);
                        for x in 0..d {
                            dv[ki + x] += pw * fac * d_o[x];
                            dq[qi + x] += scale * ds * k[ki + x];
                            dk[ki + x] += scale * ds * q[qi + x];
                        }
                    }
                }
            }
        }
    }
    Ok(Grads { dq, dk, dv })
}
