//! Dilated attention (SPEC §1): the runtime-shaped API and the kernel trait.
//!
//! # The math
//!
//! For pattern `i = (w_i, r_i)` with `w'_i = min(w_i, N)`, head `h` (offset
//! `o_i(h) = h mod r_i`) and a query `p` in segment `s = p / w'_i` (start `a`) with
//! `(p - a) mod r_i = o_i(h)`, the keys are the rows of the same segment and residue,
//! restricted by causality and the key padding mask:
//!
//! ```text
//! lse_i(p,h) = log Σ_{k∈K_i} exp(scale · q_p·k_k)
//! out_i(p,h) = Σ_{k∈K_i} exp(scale · q_p·k_k − lse_i) · v_k
//! ```
//!
//! `Combine::Lse`: `L = log Σ_i exp(lse_i)`, `out = Σ_i exp(lse_i − L) · out_i` — softmax
//! over the multiset union of the key sets. `Combine::HeadGroups`: head group `i` uses
//! pattern `i` only, `out = out_i / G`, `L = lse_i`. A query with no key gets `out = 0`,
//! `L = -inf`, never NaN.
//!
//! # Layout
//!
//! All buffers are row-major: `q`, `out`, `grad_out`, `dq` are `(batch, seq, heads, dim)`;
//! `k`, `v`, `dk`, `dv` are `(batch, seq, kv_heads, dim)`; `lse` is `(batch, seq, heads)`;
//! the key padding mask is `(batch, seq)` with `true` = attend.

pub(crate) mod cpu_kernel;
#[cfg(target_arch = "x86_64")]
pub(crate) mod cpu_simd;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_kernel;

/// The same API on the GPU (feature `cuda`): device buffers in, device buffers out.
///
/// `try_forward(&dev, &plan, &q, &k, &v, mask)` returns `out` `(batch, seq, heads, dim)`
/// and `L` `(batch, seq, heads)` (always `f32`); `try_backward` takes the saved `out` and
/// `L` and returns `dq`, `dk`, `dv`. Elements: `f32`, `half::f16`, `half::bf16`. The mask
/// is `(batch, seq)` bytes, nonzero = attend. Design notes: `CUDA.md` in this folder.
#[cfg(feature = "cuda")]
pub mod cuda {
    pub use super::cuda_kernel::{
        mask_to_device, module_info, precompile, tensor_core_kernel, try_backward, try_forward,
        warm_up, CudaForward, CudaGrads, ModuleInfo, KERNEL_CACHE_VAR, MAX_HEAD_DIM, MAX_PATTERNS,
    };
}

use crate::dtype::Element;
use crate::error::Result;
use crate::shape::{check_len, Plan};

pub use crate::ops::reference::Grads;

/// Output of a forward call.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward<T> {
    /// `(batch, seq, heads, dim)`.
    pub out: Vec<T>,
    /// Log-sum-exp `L`, `(batch, seq, heads)`; `-inf` where nothing is attended.
    pub lse: Vec<T>,
}

/// A device that runs the dilated-attention kernels on host slices.
///
/// Implemented by [`Cpu`](crate::Cpu). The public functions below validate shapes and
/// then dispatch here, so a kernel never sees an invalid problem.
pub trait DilatedKernel<T: Element> {
    /// Forward into `out` and `lse` (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        plan: &Plan,
        q: &[T],
        k: &[T],
        v: &[T],
        mask: Option<&[bool]>,
        out: &mut [T],
        lse: &mut [T],
    ) -> Result<()>;

    /// Backward from the saved `out` and `lse` into `grads` (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        plan: &Plan,
        q: &[T],
        k: &[T],
        v: &[T],
        mask: Option<&[bool]>,
        out: &[T],
        lse: &[T],
        grad_out: &[T],
        grads: &mut Grads<T>,
    ) -> Result<()>;
}

impl<T: Element> DilatedKernel<T> for crate::Cpu {
    fn forward(
        &self,
        plan: &Plan,
        q: &[T],
        k: &[T],
        v: &[T],
        mask: Option<&[bool]>,
        out: &mut [T],
        lse: &mut [T],
    ) -> Result<()> {
        cpu_kernel::forward(plan, q, k, v, mask, out, lse);
        Ok(())
    }

    fn backward(
        &self,
        plan: &Plan,
        q: &[T],
        k: &[T],
        v: &[T],
        mask: Option<&[bool]>,
        out: &[T],
        lse: &[T],
        grad_out: &[T],
        grads: &mut Grads<T>,
    ) -> Result<()> {
        cpu_kernel::backward(
            plan,
            q,
            k,
            v,
            mask,
            out,
            lse,
            grad_out,
            &mut grads.dq,
            &mut grads.dk,
            &mut grads.dv,
        );
        Ok(())
    }
}

/// Forward on the CPU: returns `out` and `L`. Every shape error is an `Err`.
///
/// ```
/// use dilated_attention::prelude::*;
/// let plan = Plan::new(Dims::mha(1, 16, 2, 4), &[Pattern::new(8, 1), Pattern::new(16, 2)], Options::default())?;
/// let q = vec![0.1f32; 16 * 2 * 4];
/// let fwd = dilated_attention::ops::dilated::try_forward(&plan, &q, &q, &q, None)?;
/// assert_eq!(fwd.out.len(), q.len());
/// # Ok::<(), dilated_attention::Error>(())
/// ```
pub fn try_forward<T: Element>(
    plan: &Plan,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
) -> Result<Forward<T>> {
    let dm = plan.dims();
    let mut out = vec![T::nan(); dm.q_len()];
    let mut lse = vec![T::nan(); dm.lse_len()];
    try_forward_into(plan, q, k, v, mask, &mut out, &mut lse)?;
    Ok(Forward { out, lse })
}

/// Forward into caller-provided buffers (`out`: `(B,N,H,D)`, `lse`: `(B,N,H)`).
pub fn try_forward_into<T: Element>(
    plan: &Plan,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
    out: &mut [T],
    lse: &mut [T],
) -> Result<()> {
    plan.check_inputs(q.len(), k.len(), v.len(), mask.map(<[bool]>::len))?;
    check_len("out", plan.dims().q_len(), out.len())?;
    check_len("lse", plan.dims().lse_len(), lse.len())?;
    DilatedKernel::forward(&crate::Cpu::default(), plan, q, k, v, mask, out, lse)
}

/// Backward on the CPU from the saved `out` and `lse` of [`try_forward`].
#[allow(clippy::too_many_arguments)]
pub fn try_backward<T: Element>(
    plan: &Plan,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[bool]>,
    out: &[T],
    lse: &[T],
    grad_out: &[T],
) -> Result<Grads<T>> {
    plan.check_inputs(q.len(), k.len(), v.len(), mask.map(<[bool]>::len))?;
    let dm = plan.dims();
    check_len("out", dm.q_len(), out.len())?;
    check_len("lse", dm.lse_len(), lse.len())?;
    check_len("grad_out", dm.q_len(), grad_out.len())?;
    let mut grads = Grads {
        dq: vec![T::nan(); dm.q_len()],
        dk: vec![T::nan(); dm.kv_len()],
        dv: vec![T::nan(); dm.kv_len()],
    };
    DilatedKernel::backward(
        &crate::Cpu::default(),
        plan,
        q,
        k,
        v,
        mask,
        out,
        lse,
        grad_out,
        &mut grads,
    )?;
    Ok(grads)
}
