//! The typed front door: dfdx tensors with compile-time shapes.
//!
//! `q` is `Tensor<(B, Const<N>, Const<H>, Const<D>), E, Cpu>`, `k`/`v` are
//! `Tensor<(B, Const<N>, Const<HKV>, Const<D>), E, Cpu>`; the batch `B` may be a `usize`
//! or a `Const`. The schedule `S` and combine `C` are types. Instantiating
//! [`DilatedAttention::forward`] with numbers that break a rule of SPEC §1 does not
//! compile; the error names the numbers (see [`crate::shape::typed`]).
//!
//! ```
//! use dilated_attention::prelude::*;
//! let dev = Cpu::default();
//! let q: Tensor<Rank4<2, 64, 4, 8>, f32, _> = dev.sample_normal();
//! let k: Tensor<Rank4<2, 64, 2, 8>, f32, _> = dev.sample_normal();
//! let v: Tensor<Rank4<2, 64, 2, 8>, f32, _> = dev.sample_normal();
//! let attn = DilatedAttention::<(Seg<16, 1>, Seg<32, 2>, Seg<64, 4>)>::new().causal(true);
//! let (out, lse) = attn.forward(&q, &k, &v);
//! assert_eq!(out.shape(), &(Const::<2>, Const::<64>, Const::<4>, Const::<8>));
//! assert_eq!(lse.shape().1, Const::<64>);
//! ```

#[cfg(feature = "cuda")]
pub mod cuda;

use std::marker::PhantomData;

use dfdx::shapes::{Const, Dim, Dtype, HasShape};
use dfdx::tensor::{Cpu, Tensor, TensorFromVec};

use crate::dtype::Element;
use crate::error::Result;
use crate::ops::dilated::{self, Grads};
use crate::shape::typed::{Checked, CombineKind, LseCombine, Schedule};
use crate::shape::{Dims, Options, Plan};

/// `(B, N, H, D)` tensor on the CPU.
pub type Bnhd<B, const N: usize, const H: usize, const D: usize, E> =
    Tensor<(B, Const<N>, Const<H>, Const<D>), E, Cpu>;
/// `(B, N, H)` tensor (the log-sum-exp `L`).
pub type Bnh<B, const N: usize, const H: usize, E> = Tensor<(B, Const<N>, Const<H>), E, Cpu>;
/// `(B, N)` key padding mask (`true` = attend).
pub type KeyMask<B, const N: usize> = Tensor<(B, Const<N>), bool, Cpu>;

/// Dilated attention with a compile-time schedule `S` and combine `C`.
#[derive(Debug, Clone, Copy)]
pub struct DilatedAttention<S: Schedule, C: CombineKind = LseCombine> {
    causal: bool,
    scale: Option<f64>,
    detach_weights: bool,
    _m: PhantomData<(S, C)>,
}

impl<S: Schedule, C: CombineKind> Default for DilatedAttention<S, C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Schedule, C: CombineKind> DilatedAttention<S, C> {
    /// Non-causal, scale `1/sqrt(D)`.
    pub const fn new() -> Self {
        DilatedAttention {
            causal: false,
            scale: None,
            detach_weights: false,
            _m: PhantomData,
        }
    }
    /// Causal masking on global positions.
    pub const fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// A custom softmax scale.
    pub const fn scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }
    /// Combine weights carry no gradient (torchscale parity; `Lse` only).
    pub const fn detach_weights(mut self, detach: bool) -> Self {
        self.detach_weights = detach;
        self
    }
    /// The runtime options this configuration stands for.
    pub fn options(&self) -> Options {
        Options {
            combine: C::COMBINE,
            causal: self.causal,
            scale: self.scale,
            detach_weights: self.detach_weights,
        }
    }

    /// The runtime plan for batch `b` (the const checks have run by the time this is
    /// called from a typed entry point).
    pub fn plan<const N: usize, const H: usize, const HKV: usize, const D: usize>(
        &self,
        batch: usize,
    ) -> Result<Plan> {
        #[allow(clippy::let_unit_value)]
        let () = Checked::<N, H, HKV, D, S, C>::OK;
        Plan::new(
            Dims {
                batch,
                seq: N,
                heads: H,
                kv_heads: HKV,
                head_dim: D,
            },
            S::PATTERNS,
            self.options(),
        )
    }

    /// Forward: `(out, L)`. Panics only on a runtime error (a mask of the wrong batch);
    /// use [`try_forward`](Self::try_forward) to get the `Err`.
    #[allow(clippy::type_complexity)]
    pub fn forward<B: Dim, const N: usize, const H: usize, const HKV: usize, const D: usize, E>(
        &self,
        q: &Bnhd<B, N, H, D, E>,
        k: &Bnhd<B, N, HKV, D, E>,
        v: &Bnhd<B, N, HKV, D, E>,
    ) -> (Bnhd<B, N, H, D, E>, Bnh<B, N, H, E>)
    where
        E: Element + Dtype,
    {
        self.try_forward(q, k, v, None).unwrap()
    }

    /// Forward with an optional key padding mask `(B, N)`.
    #[allow(clippy::type_complexity)]
    pub fn try_forward<
        B: Dim,
        const N: usize,
        const H: usize,
        const HKV: usize,
        const D: usize,
        E,
    >(
        &self,
        q: &Bnhd<B, N, H, D, E>,
        k: &Bnhd<B, N, HKV, D, E>,
        v: &Bnhd<B, N, HKV, D, E>,
        mask: Option<&KeyMask<B, N>>,
    ) -> Result<(Bnhd<B, N, H, D, E>, Bnh<B, N, H, E>)>
    where
        E: Element + Dtype,
    {
        let batch = q.shape().0;
        let plan = self.plan::<N, H, HKV, D>(batch.size())?;
        let (qv, kv, vv) = (q.as_vec(), k.as_vec(), v.as_vec());
        let mv = mask.map(|m| m.as_vec());
        check_batch(
            batch.size(),
            &[k.shape().0.size(), v.shape().0.size()],
            mask.map(|m| m.shape().0.size()),
        )?;
        let fwd = dilated::try_forward(&plan, &qv, &kv, &vv, mv.as_deref())?;
        let dev = q.device();
        let out = dev.tensor_from_vec(fwd.out, *q.shape());
        let lse = dev.tensor_from_vec(fwd.lse, (batch, Const::<N>, Const::<H>));
        Ok((out, lse))
    }

    /// Backward from saved `out` and `L`: `(dq, dk, dv)`.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    pub fn try_backward<
        B: Dim,
        const N: usize,
        const H: usize,
        const HKV: usize,
        const D: usize,
        E,
    >(
        &self,
        q: &Bnhd<B, N, H, D, E>,
        k: &Bnhd<B, N, HKV, D, E>,
        v: &Bnhd<B, N, HKV, D, E>,
        mask: Option<&KeyMask<B, N>>,
        out: &Bnhd<B, N, H, D, E>,
        lse: &Bnh<B, N, H, E>,
        grad_out: &Bnhd<B, N, H, D, E>,
    ) -> Result<(
        Bnhd<B, N, H, D, E>,
        Bnhd<B, N, HKV, D, E>,
        Bnhd<B, N, HKV, D, E>,
    )>
    where
        E: Element + Dtype,
    {
        let batch = q.shape().0;
        let plan = self.plan::<N, H, HKV, D>(batch.size())?;
        check_batch(
            batch.size(),
            &[k.shape().0.size(), v.shape().0.size()],
            mask.map(|m| m.shape().0.size()),
        )?;
        let mv = mask.map(|m| m.as_vec());
        let Grads { dq, dk, dv } = dilated::try_backward(
            &plan,
            &q.as_vec(),
            &k.as_vec(),
            &v.as_vec(),
            mv.as_deref(),
            &out.as_vec(),
            &lse.as_vec(),
            &grad_out.as_vec(),
        )?;
        let dev = q.device();
        Ok((
            dev.tensor_from_vec(dq, *q.shape()),
            dev.tensor_from_vec(dk, *k.shape()),
            dev.tensor_from_vec(dv, *v.shape()),
        ))
    }
}

pub(crate) fn check_batch(b: usize, others: &[usize], mask: Option<usize>) -> Result<()> {
    for &o in others.iter().chain(mask.iter()) {
        if o != b {
            return Err(crate::Error::LengthMismatch {
                what: "batch",
                expected: b,
                got: o,
            });
        }
    }
    Ok(())
}
