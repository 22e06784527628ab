// dilation 17 > segment 16
use dilated_attention::prelude::*;

fn main() {
    let _ = DilatedAttention::<Seg<16, 17>>::new().plan::<64, 8, 8, 64>(1);
}
