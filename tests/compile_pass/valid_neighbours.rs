// The valid neighbour of every compile-fail case builds.
use dilated_attention::prelude::*;

fn main() {
    let _ = DilatedAttention::<(Seg<2048, 1>, Seg<4096, 1>)>::new().plan::<4096, 8, 8, 64>(1);
    let _ = DilatedAttention::<Seg<2048, 1>>::new().plan::<4096, 8, 8, 64>(1);
    let _ = DilatedAttention::<Seg<16, 16>>::new().plan::<64, 8, 8, 64>(1);
    let _ = DilatedAttention::<(Seg<16, 1>, Seg<32, 2>), HeadGroupCombine>::new().plan::<64, 2, 2, 8>(1);
    let _ = DilatedAttention::<Seg<16, 1>>::new().plan::<64, 8, 4, 8>(1);
    let _ = DilatedAttention::<Seg<16, 1>>::new().plan::<16, 8, 8, 1>(1);
    let _ = DilatedAttention::<Seg<1, 1>>::new().plan::<64, 1, 1, 8>(1);
    #[allow(clippy::let_unit_value)]
    let () = CheckedRing::<1024, 2, Seg<2048, 1>>::OK;
}
