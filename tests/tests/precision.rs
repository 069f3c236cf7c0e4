//! Half precision (`--dtype f16|bf16`): the model computed in bf16 stays within bf16 rounding of
//! the official f32 outputs, and the trained demo model gives the same answer as in f32. A
//! device's float dtype is fixed once per process, which is why these checks have their own
//! test binary and one test function.

use std::ops::ControlFlow;
use std::path::Path;

use phantom_infer::{Chat, GenerationConfig};
use phantom_model::device::{Precision, device_with_precision};
use phantom_model::processor::image::ImageProcessor;
use phantom_model::processor::prompt::Turn;
use phantom_model::{LoadOptions, load_model};
use phantom_tests::*;

const FIXTURES: [&str; 4] = ["tiny_tied", "tiny_untied", "internlm2_tiny", "phi3_tiny"];

/// Largest |Δ| allowed, as a fraction of the largest |reference logit|: bf16 keeps 8 significant
/// bits (relative rounding 2⁻⁹ ≈ 0.2% per operation) and the error grows over the layers.
const BF16_REL_TOL: f32 = 0.05;

#[test]
fn bf16_on_flex_tracks_the_f32_reference() {
    if !cfg!(feature = "flex") {
        return;
    }
    let device = device_with_precision(Some("flex"), Precision::Bf16).unwrap();
    let options = LoadOptions {
        dtype: Precision::Bf16.dtype(),
    };
    for name in FIXTURES {
        let fx = Fixture::open(name);
        let model = load_model(fx.dir(), &device, options).unwrap();
        let param = model.language_model.model.norm.gamma.val();
        assert_eq!(param.dtype(), Precision::Bf16.dtype(), "{name}: parameters");

        let input = fx.input("text");
        let logits = model.forward(&input, None).unwrap();
        assert_eq!(logits.dtype(), Precision::Bf16.dtype(), "{name}: logits");
        let want = fx.outputs.f32("text.logits_generate_pos");
        let keep = expand_mask(&input.attention_mask, want.shape[2]);
        let got = values(logits);
        let scale = want.data.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(&got, &want.data, Some(&keep));
        assert!(
            diff <= BF16_REL_TOL * scale,
            "{name}: bf16 logits differ by {diff} (largest reference logit {scale})"
        );
        // Not a copy of the f32 run: bf16 rounding must show.
        assert!(diff > 0.0, "{name}: bf16 logits equal the f32 ones exactly");
    }

    // A trained model's answer survives the rounding.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo_model");
    let chat = Chat::from_dir(load_model(&dir, &device, options).unwrap(), &dir).unwrap();
    let image = ImageProcessor::default()
        .open(dir.join("square.png"))
        .unwrap();
    let (text, _) = chat
        .answer(
            &[Turn::question("What colour is the square?")],
            std::slice::from_ref(&image),
            &GenerationConfig {
                max_new_tokens: 16,
                ..GenerationConfig::default()
            },
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(text, "The square is red.");
}

#[test]
fn a_backend_without_half_precision_says_so() {
    if !cfg!(feature = "ndarray") {
        return;
    }
    let err = device_with_precision(Some("ndarray"), Precision::F16)
        .expect_err("ndarray computes in f32 and f64 only");
    let text = err.to_string();
    assert!(text.contains("cannot compute in f16"), "{text}");
}
