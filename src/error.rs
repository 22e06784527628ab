//! The crate's one error type.
//!
//! Every variant carries the numbers that made the input invalid, so a message reads like
//! `segment length 3000 of pattern 1 does not divide sequence length 4096` and can be acted
//! on without a debugger. Library code never panics on user input: the runtime-shaped path
//! returns one of these instead.

use std::fmt;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A dimension that must be positive was zero.
    ZeroDim {
        /// Which dimension (`"batch"`, `"seq"`, `"heads"`, `"kv_heads"`, `"head_dim"`).
        dim: &'static str,
    },
    /// The schedule has no pattern.
    EmptySchedule,
    /// A pattern has segment length 0.
    ZeroSegment {
        /// Index of the pattern in the schedule.
        pattern: usize,
    },
    /// A pattern's dilation is 0 or larger than its segment length.
    BadDilation {
        /// Index of the pattern in the schedule.
        pattern: usize,
        /// Segment length `w`.
        segment: usize,
        /// Dilation `r`.
        dilation: usize,
    },
    /// `min(w, N)` does not divide `N`.
    SegmentNotDividing {
        /// Index of the pattern in the schedule.
        pattern: usize,
        /// Segment length `w` as given.
        segment: usize,
        /// Sequence length `N`.
        seq: usize,
    },
    /// `Combine::HeadGroups` needs at least as many heads as patterns.
    TooManyPatterns {
        /// Number of patterns `G`.
        patterns: usize,
        /// Number of query heads `H`.
        heads: usize,
    },
    /// `H % Hkv != 0`.
    HeadsNotMultiple {
        /// Query heads `H`.
        heads: usize,
        /// Key/value heads `Hkv`.
        kv_heads: usize,
    },
    /// A buffer's length does not match the shape it was given with.
    LengthMismatch {
        /// Which buffer (`"q"`, `"k"`, `"v"`, `"mask"`, `"out"`, `"lse"`, `"grad_out"`).
        what: &'static str,
        /// Expected number of elements.
        expected: usize,
        /// Number of elements given.
        got: usize,
    },
    /// The scale is not a finite number.
    BadScale,
    /// A ring configuration is invalid (layout and lengths, world size).
    Ring {
        /// What is wrong, with the numbers.
        msg: String,
    },
    /// A peer of a ring failed or stopped answering.
    Comm {
        /// Rank that observed the fault.
        rank: usize,
        /// Ring step (0-based) at which it was observed.
        step: usize,
        /// What happened, naming the peer where known.
        msg: String,
    },
    /// A device (GPU, driver, library) is missing or failed.
    Device {
        /// What happened.
        msg: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ZeroDim { dim } => write!(f, "dimension `{dim}` is zero; every dim must be >= 1"),
            Error::EmptySchedule => write!(f, "the schedule has no pattern; give at least one (segment, dilation)"),
            Error::ZeroSegment { pattern } => write!(f, "pattern {pattern} has segment length 0"),
            Error::BadDilation { pattern, segment, dilation } => write!(
                f,
                "pattern {pattern}: dilation {dilation} must be in 1..={segment} (its segment length)"
            ),
            Error::SegmentNotDividing { pattern, segment, seq } => write!(
                f,
                "pattern {pattern}: segment length {segment} (capped at the sequence length) does not divide sequence length {seq}; pad the sequence and pass a key padding mask"
            ),
            Error::TooManyPatterns { patterns, heads } => write!(
                f,
                "Combine::HeadGroups needs at least as many heads as patterns: {patterns} patterns, {heads} heads"
            ),
            Error::HeadsNotMultiple { heads, kv_heads } => write!(
                f,
                "query heads {heads} are not a multiple of kv heads {kv_heads}"
            ),
            Error::LengthMismatch { what, expected, got } => write!(
                f,
                "buffer `{what}` has {got} elements, its shape needs {expected}"
            ),
            Error::BadScale => write!(f, "the attention scale must be finite"),
            Error::Ring { msg } => write!(f, "ring configuration: {msg}"),
            Error::Comm { rank, step, msg } => write!(f, "ring rank {rank}, step {step}: {msg}"),
            Error::Device { msg } => write!(f, "device: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
