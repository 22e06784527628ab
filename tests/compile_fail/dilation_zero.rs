// dilation 0
use dilated_attention::prelude::*;

fn main() {
    let _ = DilatedAttention::<Seg<2048, 0>>::new().plan::<4096, 8, 8, 64>(1);
}
