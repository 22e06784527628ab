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

/// `exp(x)` for `f32` in a form LLVM vectorises (no libm call, no branch):
/// `x = n·ln2 + r`, `|r| <= ln2/2`, `exp(r)` by a degree-6 polynomial, `2^n` built in the
/// exponent bits. Relative error below 2e-7 on the whole range; inputs below -87.3
/// (including `-inf`) give exactly 0.
#[inline(always)]
pub fn fast_exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let under = x < -87.3;
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Taylor coefficients of exp on [-ln2/2, ln2/2], Horner form.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if under {
        0.0
    } else {
        p * two_n
    }
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    #[inline]
    fn exp_sub_sum(row: &mut [Self], m: Self) -> Self {
        for x in row.iter_mut() {
            *x = fast_exp_f32(*x - m);
        }
        // A separate pass so the exp loop has no loop-carried dependency.
        row.iter().sum()
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
    }
}
