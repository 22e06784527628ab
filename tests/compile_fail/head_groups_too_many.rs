// 3 patterns, 2 heads
use dilated_attention::prelude::*;

fn main() {
    let _ = DilatedAttention::<(Seg<16, 1>, Seg<32, 2>, Seg<64, 4>), HeadGroupCombine>::new().plan::<64, 2, 2, 8>(1);
}
