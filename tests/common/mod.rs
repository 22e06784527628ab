//! Shared helpers for the integration tests: seeded random inputs, random problems,
//! tolerance checks (SPEC §5).
#![allow(dead_code)]

#[cfg(feature = "cuda")]
pub mod gpu;

use dilated_attention::prelude::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Cases per property: `PROPTEST_CASES` or the given default.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Random normal values (never zeros), from `seed`.
pub fn normal(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect()
}

/// A random problem: shapes, schedule, options, mask and the seed for the data.
#[derive(Debug, Clone)]
pub struct Case {
    pub dims: Dims,
    pub schedule: Vec<Pattern>,
    pub opts: Options,
    /// Key padding mask `(B, N)`, or none.
    pub mask: Option<Vec<bool>>,
    pub seed: u64,
}

impl Case {
    pub fn plan(&self) -> Plan {
        Plan::new(self.dims, &self.schedule, self.opts).expect("generated cases are valid")
    }
    /// `(q, k, v, grad_out)` in f64.
    pub fn data(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let d = &self.dims;
        (
            normal(self.seed, d.q_len()),
            normal(self.seed ^ 0x9e37_79b9, d.kv_len()),
            normal(self.seed ^ 0x7f4a_7c15, d.kv_len()),
            normal(self.seed ^ 0x2545_f491, d.q_len()),
        )
    }
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|w| n.is_multiple_of(*w)).collect()
}

/// Strategy for one pattern valid for sequence length `n`: a divisor of `n` or a segment
/// longer than `n`; dilation anywhere in `1..=w`, with `r = w` and small `r` both likely.
pub fn pattern(n: usize) -> impl Strategy<Value = Pattern> {
    let ds = divisors(n);
    (prop::sample::select(ds), 0usize..4, 0usize..64).prop_map(move |(div, kind, x)| {
        let w = if kind == 3 { n + 1 + x % (2 * n) } else { div };
        let r = match x % 4 {
            0 => w,
            1 => 1,
            _ => 1 + x % w.min(9),
        };
        Pattern::new(w, r)
    })
}

/// Strategy for a random problem with up to `max_n` tokens.
pub fn case(max_n: usize, max_b: usize) -> impl Strategy<Value = Case> {
    (
        1usize..=max_n,
        1usize..=max_b,
        1usize..=3,
        1usize..=3,
        1usize..=9,
    )
        .prop_flat_map(move |(n, b, hkv, grp, d)| {
            let h = hkv * grp;
            (
                prop::collection::vec(pattern(n), 1..=h.min(4)),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                prop::option::of(prop::collection::vec(prop::bool::weighted(0.8), b * n)),
                any::<u64>(),
                0usize..4,
            )
                .prop_map(
                    move |(schedule, causal, head_groups, detach, mask, seed, scale_kind)| {
                        let mut mask = mask;
                        // Make a fully masked batch row likely to appear.
                        if let Some(m) = mask.as_mut() {
                            if seed % 3 == 0 {
                                m[..n].iter_mut().for_each(|x| *x = false);
                            }
                        }
                        let opts = Options {
                            combine: if head_groups {
                                Combine::HeadGroups
                            } else {
                                Combine::Lse
                            },
                            causal,
                            scale: (scale_kind == 0).then_some(0.37),
                            detach_weights: detach && !head_groups,
                        };
                        Case {
                            dims: Dims {
                                batch: b,
                                seq: n,
                                heads: h,
                                kv_heads: hkv,
                                head_dim: d,
                            },
                            schedule,
                            opts,
                            mask,
                            seed,
                        }
                    },
                )
        })
}

/// `max |got - want| <= rel · ||want||₂ + abs`, no NaN. Returns the error for logging.
pub fn assert_close(
    what: &str,
    got: &[f64],
    want: &[f64],
    rel: f64,
    abs: f64,
    ctx: &dyn std::fmt::Debug,
) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut err: f64 = 0.0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}[{i}] is NaN; case {ctx:?}");
        err = err.max((g - w).abs());
    }
    assert!(
        err <= rel * norm + abs,
        "{what}: max error {err:e} > {rel:e}·{norm:e} + {abs:e}; case {ctx:?}"
    );
    err
}

/// `L` check: `-inf` exactly where the reference has `-inf`, else close.
pub fn assert_lse(got: &[f64], want: &[f64], tol: f64, ctx: &dyn std::fmt::Debug) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if *w == f64::NEG_INFINITY {
            assert_eq!(
                *g,
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

pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}
pub fn from_f32(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}
