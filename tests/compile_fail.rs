//! Every rule of SPEC §1 that types can express is a compile error naming the numbers.
//! The `pass` case forces trybuild to really build (post-monomorphisation const asserts
//! are not evaluated by `cargo check`) and shows the valid neighbours compile.
//! Regenerate the expected messages with `TRYBUILD=overwrite cargo test --test compile_fail`.

#[test]
fn typed_rules_are_compile_errors() {
    let t = trybuild::TestCases::new();
    t.pass("tests/compile_pass/*.rs");
    t.compile_fail("tests/compile_fail/*.rs");
}
