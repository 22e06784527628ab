// N = 0
use dilated_attention::prelude::*;

fn main() {
    let _ = DilatedAttention::<Seg<16, 1>>::new().plan::<0, 8, 8, 8>(1);
}
