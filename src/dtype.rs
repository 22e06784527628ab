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
}

impl Element for f32 {
    const NAME: &'static str = "f32";
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
