//! Shapes, schedules and the validated [`Plan`] every kernel consumes.
//!
//! Two front doors lead here:
//!
//! * the **typed** one ([`typed`]): sequence length, heads, head dim and the schedule are
//!   const generics, and every rule of SPEC §1 that types can express is a compile error
//!   naming the numbers;
//! * the **runtime** one: [`Plan::new`] checks the same rules on `usize` values and returns
//!   a typed [`Error`] for each, never a panic.
//!
//! Both end in a [`Plan`]: dims, the schedule with segments capped at `N`
//! (`w' = min(w, N)`), the options and the resolved scale. Kernels and the oracle take a
//! `Plan` and nothing else, so they cannot disagree about the rules.

pub mod typed;

use crate::error::{Error, Result};

/// Problem dimensions: `q`/`out` are `(batch, seq, heads, head_dim)`, `k`/`v` are
/// `(batch, seq, kv_heads, head_dim)`, all row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dims {
    /// `B`.
    pub batch: usize,
    /// `N`.
    pub seq: usize,
    /// `H`, query heads.
    pub heads: usize,
    /// `Hkv`, key/value heads (`H % Hkv == 0`).
    pub kv_heads: usize,
    /// `D`.
    pub head_dim: usize,
}

impl Dims {
    /// Dims with `Hkv = H` (multi-head attention).
    pub fn mha(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        Dims {
            batch,
            seq,
            heads,
            kv_heads: heads,
            head_dim,
        }
    }
    /// Elements of `q` and `out`: `B·N·H·D`.
    pub fn q_len(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }
    /// Elements of `k` and `v`: `B·N·Hkv·D`.
    pub fn kv_len(&self) -> usize {
        self.batch * self.seq * self.kv_heads * self.head_dim
    }
    /// Elements of `L`: `B·N·H`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.seq * self.heads
    }
    /// Elements of the key padding mask: `B·N`.
    pub fn mask_len(&self) -> usize {
        self.batch * self.seq
    }
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// One `(segment length, dilation)` pair of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pattern {
    /// Segment length `w >= 1`.
    pub segment: usize,
    /// Dilation `1 <= r <= w`.
    pub dilation: usize,
}

impl Pattern {
    /// `(w, r)`.
    pub const fn new(segment: usize, dilation: usize) -> Self {
        Pattern { segment, dilation }
    }
}

/// The LongNet schedule used in examples and benches: `[(2048,1), (4096,2), (8192,4)]`.
pub fn longnet_schedule() -> Vec<Pattern> {
    vec![
        Pattern::new(2048, 1),
        Pattern::new(4096, 2),
        Pattern::new(8192, 4),
    ]
}

/// How the patterns' results are combined (SPEC §1a, §1b).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Combine {
    /// Softmax over the multiset union of the patterns' key sets (LongNet Eq. 10).
    #[default]
    Lse,
    /// Heads split into one contiguous group per pattern; output divided by `G`
    /// (parity with dilated-attention-pytorch).
    HeadGroups,
}

/// Options that do not change shapes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Options {
    /// How patterns combine.
    pub combine: Combine,
    /// Causal masking (`k <= p`, on global positions).
    pub causal: bool,
    /// Softmax scale; `None` means `1 / sqrt(D)`.
    pub scale: Option<f64>,
    /// `Combine::Lse` only: the combine weights carry no gradient (torchscale parity).
    pub detach_weights: bool,
}

impl Options {
    /// Default options with `causal` set.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// With this combine.
    pub fn combine(mut self, combine: Combine) -> Self {
        self.combine = combine;
        self
    }
    /// With this scale.
    pub fn scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }
    /// With `detach_weights`.
    pub fn detach_weights(mut self, detach: bool) -> Self {
        self.detach_weights = detach;
        self
    }
}

/// A validated problem: dims, capped schedule, options, scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    dims: Dims,
    /// Patterns with `segment` already capped at `N`.
    patterns: Vec<Pattern>,
    opts: Options,
    scale: f64,
}

/// Check every rule of SPEC §1 on runtime values.
pub fn validate(dims: &Dims, schedule: &[Pattern], opts: &Options) -> Result<()> {
    for (dim, v) in [
        ("batch", dims.batch),
        ("seq", dims.seq),
        ("heads", dims.heads),
        ("kv_heads", dims.kv_heads),
        ("head_dim", dims.head_dim),
    ] {
        if v == 0 {
            return Err(Error::ZeroDim { dim });
        }
    }
    if !dims.heads.is_multiple_of(dims.kv_heads) {
        return Err(Error::HeadsNotMultiple {
            heads: dims.heads,
            kv_heads: dims.kv_heads,
        });
    }
    if schedule.is_empty() {
        return Err(Error::EmptySchedule);
    }
    for (i, p) in schedule.iter().enumerate() {
        if p.segment == 0 {
            return Err(Error::ZeroSegment { pattern: i });
        }
        if p.dilation == 0 || p.dilation > p.segment {
            return Err(Error::BadDilation {
                pattern: i,
                segment: p.segment,
                dilation: p.dilation,
            });
        }
        let w = p.segment.min(dims.seq);
        if !dims.seq.is_multiple_of(w) {
            return Err(Error::SegmentNotDividing {
                pattern: i,
                segment: p.segment,
                seq: dims.seq,
            });
        }
    }
    if opts.combine == Combine::HeadGroups && schedule.len() > dims.heads {
        return Err(Error::TooManyPatterns {
            patterns: schedule.len(),
            heads: dims.heads,
        });
    }
    if let Some(s) = opts.scale {
        if !s.is_finite() {
            return Err(Error::BadScale);
        }
    }
    Ok(())
}

impl Plan {
    /// Validate and build. Every invalid input is an `Err` naming the numbers.
    pub fn new(dims: Dims, schedule: &[Pattern], opts: Options) -> Result<Self> {
        validate(&dims, schedule, &opts)?;
        let patterns = schedule
            .iter()
            .map(|p| {
                // The dilation is kept as given: with `r > w'` a head whose offset
                // `h mod r` falls past the capped segment simply does not take part.
                Pattern {
                    segment: p.segment.min(dims.seq),
                    dilation: p.dilation,
                }
            })
            .collect();
        let scale = opts.scale.unwrap_or(1.0 / (dims.head_dim as f64).sqrt());
        Ok(Plan {
            dims,
            patterns,
            opts,
            scale,
        })
    }

    /// The dims.
    pub fn dims(&self) -> &Dims {
        &self.dims
    }
    /// Patterns with segments capped at `N`.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }
    /// The options.
    pub fn options(&self) -> &Options {
        &self.opts
    }
    /// The resolved softmax scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// Number of patterns `G`.
    pub fn num_patterns(&self) -> usize {
        self.patterns.len()
    }

    /// Range of heads of group `i` under `Combine::HeadGroups`: `H / G` heads, plus one
    /// for `i < H % G`, contiguous.
    pub fn head_group(&self, i: usize) -> std::ops::Range<usize> {
        head_group(self.dims.heads, self.patterns.len(), i)
    }

    /// The offset with which head `h` takes part in pattern `i`, or `None` if it does not
    /// (not in the pattern's head group, or the offset lies past a capped segment).
    #[inline]
    pub fn offset(&self, i: usize, h: usize) -> Option<usize> {
        let Pattern {
            segment: w,
            dilation: r,
        } = self.patterns[i];
        let o = match self.opts.combine {
            Combine::Lse => h % r,
            Combine::HeadGroups => {
                if !self.head_group(i).contains(&h) {
                    return None;
                }
                i % r
            }
        };
        (o < w).then_some(o)
    }

    /// Number of dilated rows per segment of pattern `i` at offset `o < w'`.
    #[inline]
    pub fn rows_per_segment(&self, i: usize, o: usize) -> usize {
        let Pattern {
            segment: w,
            dilation: r,
        } = self.patterns[i];
        (w - o).div_ceil(r)
    }

    /// Factor applied to a pattern's output: 1 for `Lse`, `1/G` for `HeadGroups`.
    pub fn pattern_factor(&self) -> f64 {
        match self.opts.combine {
            Combine::Lse => 1.0,
            Combine::HeadGroups => 1.0 / self.patterns.len() as f64,
        }
    }

    /// Check buffer lengths of a forward call.
    pub fn check_inputs(&self, q: usize, k: usize, v: usize, mask: Option<usize>) -> Result<()> {
        let d = &self.dims;
        check_len("q", d.q_len(), q)?;
        check_len("k", d.kv_len(), k)?;
        check_len("v", d.kv_len(), v)?;
        if let Some(m) = mask {
            check_len("mask", d.mask_len(), m)?;
        }
        Ok(())
    }

    /// Attended (query, key) pairs summed over batch and heads, counting a key once per
    /// pattern it appears in. Ignores the key padding mask. Used for FLOP counts.
    pub fn attended_pairs(&self) -> u64 {
        let d = &self.dims;
        let mut total = 0u64;
        for (i, p) in self.patterns.iter().enumerate() {
            let (w, r) = (p.segment, p.dilation);
            for h in 0..d.heads {
                let Some(o) = self.offset(i, h) else { continue };
                let m = (w - o).div_ceil(r);
                let per_seg = if self.opts.causal {
                    m * (m + 1) / 2
                } else {
                    m * m
                };
                total += (per_seg * (d.seq / w)) as u64;
            }
        }
        total * d.batch as u64
    }
}

/// Heads of group `i` of `g` groups over `h` heads (SPEC §1b).
pub fn head_group(h: usize, g: usize, i: usize) -> std::ops::Range<usize> {
    let base = h / g;
    let extra = h % g;
    let start = i * base + i.min(extra);
    let len = base + usize::from(i < extra);
    start..start + len
}

pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_groups_cover_every_head_once() {
        for h in 1..20 {
            for g in 1..=h {
                let mut seen = vec![0; h];
                for i in 0..g {
                    for x in head_group(h, g, i) {
                        seen[x] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "h={h} g={g}: {seen:?}");
            }
        }
    }

    #[test]
    fn segment_longer_than_sequence_is_capped() {
        let p = Plan::new(
            Dims::mha(1, 8, 12, 4),
            &[Pattern::new(64, 16)],
            Options::default(),
        )
        .unwrap();
        assert_eq!(p.patterns()[0], Pattern::new(8, 16));
        assert_eq!(p.offset(0, 3), Some(3));
        assert_eq!(p.offset(0, 9), None);
        assert_eq!(p.rows_per_segment(0, 3), 1);
    }
}
