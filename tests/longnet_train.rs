//! The training example in CI size: a decoder-only LongNet on associative recall must
//! reduce its loss (the full run in `examples/longnet_train.rs` also shows accuracy
//! rising far above chance, which a dense-local model cannot reach).

#[path = "../examples/longnet_train.rs"]
#[allow(dead_code)]
mod longnet_train;

#[test]
fn longnet_ci_run_reduces_the_loss() {
    let report = longnet_train::train_ci(60);
    let (first, last) = report.first_last(10);
    assert!(report.losses.iter().all(|l| l.is_finite()), "{report:?}");
    assert!(
        last < 0.8 * first,
        "loss did not decrease: first 10 steps {first}, last 10 steps {last}"
    );
}

#[test]
fn op_snippet_of_the_book_runs() {
    assert_eq!(
        longnet_train::op_gradients(),
        [64 * 4 * 8, 64 * 2 * 8, 64 * 2 * 8]
    );
}
