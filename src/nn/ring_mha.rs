//! [`RingMultiheadDilatedAttention`]: a [`MultiheadDilatedAttention`] run over a ring of
//! `WORLD` ranks, each holding `LOCAL` rows of the sequence (sequence parallelism).
//!
//! ```text
//! rank r:  x_r (B, LOCAL, M) ─┬─ w_q ─> q_r ─┐
//!                             ├─ w_k ─> k_r ─┼─ ring attention (RingComm, layout) ─┐
//!                             └─ w_v ─> v_r ─┘   the only step that talks          │
//!                                                                                   │
//!          y_r (B, LOCAL, M) <── w_o <── sub-LayerNorm <── dropout <── merge heads ─┘
//! ```
//!
//! Every step but attention is row-wise (a projection, a LayerNorm over the features, a
//! dropout), so it runs on the rank's own rows and the sequence is split *before* the
//! projections: no rank ever holds more than its `LOCAL` rows of `x`, `q`, `k`, `v`.
//! Attention is [`crate::ring::try_forward`] with the rank's communicator; its backward,
//! recorded on the dfdx tape like the single-device op ([`super::autograd`]), is
//! [`crate::ring::try_backward`] — a collective, so **every rank calls
//! `loss.backward()`** (and in the same order of ring layers).
//!
//! What equals the single-device module with the same parameters, given the same global
//! input split by the layout:
//!
//! * the output rows and the input gradient rows of each rank;
//! * the **sum over ranks** of the parameter gradients: each rank's gradients are partial
//!   sums over its own rows. [`try_all_reduce_grads`] (or the method of the same name)
//!   sums them in place with a ring all-reduce, after which every rank holds the
//!   single-device gradients and an optimizer step keeps the replicas identical.
//!
//! Dropout draws from each rank's own device RNG, so with `dropout > 0` the masks (not
//! their distribution) differ from a single-device run.
//!
//! The wrapper also takes a [`FusedMultiheadDilatedAttention`]
//! ([`try_new_fused`](RingMultiheadDilatedAttention::try_new_fused)): the fused q/k/v
//! projection is row-wise as well, and the ring op is the same.

use std::cell::RefCell;
use std::rc::Rc;

use dfdx::nn::ViewTensorRef;
use dfdx::nn::{Module, RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor};
use dfdx::shapes::{Const, Dim, Dtype, HasShape, Shape};
use dfdx::tensor::{
    Cpu, CpuError, Gradients, Merge, PutTape, SplitTape, Tape, Tensor, TensorFromVec,
};
use dfdx::tensor_ops::{Device, ReshapeTo};
use num_traits::Float;
use rand::distributions::uniform::SampleUniform;

use super::autograd::{add_into, TapedBnhd};
use super::fused::{FusedBuilder, FusedMultiheadDilatedAttention};
use super::mha::{builder, dfdx_err, output_block, Causality, MultiheadDilatedAttention};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ring::{self, Geometry, Layout, RingComm, RingStats};
use crate::shape::typed::{CheckedRingConfig, CombineKind, Schedule};
use crate::shape::{Dims, Options, Pattern, Plan};
use crate::tensor::KeyMask;

/// A [`MultiheadDilatedAttention`] or [`FusedMultiheadDilatedAttention`] (`Mod`) bound to
/// one rank of a ring of `WORLD` ranks that each hold `LOCAL` rows; see the
/// [module docs](self).
///
/// It borrows the module (the parameters stay in one place, visited by optimizers as
/// usual) and shares the communicator through an [`Rc`] (the backward closure on the
/// dfdx tape keeps a handle; several layers may share one communicator).
/// `LOCAL · WORLD` is checked against the schedule at compile time
/// ([`CheckedRingConfig`]); the communicator's world size and the layout at
/// [`try_new`](Self::try_new). It is cheap to make (one small allocation): bind
/// one per training step, since the optimizer needs the module mutably between steps.
///
/// ```
/// use std::rc::Rc;
/// use dilated_attention::nn::{builder, RingMultiheadDilatedAttention};
/// use dilated_attention::prelude::*;
/// use dilated_attention::ring::loopback;
/// use dfdx::nn::DeviceBuildExt;
///
/// type Attn = builder::MultiheadDilatedAttention<8, 2, 1, 4, (Seg<4, 1>, Seg<16, 4>), Causal>;
/// let mha = Cpu::default().build_module::<Attn, f32>();
/// let rows = loopback::run(2, CommConfig::default(), |comm| {
///     let ring = RingMultiheadDilatedAttention::<_, _, 8, 2>::try_new(
///         &mha, Rc::new(comm), Layout::Zigzag)?;
///     let x: Tensor<Rank3<1, 8, 8>, f32, _> = Cpu::default().sample_normal();
///     Ok(ring.try_forward_masked(x, None)?.as_vec().len())
/// })?;
/// assert!(rows.iter().all(|r| matches!(r, Ok(64))));
/// # Ok::<(), dilated_attention::Error>(())
/// ```
///
/// A global length the schedule does not divide is a compile error:
///
/// ```compile_fail,E0080
/// use std::rc::Rc;
/// use dilated_attention::nn::{builder, RingMultiheadDilatedAttention};
/// use dilated_attention::prelude::*;
/// use dfdx::nn::DeviceBuildExt;
/// type Attn = builder::MultiheadDilatedAttention<8, 2, 1, 4, Seg<16, 1>>;
/// let mha = Cpu::default().build_module::<Attn, f32>();
/// let comm = Loopback::ring(2, CommConfig::default()).unwrap().remove(0);
/// // 2 x 12 = 24 is not a multiple of the segment 16.
/// let _ = RingMultiheadDilatedAttention::<_, _, 12, 2>::try_new(&mha, Rc::new(comm), Layout::Contiguous);
/// ```
#[derive(Debug)]
pub struct RingMultiheadDilatedAttention<'m, Cm, Mod, const LOCAL: usize, const WORLD: usize> {
    module: &'m Mod,
    comm: Rc<Cm>,
    layout: Layout,
    shared: Rc<Shared>,
}

/// State shared with the backward closures on the tape.
#[derive(Debug, Default)]
struct Shared {
    /// Forward and backward statistics since the last `take_stats`.
    stats: RefCell<Option<RingStats>>,
    /// The error of a failed ring backward (a tape closure can only return `CpuError`).
    failure: RefCell<Option<Error>>,
}

impl Shared {
    fn record(&self, s: &RingStats) {
        let mut st = self.stats.borrow_mut();
        match st.as_mut() {
            Some(acc) => acc.merge(s),
            None => *st = Some(s.clone()),
        }
    }
}

/// The module types a [`RingMultiheadDilatedAttention`] wraps.
type Mhda<const M: usize, const H: usize, const HKV: usize, const HD: usize, S, E, A, C> =
    MultiheadDilatedAttention<M, H, HKV, HD, S, E, Cpu, A, C>;
type Fused<const M: usize, const H: usize, const HD: usize, S, E, A, C> =
    FusedMultiheadDilatedAttention<M, H, HD, S, E, Cpu, A, C>;

/// What does not depend on the wrapped module.
impl<'m, Cm: RingComm, Mod, const LOCAL: usize, const WORLD: usize>
    RingMultiheadDilatedAttention<'m, Cm, Mod, LOCAL, WORLD>
{
    /// The runtime checks of `try_new`: the communicator's world size and the layout.
    fn bind(module: &'m Mod, comm: Rc<Cm>, layout: Layout) -> Result<Self> {
        if comm.world_size() != WORLD {
            return Err(Error::Ring {
                msg: format!(
                    "RingMultiheadDilatedAttention is typed for a world of {WORLD} ranks, the communicator has {}",
                    comm.world_size()
                ),
            });
        }
        Geometry::new(layout, WORLD, LOCAL)?;
        Ok(RingMultiheadDilatedAttention {
            module,
            comm,
            layout,
            shared: Rc::default(),
        })
    }

    /// The wrapped module (its parameters are the ones the gradients refer to).
    pub fn module(&self) -> &'m Mod {
        self.module
    }
    /// The communicator.
    pub fn comm(&self) -> &Rc<Cm> {
        &self.comm
    }
    /// The layout: which global positions this rank's rows are.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// The global positions of this rank's `LOCAL` rows, in local order.
    pub fn positions(&self) -> Vec<usize> {
        Geometry {
            layout: self.layout,
            world: WORLD,
            local: LOCAL,
        }
        .positions(self.comm.rank())
    }

    /// Statistics of the ring calls (forward and backward attention, not the gradient
    /// all-reduce) since the last call, merged; `None` if there was none.
    pub fn take_stats(&self) -> Option<RingStats> {
        self.shared.stats.borrow_mut().take()
    }

    /// Why the last ring backward failed. dfdx's `backward()` only sees a `CpuError`
    /// (and `backward()` panics on it): call `try_backward()` and, on `Err`, read the
    /// ring's [`Error::Comm`] (rank, step, peer) here.
    pub fn take_backward_error(&self) -> Option<Error> {
        self.shared.failure.borrow_mut().take()
    }

    /// Sum the module's parameter gradients over the ring, in place (see
    /// [`try_all_reduce_grads`]). Collective.
    pub fn try_all_reduce_grads<E>(&self, grads: &mut Gradients<E, Cpu>) -> Result<RingStats>
    where
        E: Dtype + Element,
        Cpu: Device<E>,
        Mod: TensorCollection<E, Cpu>,
    {
        try_all_reduce_grads(&*self.comm, self.module, grads)
    }

    /// The taped ring op on this rank's projected rows, for the global `plan`.
    #[allow(clippy::type_complexity)]
    fn ring_op<B, const H: usize, const HKV: usize, const HD: usize, E, T, Tk, Tv>(
        &self,
        plan: Plan,
        q: TapedBnhd<B, LOCAL, H, HD, E, T>,
        k: TapedBnhd<B, LOCAL, HKV, HD, E, Tk>,
        v: TapedBnhd<B, LOCAL, HKV, HD, E, Tv>,
        mask: Option<&KeyMask<B, LOCAL>>,
    ) -> Result<TapedBnhd<B, LOCAL, H, HD, E, T>>
    where
        Cm: 'static,
        B: Dim,
        E: Dtype + Element,
        Cpu: Device<E>,
        T: Tape<E, Cpu> + Merge<Tk> + Merge<Tv>,
        Tk: Tape<E, Cpu>,
        Tv: Tape<E, Cpu>,
    {
        let (q, qt) = q.try_contiguous().map_err(dfdx_err)?.split_tape();
        let (k, kt) = k.try_contiguous().map_err(dfdx_err)?.split_tape();
        let (v, vt) = v.try_contiguous().map_err(dfdx_err)?.split_tape();
        let mut tape = qt.merge(kt).merge(vt);
        let mask = mask.map(|m| m.as_vec());
        let f = ring::try_forward(
            &*self.comm,
            &plan,
            self.layout,
            &q.as_vec(),
            &k.as_vec(),
            &v.as_vec(),
            mask.as_deref(),
        )?;
        self.shared.record(&f.stats);
        let out = q
            .device()
            .try_tensor_from_vec(f.out, *q.shape())
            .map_err(dfdx_err)?;
        if T::OWNS_TAPE {
            let saved = RingSaved {
                comm: Rc::clone(&self.comm),
                shared: Rc::clone(&self.shared),
                plan,
                layout: self.layout,
                mask,
                out: out.clone(),
                lse: f.lse,
                q,
                k,
                v,
            };
            tape.add_backward_op(move |grads| saved.backward(grads));
        }
        Ok(out.put_tape(tape))
    }
}

/// The global plan (`seq = LOCAL · WORLD`) of a module's attention for batch `batch`.
fn global_plan<const LOCAL: usize, const WORLD: usize, const H: usize, const HKV: usize>(
    head_dim: usize,
    batch: usize,
    patterns: &[Pattern],
    opts: Options,
) -> Result<Plan> {
    Plan::new(
        Dims {
            batch,
            seq: LOCAL * WORLD,
            heads: H,
            kv_heads: HKV,
            head_dim,
        },
        patterns,
        opts,
    )
}

impl<
        'm,
        Cm,
        const M: usize,
        const H: usize,
        const HKV: usize,
        const HD: usize,
        S,
        E,
        A,
        C,
        const LOCAL: usize,
        const WORLD: usize,
    > RingMultiheadDilatedAttention<'m, Cm, Mhda<M, H, HKV, HD, S, E, A, C>, LOCAL, WORLD>
where
    Cm: RingComm + 'static,
    S: Schedule,
    E: Dtype + Element + Float + SampleUniform,
    Cpu: Device<E>,
    A: Causality,
    C: CombineKind,
{
    /// Bind `module` to this rank of `comm`. `Err` if the communicator's world size is
    /// not `WORLD`, or if the zigzag layout is asked for with an odd `LOCAL`.
    pub fn try_new(
        module: &'m Mhda<M, H, HKV, HD, S, E, A, C>,
        comm: Rc<Cm>,
        layout: Layout,
    ) -> Result<Self> {
        #[allow(clippy::let_unit_value)]
        let () = builder::MultiheadDilatedAttention::<M, H, HKV, HD, S, A, C>::TYPE_CHECK;
        #[allow(clippy::let_unit_value)]
        let () = CheckedRingConfig::<LOCAL, WORLD, H, HKV, HD, S, C>::OK;
        Self::bind(module, comm, layout)
    }

    /// The global plan (`seq = LOCAL · WORLD`) for batch `batch`, with the module's
    /// attention options.
    pub fn plan(&self, batch: usize) -> Result<Plan> {
        global_plan::<LOCAL, WORLD, H, HKV>(
            HD,
            batch,
            S::PATTERNS,
            self.module.attention().options(),
        )
    }

    /// Self-attention over this rank's rows `x: (batch, LOCAL, M)` (in the layout's local
    /// order) with an optional `(batch, LOCAL)` key padding mask of the same rows
    /// (`true` = attend). Returns this rank's rows of the single-device output. Every
    /// rank of the ring must call it (collective).
    #[allow(clippy::type_complexity)]
    pub fn try_forward_masked<B: Dim, T>(
        &self,
        x: Tensor<(B, Const<LOCAL>, Const<M>), E, Cpu, T>,
        mask: Option<&KeyMask<B, LOCAL>>,
    ) -> Result<Tensor<(B, Const<LOCAL>, Const<M>), E, Cpu, T>>
    where
        T: Tape<E, Cpu> + Merge<T>,
    {
        let m = self.module;
        let b = x.shape().0;
        let q = m.w_q.try_forward(x.retaped::<T>()).map_err(dfdx_err)?;
        let k = m.w_k.try_forward(x.retaped::<T>()).map_err(dfdx_err)?;
        let v = m.w_v.try_forward(x).map_err(dfdx_err)?;
        let o = self.try_attention_taped(q, k, v, mask)?;
        output_block(o, b, m.dropout, &m.norm, &m.w_o)
    }

    /// The ring attention op alone, on this rank's projected rows: `q (B, LOCAL, H, HD)`,
    /// `k`/`v (B, LOCAL, HKV, HD)`, mask `(B, LOCAL)`. Like
    /// [`DilatedAttention::try_forward_taped`](crate::DilatedAttention::try_forward_taped)
    /// it merges the three tapes and, with an `OwnedTape`, records a backward that runs
    /// the ring backward (collective) and adds the local dQ, dK, dV.
    #[allow(clippy::type_complexity)]
    pub fn try_attention_taped<B: Dim, T, Tk, Tv>(
        &self,
        q: TapedBnhd<B, LOCAL, H, HD, E, T>,
        k: TapedBnhd<B, LOCAL, HKV, HD, E, Tk>,
        v: TapedBnhd<B, LOCAL, HKV, HD, E, Tv>,
        mask: Option<&KeyMask<B, LOCAL>>,
    ) -> Result<TapedBnhd<B, LOCAL, H, HD, E, T>>
    where
        T: Tape<E, Cpu> + Merge<Tk> + Merge<Tv>,
        Tk: Tape<E, Cpu>,
        Tv: Tape<E, Cpu>,
    {
        let plan = self.plan(q.shape().0.size())?;
        self.ring_op(plan, q, k, v, mask)
    }
}

impl<
        'm,
        Cm,
        const M: usize,
        const H: usize,
        const HD: usize,
        S,
        E,
        A,
        C,
        const LOCAL: usize,
        const WORLD: usize,
    > RingMultiheadDilatedAttention<'m, Cm, Fused<M, H, HD, S, E, A, C>, LOCAL, WORLD>
where
    Cm: RingComm + 'static,
    S: Schedule,
    E: Dtype + Element + Float + SampleUniform,
    Cpu: Device<E>,
    A: Causality,
    C: CombineKind,
{
    /// Bind the fused-projection `module` to this rank of `comm` (see the separate
    /// module's `try_new`).
    pub fn try_new_fused(
        module: &'m Fused<M, H, HD, S, E, A, C>,
        comm: Rc<Cm>,
        layout: Layout,
    ) -> Result<Self> {
        #[allow(clippy::let_unit_value)]
        let () = FusedBuilder::<M, H, HD, S, A, C>::TYPE_CHECK;
        #[allow(clippy::let_unit_value)]
        let () = CheckedRingConfig::<LOCAL, WORLD, H, H, HD, S, C>::OK;
        Self::bind(module, comm, layout)
    }

    /// The global plan (`seq = LOCAL · WORLD`) for batch `batch`.
    pub fn plan(&self, batch: usize) -> Result<Plan> {
        global_plan::<LOCAL, WORLD, H, H>(HD, batch, S::PATTERNS, self.module.attention().options())
    }

    /// This rank's rows of the fused module's output (see the separate module's
    /// `try_forward_masked`). Collective.
    #[allow(clippy::type_complexity)]
    pub fn try_forward_masked<B: Dim, T>(
        &self,
        x: Tensor<(B, Const<LOCAL>, Const<M>), E, Cpu, T>,
        mask: Option<&KeyMask<B, LOCAL>>,
    ) -> Result<Tensor<(B, Const<LOCAL>, Const<M>), E, Cpu, T>>
    where
        T: Tape<E, Cpu> + Merge<T>,
    {
        let m = self.module;
        let b = x.shape().0;
        let (q, k, v) = m.w_qkv.try_forward(x).map_err(dfdx_err)?;
        let plan = self.plan(b.size())?;
        let o = self.ring_op(plan, q, k, v, mask)?;
        output_block(o, b, m.dropout, &m.norm, &m.w_o)
    }
}

macro_rules! ring_module_impl {
    ($module:ty; $($extra:tt)*) => {
        impl<'m, Cm, const M: usize, const H: usize, $($extra)* const HD: usize, S, E, A, C, B, T,
             const LOCAL: usize, const WORLD: usize>
            Module<Tensor<(B, Const<LOCAL>, Const<M>), E, Cpu, T>>
            for RingMultiheadDilatedAttention<'m, Cm, $module, LOCAL, WORLD>
        where
            Cm: RingComm + 'static,
            S: Schedule,
            E: Dtype + Element + Float + SampleUniform,
            Cpu: Device<E>,
            A: Causality,
            C: CombineKind,
            B: Dim,
            T: Tape<E, Cpu> + Merge<T>,
        {
            type Output = Tensor<(B, Const<LOCAL>, Const<M>), E, Cpu, T>;
            /// This crate's error: a ring can fail for reasons a device error cannot name.
            type Error = Error;

            /// This rank's rows `(batch, LOCAL, M) -> (batch, LOCAL, M)`; collective.
            fn try_forward(
                &self,
                x: Tensor<(B, Const<LOCAL>, Const<M>), E, Cpu, T>,
            ) -> Result<Self::Output> {
                self.try_forward_masked(x, None)
            }
        }
    };
}
ring_module_impl!(Mhda<M, H, HKV, HD, S, E, A, C>; const HKV: usize,);
ring_module_impl!(Fused<M, H, HD, S, E, A, C>;);

/// What the ring backward closure keeps alive.
struct RingSaved<
    Cm,
    B: Dim,
    const N: usize,
    const H: usize,
    const HKV: usize,
    const D: usize,
    E: Dtype,
> {
    comm: Rc<Cm>,
    shared: Rc<Shared>,
    plan: Plan,
    layout: Layout,
    mask: Option<Vec<bool>>,
    out: Tensor<(B, Const<N>, Const<H>, Const<D>), E, Cpu>,
    lse: Vec<E>,
    q: Tensor<(B, Const<N>, Const<H>, Const<D>), E, Cpu>,
    k: Tensor<(B, Const<N>, Const<HKV>, Const<D>), E, Cpu>,
    v: Tensor<(B, Const<N>, Const<HKV>, Const<D>), E, Cpu>,
}

impl<Cm, B, const N: usize, const H: usize, const HKV: usize, const D: usize, E>
    RingSaved<Cm, B, N, H, HKV, D, E>
where
    Cm: RingComm,
    B: Dim,
    E: Element + Dtype,
{
    fn backward(self, grads: &mut Gradients<E, Cpu>) -> std::result::Result<(), CpuError> {
        // `out` was made by `tensor_from_vec`, so its gradient buffer is contiguous.
        let grad_out: Vec<E> = grads.get_or_alloc_mut(&self.out)?.to_vec();
        let r = ring::try_backward(
            &*self.comm,
            &self.plan,
            self.layout,
            &self.q.as_vec(),
            &self.k.as_vec(),
            &self.v.as_vec(),
            self.mask.as_deref(),
            &self.out.as_vec(),
            &self.lse,
            &grad_out,
        );
        let (g, stats) = match r {
            Ok(x) => x,
            Err(e) => {
                *self.shared.failure.borrow_mut() = Some(e);
                return Err(CpuError::WrongNumElements);
            }
        };
        self.shared.record(&stats);
        add_into(grads.get_or_alloc_mut(&self.q)?, &g.dq)?;
        add_into(grads.get_or_alloc_mut(&self.k)?, &g.dk)?;
        add_into(grads.get_or_alloc_mut(&self.v)?, &g.dv)?;
        Ok(())
    }
}

/// Sum the gradients of every trainable tensor of `model` over all ranks of `comm`, in
/// place, with one ring all-reduce ([`ring::try_all_reduce_sum`]) over the gradients
/// flattened in the model's visiting order. Afterwards every rank holds the same
/// gradients: in sequence-parallel training, those of the whole sequence.
///
/// Works for any dfdx model (`TensorCollection`), not only attention: a LongNet whose
/// every layer runs on the rank's rows needs it for its MLPs and norms too. A gradient
/// missing on a rank counts as zero (it is allocated), so every rank sends the same
/// length. Collective: every rank calls it, with the same model type.
pub fn try_all_reduce_grads<Cm, E, Mod>(
    comm: &Cm,
    model: &Mod,
    grads: &mut Gradients<E, Cpu>,
) -> Result<RingStats>
where
    Cm: RingComm,
    E: Dtype + Element,
    Cpu: Device<E>,
    Mod: TensorCollection<E, Cpu>,
{
    let mut flat = Vec::new();
    let mut io = GradIo {
        grads,
        flat: &mut flat,
        read_back: None,
    };
    Mod::iter_tensors(&mut RecursiveWalker {
        m: model,
        f: &mut io,
    })
    .map_err(dfdx_err)?;
    let stats = ring::try_all_reduce_sum(comm, &mut flat)?;
    let mut io = GradIo {
        grads,
        flat: &mut flat,
        read_back: Some(0),
    };
    Mod::iter_tensors(&mut RecursiveWalker {
        m: model,
        f: &mut io,
    })
    .map_err(dfdx_err)?;
    Ok(stats)
}

/// Copies trainable tensors' gradients into `flat` (`read_back: None`) or back from it
/// (`Some(position)`).
struct GradIo<'a, E: Dtype> {
    grads: &'a mut Gradients<E, Cpu>,
    flat: &'a mut Vec<E>,
    read_back: Option<usize>,
}

impl<E: Dtype + Element> TensorVisitor<E, Cpu> for GradIo<'_, E>
where
    Cpu: Device<E>,
{
    type Viewer = ViewTensorRef;
    type Err = CpuError;
    type E2 = E;
    type D2 = Cpu;

    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, E, Cpu>,
        t: &Tensor<S, E, Cpu>,
    ) -> std::result::Result<Option<Tensor<S, E, Cpu>>, CpuError> {
        if opts.do_gradient_update {
            let g = grad_slice(self.grads, t)?;
            match self.read_back.as_mut() {
                None => self.flat.extend_from_slice(g),
                Some(p) => {
                    let src = self
                        .flat
                        .get(*p..*p + g.len())
                        .ok_or(CpuError::WrongNumElements)?;
                    g.copy_from_slice(src);
                    *p += g.len();
                }
            }
        }
        Ok(None)
    }
}

/// The gradient buffer of `t` as a slice. Outside the visitor's `Cpu: Device<E>` bound,
/// so that the buffer type normalises to the CPU vector.
fn grad_slice<'g, E: Dtype, S: Shape>(
    grads: &'g mut Gradients<E, Cpu>,
    t: &Tensor<S, E, Cpu>,
) -> std::result::Result<&'g mut [E], CpuError> {
    Ok(grads.get_or_alloc_mut(t)?)
}
