//! Compile-time schedules and the checks that turn a mis-shaped configuration into a
//! compile error naming the numbers.
//!
//! A schedule is a tuple of [`Seg<W, R>`] markers (or one marker alone):
//!
//! ```
//! use dilated_attention::prelude::*;
//! type LongNet = (Seg<2048, 1>, Seg<4096, 2>, Seg<8192, 4>);
//! assert_eq!(<LongNet as Schedule>::PATTERNS.len(), 3);
//! ```
//!
//! The checks are associated constants evaluated when a typed entry point is
//! instantiated with concrete numbers, so they fire in `cargo build` (not in
//! `cargo check`, which does not evaluate them). A segment that does not divide the
//! sequence is rejected with a message that carries the numbers:
//!
//! ```compile_fail,E0080
//! use dilated_attention::prelude::*;
//! // error: pattern 0: segment 3000 does not divide sequence length 4096
//! let _ = Checked::<4096, 8, 8, 64, Seg<3000, 1>, LseCombine>::OK;
//! ```
//!
//! Design note: a trait bound cannot express "W divides N", so the arithmetic rules are
//! post-monomorphisation `const` asserts (the dfdx habit for shape arithmetic). The
//! message is assembled in a `const fn` byte buffer so that it can include the numbers:
//! stable `const` panics accept a `&str` argument but do not format integers.

use super::{Combine, Pattern};

/// One pattern of a compile-time schedule: segment length `W`, dilation `R`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seg<const W: usize, const R: usize>;

/// A compile-time schedule: a non-empty list of patterns.
pub trait Schedule: 'static {
    /// The patterns, in order.
    const PATTERNS: &'static [Pattern];
}

impl<const W: usize, const R: usize> Schedule for Seg<W, R> {
    const PATTERNS: &'static [Pattern] = &[Pattern::new(W, R)];
}

macro_rules! count {
    () => { 0usize };
    ($head:ident $($tail:ident)*) => { 1usize + count!($($tail)*) };
}

macro_rules! impl_tuples {
    ($($name:ident),+) => {
        impl<$($name: Schedule),+> Schedule for ($($name,)+) {
            const PATTERNS: &'static [Pattern] = &concat_patterns::<{ count!($($name)+) }>([$($name::PATTERNS),+]);
        }
    };
}

/// Flattens `K` one-pattern slices into an array (each tuple element is a `Seg`).
const fn concat_patterns<const K: usize>(parts: [&'static [Pattern]; K]) -> [Pattern; K] {
    let mut out = [Pattern::new(0, 0); K];
    let mut i = 0;
    while i < K {
        assert!(
            parts[i].len() == 1,
            "schedule tuple elements must be single Seg<W, R> markers"
        );
        out[i] = parts[i][0];
        i += 1;
    }
    out
}

impl_tuples!(A);
impl_tuples!(A, B);
impl_tuples!(A, B, C);
impl_tuples!(A, B, C, D);
impl_tuples!(A, B, C, D, E);
impl_tuples!(A, B, C, D, E, F);
impl_tuples!(A, B, C, D, E, F, G);
impl_tuples!(A, B, C, D, E, F, G, H);

/// Compile-time marker of a combine mode.
pub trait CombineKind: 'static + Default + Copy + Send + Sync {
    /// The runtime value.
    const COMBINE: Combine;
}

/// Marker for [`Combine::Lse`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LseCombine;
/// Marker for [`Combine::HeadGroups`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadGroupCombine;

impl CombineKind for LseCombine {
    const COMBINE: Combine = Combine::Lse;
}
impl CombineKind for HeadGroupCombine {
    const COMBINE: Combine = Combine::HeadGroups;
}

/// A message buffer assembled at compile time.
#[derive(Clone, Copy)]
pub struct Msg {
    buf: [u8; 160],
    len: usize,
}

impl Msg {
    const fn new() -> Self {
        Msg {
            buf: [0; 160],
            len: 0,
        }
    }
    const fn s(mut self, s: &str) -> Self {
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() && self.len < self.buf.len() {
            self.buf[self.len] = b[i];
            self.len += 1;
            i += 1;
        }
        self
    }
    const fn n(mut self, mut v: usize) -> Self {
        let mut digits = [0u8; 20];
        let mut k = 0;
        if v == 0 {
            digits[0] = b'0';
            k = 1;
        }
        while v > 0 {
            digits[k] = b'0' + (v % 10) as u8;
            v /= 10;
            k += 1;
        }
        while k > 0 && self.len < self.buf.len() {
            k -= 1;
            self.buf[self.len] = digits[k];
            self.len += 1;
        }
        self
    }
    const fn as_str(&self) -> &str {
        let (head, _) = self.buf.split_at(self.len);
        match core::str::from_utf8(head) {
            Ok(s) => s,
            Err(_) => "invalid dilated-attention configuration",
        }
    }
}

/// `None` if the configuration is valid, else the message naming the numbers.
const fn check_config(
    n: usize,
    h: usize,
    hkv: usize,
    d: usize,
    pats: &[Pattern],
    combine: Combine,
) -> Option<Msg> {
    if n == 0 {
        return Some(Msg::new().s("sequence length N must be >= 1"));
    }
    if h == 0 {
        return Some(Msg::new().s("number of heads H must be >= 1"));
    }
    if hkv == 0 {
        return Some(Msg::new().s("number of kv heads HKV must be >= 1"));
    }
    if d == 0 {
        return Some(Msg::new().s("head dim D must be >= 1"));
    }
    if !h.is_multiple_of(hkv) {
        return Some(
            Msg::new()
                .s("query heads ")
                .n(h)
                .s(" are not a multiple of kv heads ")
                .n(hkv),
        );
    }
    if pats.is_empty() {
        return Some(Msg::new().s("the schedule has no pattern"));
    }
    let mut i = 0;
    while i < pats.len() {
        let (w, r) = (pats[i].segment, pats[i].dilation);
        if w == 0 {
            return Some(Msg::new().s("pattern ").n(i).s(": segment length is 0"));
        }
        if r == 0 || r > w {
            return Some(
                Msg::new()
                    .s("pattern ")
                    .n(i)
                    .s(": dilation ")
                    .n(r)
                    .s(" must be in 1..=")
                    .n(w)
                    .s(" (its segment length)"),
            );
        }
        let wc = if w < n { w } else { n };
        if !n.is_multiple_of(wc) {
            return Some(
                Msg::new()
                    .s("pattern ")
                    .n(i)
                    .s(": segment ")
                    .n(w)
                    .s(" does not divide sequence length ")
                    .n(n),
            );
        }
        i += 1;
    }
    if matches!(combine, Combine::HeadGroups) && pats.len() > h {
        return Some(
            Msg::new()
                .s("head-group combine: ")
                .n(pats.len())
                .s(" patterns but only ")
                .n(h)
                .s(" heads"),
        );
    }
    None
}

/// The compile-time check of a typed configuration. Referencing [`Checked::OK`] in a
/// function instantiated with concrete numbers makes an invalid configuration a compile
/// error (E0080) whose message names the numbers.
pub struct Checked<const N: usize, const H: usize, const HKV: usize, const D: usize, S, C>(
    core::marker::PhantomData<(S, C)>,
);

impl<
        const N: usize,
        const H: usize,
        const HKV: usize,
        const D: usize,
        S: Schedule,
        C: CombineKind,
    > Checked<N, H, HKV, D, S, C>
{
    const MSG: Option<Msg> = check_config(N, H, HKV, D, S::PATTERNS, C::COMBINE);
    /// Evaluates to `()` for a valid configuration; fails to compile otherwise.
    pub const OK: () = if let Some(m) = &Self::MSG {
        panic!("{}", m.as_str())
    };
}

/// The ring rules: a positive world size and local length, and the global length
/// `LOCAL·WORLD` satisfying every rule of [`check_config`]; the message names the
/// factorisation.
const fn check_ring(
    local: usize,
    world: usize,
    (h, hkv, d): (usize, usize, usize),
    pats: &[Pattern],
    combine: Combine,
) -> Option<Msg> {
    if world == 0 {
        return Some(Msg::new().s("ring world size must be >= 1"));
    }
    if local == 0 {
        return Some(Msg::new().s("ring local length must be >= 1"));
    }
    match check_config(local * world, h, hkv, d, pats, combine) {
        Some(m) => Some(
            Msg::new()
                .s("ring global length ")
                .n(local)
                .s("x")
                .n(world)
                .s(": ")
                .s(m.as_str()),
        ),
        None => None,
    }
}

/// The ring check: global length `N = W·n` must satisfy the schedule, and the world size
/// must be positive; `EVEN` requires `n` even (zigzag layout).
pub struct CheckedRing<const LOCAL: usize, const WORLD: usize, S>(core::marker::PhantomData<S>);

impl<const LOCAL: usize, const WORLD: usize, S: Schedule> CheckedRing<LOCAL, WORLD, S> {
    const MSG: Option<Msg> = check_ring(LOCAL, WORLD, (1, 1, 1), S::PATTERNS, Combine::Lse);
    /// Evaluates to `()` for a valid ring configuration; fails to compile otherwise.
    pub const OK: () = if let Some(m) = &Self::MSG {
        panic!("{}", m.as_str())
    };
}

/// The full typed ring check: the global length `N = LOCAL·WORLD` with heads `H`, kv
/// heads `HKV`, head dim `D`, schedule `S` and combine `C` must satisfy every rule of
/// SPEC §1 (the message names the numbers and the factorisation).
///
/// ```compile_fail,E0080
/// use dilated_attention::prelude::*;
/// // error: ring global length 6x4: pattern 0: segment 16 does not divide sequence length 24
/// let _ = CheckedRingConfig::<6, 4, 2, 2, 8, Seg<16, 1>, LseCombine>::OK;
/// ```
pub struct CheckedRingConfig<
    const LOCAL: usize,
    const WORLD: usize,
    const H: usize,
    const HKV: usize,
    const D: usize,
    S,
    C,
>(core::marker::PhantomData<(S, C)>);

impl<
        const LOCAL: usize,
        const WORLD: usize,
        const H: usize,
        const HKV: usize,
        const D: usize,
        S: Schedule,
        C: CombineKind,
    > CheckedRingConfig<LOCAL, WORLD, H, HKV, D, S, C>
{
    const MSG: Option<Msg> = check_ring(LOCAL, WORLD, (H, HKV, D), S::PATTERNS, C::COMBINE);
    /// Evaluates to `()` for a valid ring configuration; fails to compile otherwise.
    pub const OK: () = if let Some(m) = &Self::MSG {
        panic!("{}", m.as_str())
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuple_schedules_flatten() {
        type S = (Seg<8, 1>, Seg<16, 2>, Seg<32, 4>);
        assert_eq!(
            S::PATTERNS,
            &[Pattern::new(8, 1), Pattern::new(16, 2), Pattern::new(32, 4)]
        );
    }

    #[test]
    fn messages_name_numbers() {
        let m = check_config(4096, 8, 8, 64, &[Pattern::new(3000, 1)], Combine::Lse).unwrap();
        assert_eq!(
            m.as_str(),
            "pattern 0: segment 3000 does not divide sequence length 4096"
        );
        let m = check_config(
            64,
            2,
            2,
            8,
            &[Pattern::new(8, 1), Pattern::new(16, 2), Pattern::new(32, 1)],
            Combine::HeadGroups,
        )
        .unwrap();
        assert_eq!(
            m.as_str(),
            "head-group combine: 3 patterns but only 2 heads"
        );
        assert!(check_config(64, 8, 2, 8, &[Pattern::new(128, 4)], Combine::Lse).is_none());
    }
}
