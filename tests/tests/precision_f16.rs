//! f16 (`--dtype f16`): every backbone computed in IEEE half precision stays within its rounding
//! of the official f32 outputs on the left-padded batch, through the KV cache and reordered beam
//! rows, on every backend that offers it (flex, wgpu with `shader-f16`, tch), and the trained
//! demo model gives its f32 answer.

use phantom_model::device::Precision;
use phantom_tests::*;

/// Largest logit error allowed, as a fraction of the largest |reference logit|: f16 keeps 11
/// significant bits (relative rounding 2⁻¹² per operation).
const F16_REL_TOL: f32 = 0.01;

#[test]
fn f16_tracks_the_f32_reference() {
    let devices = half_precision_devices(Precision::F16);
    assert_computes_half(&devices, &["flex", "wgpu", "tch"], "f16");
    for (name, device) in devices {
        let report = check_half_precision(&name, &device, Precision::F16, F16_REL_TOL);
        eprintln!("{name} f16, largest logit error / largest logit: {report:?}");
        assert!(report.iter().all(|(_, e)| *e > 0.0), "{name}: {report:?}");
        assert_eq!(
            demo_answer(&device, Precision::F16),
            "The square is red.",
            "{name}"
        );
    }
}
