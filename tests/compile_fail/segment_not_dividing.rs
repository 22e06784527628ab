// segment 3000 does not divide 4096
use dilated_attention::prelude::*;

fn main() {
    let _ = DilatedAttention::<(Seg<2048, 1>, Seg<3000, 1>)>::new().plan::<4096, 8, 8, 64>(1);
}
