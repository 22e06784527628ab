// 8 heads, 3 kv heads
use dilated_attention::prelude::*;

fn main() {
    let _ = DilatedAttention::<Seg<16, 1>>::new().plan::<64, 8, 3, 8>(1);
}
