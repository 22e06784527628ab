//! Dilated attention as a dfdx op: the forward runs our CPU kernel and registers one
//! backward closure on the dfdx tape, which calls our CPU backward from the saved `out`
//! and `L`.
//!
//! # How it plugs into dfdx
//!
//! dfdx records a program as a list of closures on a [`Tape`]. An op splits the tapes off
//! its inputs, merges them, computes its output without a tape, pushes one closure and
//! puts the merged tape on the output. The closure receives the [`Gradients`] store and
//! reads the output's gradient / adds into the inputs' gradients by tensor id
//! ([`Gradients::get_or_alloc_mut`], public in dfdx 0.13). This op does the same:
//!
//! * the tapes of `q`, `k`, `v` are merged (the tape type is the one of `q`, as for
//!   dfdx's binary ops where the left operand carries the tape: `OwnedTape` on `q` with
//!   `OwnedTape` or `NoneTape` on `k`, `v`, or `NoneTape` everywhere);
//! * with a `NoneTape` nothing is saved and nothing is pushed (inference costs one
//!   forward and no memory for the backward);
//! * with an `OwnedTape` the closure keeps `q`, `k`, `v` (shared, not copied), `out`, `L`
//!   and the mask, and calls [`crate::ops::dilated::try_backward`] — the same
//!   kernel the runtime API exposes, so the gradients are the exact gradients of
//!   SPEC §1 (through the combine weights, or with them detached if asked).
//!
//! Inputs may be strided views (a `permute`d or broadcast tensor): they are first made
//! contiguous with dfdx's own `try_contiguous` (a no-op for a row-major tensor), whose
//! backward routes the gradient back through the view, so a broadcast input receives the
//! sum over its broadcast axes.

use dfdx::shapes::{Const, Dim, Dtype, HasShape};
use dfdx::tensor::{Cpu, CpuError, Gradients, Merge, PutTape, SplitTape, Tape, Tensor};
use dfdx::tensor_ops::{Device, ReshapeTo};

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::dilated;
use crate::shape::typed::{CombineKind, Schedule};
use crate::shape::Plan;
use crate::tensor::{Bnh, Bnhd, DilatedAttention, KeyMask};

/// `(B, N, H, D)` tensor on the CPU with tape `T`.
pub type TapedBnhd<B, const N: usize, const H: usize, const D: usize, E, T> =
    Tensor<(B, Const<N>, Const<H>, Const<D>), E, Cpu, T>;

impl<S: Schedule, C: CombineKind> DilatedAttention<S, C> {
    /// Forward that records its backward on the dfdx tape carried by `q` (merged with
    /// the tapes of `k` and `v`). Returns `out`, `(B, N, H, D)`, with the merged tape;
    /// `loss.backward()` then yields exact gradients for `q`, `k` and `v`.
    ///
    /// `q` is `(batch, seq, heads, dim)`, `k` and `v` are `(batch, seq, kv_heads, dim)`,
    /// `mask` is the `(batch, seq)` key padding mask (`true` = attend).
    ///
    /// ```
    /// use dilated_attention::prelude::*;
    /// use dfdx::tensor::Trace;
    /// use dfdx::tensor_ops::{Backward, SumTo};
    /// let dev = Cpu::default();
    /// let q: Tensor<Rank4<1, 16, 2, 4>, f64, _> = dev.sample_normal();
    /// let k: Tensor<Rank4<1, 16, 2, 4>, f64, _> = dev.sample_normal();
    /// let v: Tensor<Rank4<1, 16, 2, 4>, f64, _> = dev.sample_normal();
    /// let attn = DilatedAttention::<(Seg<4, 1>, Seg<16, 4>)>::new().causal(true);
    /// let out = attn.try_forward_taped(q.leaky_trace(), k.clone(), v.clone(), None)?;
    /// let grads = out.square().sum().backward();
    /// assert_eq!(grads.get(&q).shape(), q.shape());
    /// # Ok::<(), dilated_attention::Error>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn try_forward_taped<
        B: Dim,
        const N: usize,
        const H: usize,
        const HKV: usize,
        const D: usize,
        E,
        T,
        Tk,
        Tv,
    >(
        &self,
        q: TapedBnhd<B, N, H, D, E, T>,
        k: TapedBnhd<B, N, HKV, D, E, Tk>,
        v: TapedBnhd<B, N, HKV, D, E, Tv>,
        mask: Option<&KeyMask<B, N>>,
    ) -> Result<TapedBnhd<B, N, H, D, E, T>>
    where
        E: Element + Dtype,
        Cpu: Device<E>,
        T: Tape<E, Cpu> + Merge<Tk> + Merge<Tv>,
        Tk: Tape<E, Cpu>,
        Tv: Tape<E, Cpu>,
    {
        // A strided view (permuted, broadcast) is copied into row-major order by a
        // dfdx op that routes its gradient back; a contiguous tensor passes unchanged.
        let (q, qt) = q.try_contiguous().map_err(from_cpu_error)?.split_tape();
        let (k, kt) = k.try_contiguous().map_err(from_cpu_error)?.split_tape();
        let (v, vt) = v.try_contiguous().map_err(from_cpu_error)?.split_tape();
        let mut tape = qt.merge(kt).merge(vt);
        let (out, lse) = self.try_forward(&q, &k, &v, mask)?;
        if T::OWNS_TAPE {
            let saved = Saved {
                plan: self.plan::<N, H, HKV, D>(q.shape().0.size())?,
                mask: mask.cloned(),
                out: out.clone(),
                lse,
                q,
                k,
                v,
            };
            tape.add_backward_op(move |grads| saved.backward(grads));
        }
        Ok(out.put_tape(tape))
    }

    /// [`try_forward_taped`](Self::try_forward_taped) without a mask, panicking on error
    /// (the typed shapes leave none possible without a mask).
    pub fn forward_taped<
        B: Dim,
        const N: usize,
        const H: usize,
        const HKV: usize,
        const D: usize,
        E,
        T,
        Tk,
        Tv,
    >(
        &self,
        q: TapedBnhd<B, N, H, D, E, T>,
        k: TapedBnhd<B, N, HKV, D, E, Tk>,
        v: TapedBnhd<B, N, HKV, D, E, Tv>,
    ) -> TapedBnhd<B, N, H, D, E, T>
    where
        E: Element + Dtype,
        Cpu: Device<E>,
        T: Tape<E, Cpu> + Merge<Tk> + Merge<Tv>,
        Tk: Tape<E, Cpu>,
        Tv: Tape<E, Cpu>,
    {
        self.try_forward_taped(q, k, v, None).unwrap()
    }
}

/// What the backward closure keeps alive.
struct Saved<B: Dim, const N: usize, const H: usize, const HKV: usize, const D: usize, E: Dtype> {
    plan: Plan,
    mask: Option<KeyMask<B, N>>,
    out: Bnhd<B, N, H, D, E>,
    lse: Bnh<B, N, H, E>,
    q: Bnhd<B, N, H, D, E>,
    k: Bnhd<B, N, HKV, D, E>,
    v: Bnhd<B, N, HKV, D, E>,
}

impl<
        B: Dim,
        const N: usize,
        const H: usize,
        const HKV: usize,
        const D: usize,
        E: Element + Dtype,
    > Saved<B, N, H, HKV, D, E>
{
    fn backward(self, grads: &mut Gradients<E, Cpu>) -> std::result::Result<(), CpuError> {
        // `out` was made by `tensor_from_vec`, so its gradient buffer is contiguous.
        let grad_out: Vec<E> = grads.get_or_alloc_mut(&self.out)?.to_vec();
        let (dq, dk, dv) = self.grads(&grad_out).map_err(to_cpu_error)?;
        add_into(grads.get_or_alloc_mut(&self.q)?, &dq)?;
        add_into(grads.get_or_alloc_mut(&self.k)?, &dk)?;
        add_into(grads.get_or_alloc_mut(&self.v)?, &dv)?;
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn grads(&self, grad_out: &[E]) -> Result<(Vec<E>, Vec<E>, Vec<E>)> {
        let mv = self.mask.as_ref().map(|m| m.as_vec());
        let g = dilated::try_backward(
            &self.plan,
            &self.q.as_vec(),
            &self.k.as_vec(),
            &self.v.as_vec(),
            mv.as_deref(),
            &self.out.as_vec(),
            &self.lse.as_vec(),
            grad_out,
        )?;
        Ok((g.dq, g.dk, g.dv))
    }
}

fn from_cpu_error(e: CpuError) -> Error {
    Error::Device {
        msg: format!("dfdx: {e}"),
    }
}

/// The forward validated everything the backward sees; an error here is a broken
/// invariant, reported through the only error type a tape closure may return.
fn to_cpu_error(_: Error) -> CpuError {
    CpuError::WrongNumElements
}

/// `grad += src`: the saved tensors are contiguous (see `try_forward_taped`), so their
/// gradient buffers are row-major like `src`.
pub(crate) fn add_into<E: Element>(grad: &mut [E], src: &[E]) -> std::result::Result<(), CpuError> {
    if grad.len() != src.len() {
        return Err(CpuError::WrongNumElements);
    }
    for (g, s) in grad.iter_mut().zip(src) {
        *g += *s;
    }
    Ok(())
}
