//! The typed front door agrees with the runtime path, and valid neighbours of every
//! compile-fail case (see `tests/compile_fail/`) compile and run.

mod common;

use common::*;
use dilated_attention::ops::{dilated, reference};
use dilated_attention::prelude::*;

#[test]
fn typed_matches_oracle_with_mask_gqa_and_causal() {
    let dev = Cpu::default();
    let q: Tensor<(usize, Const<32>, Const<4>, Const<8>), f64, _> =
        dev.tensor_from_vec(normal(1, 2 * 32 * 4 * 8), (2, Const, Const, Const));
    let k: Tensor<(usize, Const<32>, Const<2>, Const<8>), f64, _> =
        dev.tensor_from_vec(normal(2, 2 * 32 * 2 * 8), (2, Const, Const, Const));
    let v: Tensor<(usize, Const<32>, Const<2>, Const<8>), f64, _> =
        dev.tensor_from_vec(normal(3, 2 * 32 * 2 * 8), (2, Const, Const, Const));
    let mut mask = vec![true; 64];
    mask[5] = false;
    mask[40] = false;
    let m: KeyMask<usize, 32> = dev.tensor_from_vec(mask.clone(), (2, Const));
    let attn = DilatedAttention::<(Seg<8, 1>, Seg<16, 2>, Seg<64, 4>)>::new().causal(true);
    let (out, lse) = attn.try_forward(&q, &k, &v, Some(&m)).unwrap();
    let plan = attn.plan::<32, 4, 2, 8>(2).unwrap();
    let want =
        reference::forward(&plan, &q.as_vec(), &k.as_vec(), &v.as_vec(), Some(&mask)).unwrap();
    assert_close("out", &out.as_vec(), &want.out, 1e-12, 1e-12, &"typed");
    assert_lse(&lse.as_vec(), &want.lse, 1e-12, &"typed");

    let go: Tensor<(usize, Const<32>, Const<4>, Const<8>), f64, _> =
        dev.tensor_from_vec(normal(4, 2 * 32 * 4 * 8), (2, Const, Const, Const));
    let (dq, dk, dv) = attn
        .try_backward(&q, &k, &v, Some(&m), &out, &lse, &go)
        .unwrap();
    let g = reference::backward(
        &plan,
        &q.as_vec(),
        &k.as_vec(),
        &v.as_vec(),
        Some(&mask),
        &go.as_vec(),
    )
    .unwrap();
    assert_close("dq", &dq.as_vec(), &g.dq, 1e-12, 1e-12, &"typed");
    assert_close("dk", &dk.as_vec(), &g.dk, 1e-12, 1e-12, &"typed");
    assert_close("dv", &dv.as_vec(), &g.dv, 1e-12, 1e-12, &"typed");
}

#[test]
fn head_groups_typed_f32() {
    let dev = Cpu::default();
    let q: Tensor<Rank4<1, 16, 3, 4>, f32, _> = dev.sample_normal();
    let attn = DilatedAttention::<(Seg<4, 1>, Seg<8, 2>, Seg<16, 4>), HeadGroupCombine>::new();
    let (out, _) = attn.forward(&q, &q, &q);
    let plan = attn.plan::<16, 3, 3, 4>(1).unwrap();
    assert_eq!(plan.options().combine, Combine::HeadGroups);
    let qv = q.as_vec();
    let want = dilated::try_forward(&plan, &qv, &qv, &qv, None).unwrap();
    assert_eq!(out.as_vec(), want.out);
}

#[test]
fn batch_mismatch_is_an_error() {
    let dev = Cpu::default();
    let q: Tensor<(usize, Const<8>, Const<1>, Const<2>), f32, _> =
        dev.tensor_from_vec(vec![0.5; 16], (1, Const, Const, Const));
    let k: Tensor<(usize, Const<8>, Const<1>, Const<2>), f32, _> =
        dev.tensor_from_vec(vec![0.5; 32], (2, Const, Const, Const));
    let attn = DilatedAttention::<Seg<8, 1>>::new();
    let e = attn.try_forward(&q, &k, &k, None).unwrap_err();
    assert_eq!(
        e,
        Error::LengthMismatch {
            what: "batch",
            expected: 1,
            got: 2
        }
    );
}

/// The valid neighbours of the compile-fail cases.
#[test]
fn valid_neighbours_compile() {
    // segment 2048 divides 4096 (neighbour of 3000)
    let () = Checked::<4096, 8, 8, 64, Seg<2048, 1>, LseCombine>::OK;
    // dilation equal to the segment (neighbour of r > w and r = 0)
    let () = Checked::<64, 8, 8, 64, Seg<16, 16>, LseCombine>::OK;
    // as many patterns as heads under head groups (neighbour of G > H)
    let () = Checked::<64, 2, 2, 8, (Seg<16, 1>, Seg<32, 2>), HeadGroupCombine>::OK;
    // heads a multiple of kv heads (neighbour of 8 / 3)
    let () = Checked::<64, 8, 4, 8, Seg<16, 1>, LseCombine>::OK;
    // a segment longer than the sequence is capped (valid)
    let () = Checked::<64, 8, 4, 8, Seg<1024, 4>, LseCombine>::OK;
    // ring: 4 ranks of 1024 satisfy a schedule with segment 2048
    let () = CheckedRing::<1024, 4, (Seg<2048, 1>, Seg<4096, 2>)>::OK;
}
