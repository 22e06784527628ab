//! The runtime-shaped path: every invalid input is its own `Err`, never a panic.

use dilated_attention::ops::dilated;
use dilated_attention::prelude::*;

fn plan(dims: Dims, s: &[Pattern], o: Options) -> Result<Plan> {
    Plan::new(dims, s, o)
}

#[test]
fn each_rule_has_its_error() {
    let ok = Dims::mha(1, 16, 4, 8);
    let lse = Options::default();
    assert_eq!(
        plan(Dims { batch: 0, ..ok }, &[Pattern::new(8, 1)], lse),
        Err(Error::ZeroDim { dim: "batch" })
    );
    assert_eq!(
        plan(Dims { seq: 0, ..ok }, &[Pattern::new(8, 1)], lse),
        Err(Error::ZeroDim { dim: "seq" })
    );
    assert_eq!(
        plan(Dims { heads: 0, ..ok }, &[Pattern::new(8, 1)], lse),
        Err(Error::ZeroDim { dim: "heads" })
    );
    assert_eq!(
        plan(Dims { kv_heads: 0, ..ok }, &[Pattern::new(8, 1)], lse),
        Err(Error::ZeroDim { dim: "kv_heads" })
    );
    assert_eq!(
        plan(Dims { head_dim: 0, ..ok }, &[Pattern::new(8, 1)], lse),
        Err(Error::ZeroDim { dim: "head_dim" })
    );
    assert_eq!(
        plan(Dims { kv_heads: 3, ..ok }, &[Pattern::new(8, 1)], lse),
        Err(Error::HeadsNotMultiple {
            heads: 4,
            kv_heads: 3
        })
    );
    assert_eq!(plan(ok, &[], lse), Err(Error::EmptySchedule));
    assert_eq!(
        plan(ok, &[Pattern::new(0, 1)], lse),
        Err(Error::ZeroSegment { pattern: 0 })
    );
    assert_eq!(
        plan(ok, &[Pattern::new(8, 1), Pattern::new(8, 0)], lse),
        Err(Error::BadDilation {
            pattern: 1,
            segment: 8,
            dilation: 0
        })
    );
    assert_eq!(
        plan(ok, &[Pattern::new(8, 9)], lse),
        Err(Error::BadDilation {
            pattern: 0,
            segment: 8,
            dilation: 9
        })
    );
    assert_eq!(
        plan(ok, &[Pattern::new(6, 1)], lse),
        Err(Error::SegmentNotDividing {
            pattern: 0,
            segment: 6,
            seq: 16
        })
    );
    let five = [1, 2, 4, 8, 16].map(|w| Pattern::new(w, 1));
    assert_eq!(
        plan(ok, &five, Options::default().combine(Combine::HeadGroups)),
        Err(Error::TooManyPatterns {
            patterns: 5,
            heads: 4
        })
    );
    assert!(
        plan(ok, &five, lse).is_ok(),
        "LSE combine allows more patterns than heads"
    );
    assert_eq!(
        plan(
            ok,
            &[Pattern::new(8, 1)],
            Options::default().scale(f64::NAN)
        ),
        Err(Error::BadScale)
    );
    // Segment longer than the sequence is fine (capped), and so is dilation up to w.
    assert!(plan(ok, &[Pattern::new(64, 64)], lse).is_ok());
}

#[test]
fn buffer_lengths_are_checked() {
    let dims = Dims {
        batch: 2,
        seq: 8,
        heads: 4,
        kv_heads: 2,
        head_dim: 3,
    };
    let p = plan(dims, &[Pattern::new(8, 1)], Options::default()).unwrap();
    let q = vec![0.5f32; dims.q_len()];
    let kv = vec![0.5f32; dims.kv_len()];
    let err = |r: Result<Forward<f32>>| r.unwrap_err();
    assert_eq!(
        err(dilated::try_forward(&p, &q[1..], &kv, &kv, None)),
        Error::LengthMismatch {
            what: "q",
            expected: 192,
            got: 191
        }
    );
    assert_eq!(
        err(dilated::try_forward(&p, &q, &q, &kv, None)),
        Error::LengthMismatch {
            what: "k",
            expected: 96,
            got: 192
        }
    );
    assert_eq!(
        err(dilated::try_forward(&p, &q, &kv, &kv[..5], None)),
        Error::LengthMismatch {
            what: "v",
            expected: 96,
            got: 5
        }
    );
    assert_eq!(
        err(dilated::try_forward(&p, &q, &kv, &kv, Some(&[true; 8]))),
        Error::LengthMismatch {
            what: "mask",
            expected: 16,
            got: 8
        }
    );
    let f = dilated::try_forward(&p, &q, &kv, &kv, None).unwrap();
    assert_eq!(
        dilated::try_backward(&p, &q, &kv, &kv, None, &f.out, &f.lse, &q[..3]).unwrap_err(),
        Error::LengthMismatch {
            what: "grad_out",
            expected: 192,
            got: 3
        }
    );
    let mut out = vec![0.0f32; 3];
    let mut lse = vec![0.0f32; dims.lse_len()];
    assert_eq!(
        dilated::try_forward_into(&p, &q, &kv, &kv, None, &mut out, &mut lse).unwrap_err(),
        Error::LengthMismatch {
            what: "out",
            expected: 192,
            got: 3
        }
    );
}

#[test]
fn errors_display_the_numbers() {
    let e = Error::SegmentNotDividing {
        pattern: 1,
        segment: 3000,
        seq: 4096,
    };
    let s = e.to_string();
    assert!(
        s.contains("3000") && s.contains("4096") && s.contains("pattern 1"),
        "{s}"
    );
}
