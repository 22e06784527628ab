//! Arbitrary small shapes, schedules and inputs through the runtime path: an invalid input
//! must return `Err` (the right one), a valid one must match the float64 oracle.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run dilated_differential -- -max_total_time=60`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dilated_attention_fuzz::dilated_differential(data);
});
