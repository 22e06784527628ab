// D = 0
use dilated_attention::prelude::*;

fn main() {
    let _ = DilatedAttention::<Seg<16, 1>>::new().plan::<64, 8, 8, 0>(1);
}
