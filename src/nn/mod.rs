//! Dilated attention inside dfdx models: an autograd op and a multi-head module.
//!
//! * [`DilatedAttention::try_forward_taped`](crate::DilatedAttention::try_forward_taped)
//!   ([`autograd`]): the kernel as a dfdx op. Its backward is recorded on the dfdx tape,
//!   so `loss.backward()` returns exact gradients for `q`, `k`, `v` computed by our CPU
//!   backward kernel from the saved `out` and `L` — never an `N × N` matrix.
//! * [`MultiheadDilatedAttention`] ([`mha`]): a dfdx module (`TensorCollection`,
//!   `BuildOnDevice`, `Module`) with q/k/v/out projections, grouped-query attention,
//!   MAGNETO's sub-LayerNorm and `gamma_init`, attention-output dropout and
//!   causal / key-padding masks. It composes with dfdx's `Linear`, `LayerNorm1D`,
//!   `Residual`, tuples, optimizers and `ZeroGrads`.
//! * [`FusedMultiheadDilatedAttention`] ([`fused`]): the same with one fused q/k/v
//!   projection `(3, H, HD, M)` (PyTorch's `in_proj_weight` layout), for `HKV = H`.
//! * [`RingMultiheadDilatedAttention`] ([`ring_mha`]): the module over a
//!   [`RingComm`](crate::ring::RingComm), each rank holding `LOCAL` rows; outputs and
//!   input gradients are the rank's rows of the single-device ones, and
//!   [`try_all_reduce_grads`] sums the parameter gradients over the ranks.
//!
//! ```
//! use dilated_attention::prelude::*;
//! use dfdx::nn::{BuildOnDevice, Module};
//! use dfdx::tensor::Trace;
//! use dfdx::tensor_ops::{Backward, SumTo};
//!
//! type Attn = dilated_attention::nn::builder::MultiheadDilatedAttention<
//!     16, 4, 2, 4, (Seg<8, 1>, Seg<32, 4>)>;
//! let dev = Cpu::default();
//! let mha = Attn::build_on_device(&dev);
//! let x: Tensor<Rank3<2, 32, 16>, f32, _> = dev.sample_normal();
//! let y = mha.forward(x.leaky_trace());
//! let grads = y.sum().backward();
//! assert_eq!(grads.get(&mha.w_q.weight).shape(), mha.w_q.weight.shape());
//! ```

pub mod autograd;
pub mod fused;
pub mod mha;
pub mod ring_mha;

pub use autograd::TapedBnhd;
pub use fused::{FusedBuilder, FusedMultiheadDilatedAttention, QkvLinear};
pub use mha::{
    builder, magneto_gamma, Causal, Causality, HeadLinear, MultiheadDilatedAttention, NonCausal,
};
pub use ring_mha::{try_all_reduce_grads, RingMultiheadDilatedAttention};
