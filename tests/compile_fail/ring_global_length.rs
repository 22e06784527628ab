// 3 ranks of 1000 tokens do not fit segment 2048
use dilated_attention::prelude::*;

fn main() {
    #[allow(clippy::let_unit_value)]
    let () = CheckedRing::<1000, 3, Seg<2048, 1>>::OK;
}
