//! Element types the CPU kernels run in (`f32`, `f64`).

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

/// A floating-point element the CPU kernels compute in. Accumulation happens in the
/// element type itself (`f32` inputs accumulate in `f32`, `f64` in `f64`).
pub trait Element:
    num_traits::Float
    + Send
    + Sync
    + Default
    + Debug
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + 'static
{
    /// Name used in bench ids and messages.
    const NAME: &'static str;
    /// Lossy conversion from `f64`.
    fn of(x: f64) -> Self;
    /// Conversion to `f64`.
    fn f64(self) -> f64;
    /// `row[j] = exp(row[j] - m)` in place; returns the sum. `-inf` entries give `0`.
    /// `m` must be finite.
    fn exp_sub_sum(row: &mut [Self], m: Self) -> Self {
        let mut sum = Self::zero();
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        sum
    }
}

/// `exp(x)` for `f32` in a form LLVM vectorises (no libm call, no branch, no saturating
/// float-to-int cast): `x = n·ln2 + r`, `|r| <= ln2/2`, `exp(r)` by a degree-6
/// polynomial, `2^n` built in the exponent bits. Relative error below 5e-7 on the whole
/// range; inputs below -87.3 (including `-inf`) give exactly 0.
#[inline(always)]
pub fn fast_exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let under = x < -87.3;
    let xc = x.clamp(-87.3, 88.0);
    // t = 1.5·2^23 + n exactly, so n sits in t's low mantissa bits.
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Taylor coefficients of exp on [-ln2/2, ln2/2], Horner form.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // (n + 127) << 23 is 2^n; n + 127 is in 1..=254 after the clamp.
    let two_n = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    if under {
        0.0
    } else {
        p * two_n
    }
}

/// `row[j] = exp(row[j] - m)`, returns the sum (eight lanes, so it vectorises).
#[inline(always)]
fn exp_sub_sum_f32_body(row: &mut [f32], m: f32) -> f32 {
    for x in row.iter_mut() {
        *x = fast_exp_f32(*x - m);
    }
    let mut lanes = [0.0f32; 16];
    let mut it = row.chunks_exact(16);
    for c in &mut it {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_sub_sum_f32_avx512(row: &mut [f32], m: f32) -> f32 {
    exp_sub_sum_f32_body(row, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_sub_sum_f32_avx2(row: &mut [f32], m: f32) -> f32 {
    exp_sub_sum_f32_body(row, m)
}

/// `row[j] = exp(row[j] - m)` and the sum, runtime-dispatched: AVX-512, AVX2 or the
/// baseline build.
#[inline]
pub fn exp_sub_sum_f32(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { exp_sub_sum_f32_avx512(row, m) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { exp_sub_sum_f32_avx2(row, m) };
        }
    }
    exp_sub_sum_f32_body(row, m)
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    #[inline]
    fn exp_sub_sum(row: &mut [Self], m: Self) -> Self {
        exp_sub_sum_f32(row, m)
    }
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Element for f64 {
    const NAME: &'static str = "f64";
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::fast_exp_f32;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = fast_exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.01;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert_eq!(fast_exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp_f32(-100.0), 0.0);
        assert_eq!(fast_exp_f32(0.0), 1.0);
        // The dispatched row version agrees with the scalar one and sums correctly.
        let mut row: Vec<f32> = (0..37).map(|i| i as f32 * 0.3 - 5.0).collect();
        row[3] = f32::NEG_INFINITY;
        let want: Vec<f32> = row.iter().map(|&x| fast_exp_f32(x - 2.0)).collect();
        let sum = super::exp_sub_sum_f32(&mut row, 2.0);
        assert_eq!(row, want);
        assert!((sum - want.iter().sum::<f32>()).abs() <= 1e-5 * sum);
    }
}
