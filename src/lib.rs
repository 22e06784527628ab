//! # dilated-attention
//!
//! LongNet-style dilated attention and ring attention with compile-time shapes.
//!
//! ```
//! use dilated_attention::prelude::*;
//! let dev = Cpu::default();
//! let q: Tensor<Rank4<1, 32, 2, 8>, f32, _> = dev.sample_normal();
//! let attn = DilatedAttention::<(Seg<8, 1>, Seg<16, 2>)>::new();
//! let (out, _lse) = attn.forward(&q, &q, &q);
//! assert_eq!(out.as_vec().len(), 32 * 2 * 8);
//! ```
//!
//! ## What is computed
//!
//! A schedule of patterns `(w_i, r_i)`: the sequence is cut into segments of `w_i` rows,
//! in each segment only every `r_i`-th row (from offset `h mod r_i` for head `h`) takes
//! part, and attention runs inside each dilated segment. Patterns are combined either by
//! log-sum-exp (softmax over the union of their key sets, the default) or by head groups.
//! Dense attention is the schedule `[(N, 1)]`. See [`ops::dilated`] and `SPEC.md`.
//!
//! ## Two front doors
//!
//! * Typed: [`DilatedAttention`] on dfdx tensors, shapes and schedule as const generics —
//!   a mis-shaped configuration is a compile error naming the numbers.
//! * Runtime: [`Plan::new`] + [`ops::dilated::try_forward`] on slices — every invalid input
//!   is an [`Error`], never a panic.
//!
//! ## Ring attention
//!
//! [`ring`] splits the sequence over `W` ranks (threads through [`ring::Loopback`], GPUs
//! through a later NCCL backend) and gives every rank exactly its rows of the
//! single-device result, moving only dilated K/V rows point to point.
//!
//! ## In dfdx models
//!
//! In dfdx models: [`DilatedAttention::try_forward_taped`] records its backward on the
//! dfdx tape, and [`nn::MultiheadDilatedAttention`] is a dfdx module (see [`nn`]);
//! [`nn::RingMultiheadDilatedAttention`] runs that module over a ring, each rank on its
//! own rows, with gradients equal to the single-device module's.
//!
//! ## Feature flags
//!
//! * `reference` (default): the float64 oracle [`ops::reference`] is public.
//! * `nccl`: `ring::NcclComm`, the NCCL backend of [`ring::RingComm`] (one GPU per rank;
//!   CUDA and NCCL are loaded at run time, so the crate still builds without them and
//!   construction returns `Err` where they are missing).
//! * `cuda`: the CUDA backend ([`tensor::cuda::Cuda`], `ops::dilated::cuda`), NVRTC
//!   kernels loaded at run time through cudarc's dynamic loading — the crate still builds
//!   and runs its CPU path where no CUDA is installed; a missing driver or GPU is an
//!   [`Error::Device`] at run time.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod dtype;
pub mod error;
pub mod nn;
pub mod ops;
pub mod ring;
pub mod shape;
pub mod tensor;

pub use dfdx::tensor::Cpu;
pub use dtype::Element;
pub use error::{Error, Result};
pub use shape::{Combine, Dims, Options, Pattern, Plan};
#[cfg(feature = "cuda")]
pub use tensor::cuda::{Cuda, CudaElement, CudaTensor};
pub use tensor::DilatedAttention;

/// Everything a user needs in one import.
pub mod prelude {
    pub use crate::dtype::Element;
    pub use crate::error::{Error, Result};
    pub use crate::nn::{Causal, MultiheadDilatedAttention, NonCausal};
    pub use crate::ops::dilated::{try_backward, try_forward, Forward, Grads};
    pub use crate::ring::{
        CommConfig, Layout, Loopback, RingComm, RingDilatedAttention, RingStats,
    };
    pub use crate::shape::typed::{
        Checked, CheckedRing, CheckedRingConfig, CombineKind, HeadGroupCombine, LseCombine,
        Schedule, Seg,
    };
    pub use crate::shape::{Combine, Dims, Options, Pattern, Plan};
    pub use crate::tensor::{Bnh, Bnhd, DilatedAttention, KeyMask};
    pub use dfdx::shapes::{Const, Dim, HasShape, Rank1, Rank2, Rank3, Rank4, Shape};
    pub use dfdx::tensor::{
        AsArray, Cpu, SampleTensor, Tensor, TensorFrom, TensorFromVec, ZerosTensor,
    };
}

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
