//! bf16 (`--dtype bf16`): every backbone computed in bf16 stays within bf16 rounding of the
//! official f32 outputs on the left-padded batch, through the KV cache and reordered beam rows,
//! and the trained demo model gives its f32 answer. A device's float dtype is fixed once per
//! process, which is why each precision has its own test binary.

use phantom_model::device::{Precision, device_with_precision};
use phantom_tests::*;

/// Largest logit error allowed, as a fraction of the largest |reference logit|: bf16 keeps 8
/// significant bits (relative rounding 2⁻⁹ ≈ 0.2% per operation) and the error grows over the
/// layers.
const BF16_REL_TOL: f32 = 0.05;

#[test]
fn bf16_tracks_the_f32_reference() {
    let devices = half_precision_devices(Precision::Bf16);
    assert_computes_half(&devices, &["flex", "tch"], "bf16");
    for (name, device) in devices {
        let report = check_half_precision(&name, &device, Precision::Bf16, BF16_REL_TOL);
        eprintln!("{name} bf16, largest logit error / largest logit: {report:?}");
        // Not a copy of an f32 run: bf16 rounding must show.
        assert!(report.iter().all(|(_, e)| *e > 0.0), "{name}: {report:?}");
        assert_eq!(
            demo_answer(&device, Precision::Bf16),
            "The square is red.",
            "{name}"
        );
    }
}

#[test]
fn a_backend_without_half_precision_says_so() {
    if !cfg!(feature = "ndarray") {
        return;
    }
    let err = device_with_precision(Some("ndarray"), Precision::Bf16)
        .expect_err("ndarray computes in f32 and f64 only");
    let text = err.to_string();
    assert!(text.contains("cannot compute in bf16"), "{text}");
}
