//! Helpers of the GPU tests (feature `cuda`): dtype rounding and SPEC §5 checks.

use dilated_attention::tensor::cuda::CudaElement;

/// `‖got − want‖₂ ≤ rel·max(‖want‖₂, 0.01·√(len·D))`, no NaN; returns the relative error.
///
/// The floor `0.01·√(len·D)` (unit-normal inputs: dot products over `D` of order `√D`)
/// covers references that cancel to exactly zero, e.g. the gradients of one-key segments
/// (`dS = P·(dP − Δ) = 0`), where only rounding of those dot products is left to compare.
pub fn check_norm(
    what: &str,
    got: &[f64],
    want: &[f64],
    rel: f64,
    d: usize,
    ctx: &dyn std::fmt::Debug,
) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut num = 0.0;
    let mut den = 0.0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            !g.is_nan(),
            "{what}[{i}] is NaN (unwritten or bad); case {ctx:?}"
        );
        num += (g - w) * (g - w);
        den += w * w;
    }
    let (num, den) = (num.sqrt(), den.sqrt());
    assert!(
        num <= rel * den.max(0.01 * ((want.len() * d) as f64).sqrt()),
        "{what}: ‖err‖ {num:e} > {rel:e}·‖ref‖ {den:e}; case {ctx:?}"
    );
    if den > 0.0 {
        num / den
    } else {
        num
    }
}

pub fn check_lse(got: &[f32], want: &[f64], tol: f64, ctx: &dyn std::fmt::Debug) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if w == f64::NEG_INFINITY {
            assert_eq!(
                g,
                f64::NEG_INFINITY,
                "lse[{i}] should be -inf; case {ctx:?}"
            );
        } else {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "lse[{i}]: {g} vs {w}; case {ctx:?}"
            );
        }
    }
}

pub fn round<E: CudaElement>(x: &[f64]) -> (Vec<E>, Vec<f64>) {
    let e: Vec<E> = x.iter().map(|&v| E::from_f64(v)).collect();
    let r = e.iter().map(|v| v.to_f64()).collect();
    (e, r)
}

pub fn to64<E: CudaElement>(x: &[E]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}
