//! Shared helpers of the cross-crate tests: fixture access and tensor comparison.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures/phantom-ref`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/phantom-ref")
}

/// `tests/fixtures/{name}`: the fixtures made here rather than copied from the shared set.
pub fn own_fixtures(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A safetensors file read whole into memory.
pub struct Tensors {
    bytes: Vec<u8>,
    name: String,
}

/// A tensor read from a fixture: shape and values.
#[derive(Clone, Debug)]
pub struct HostTensor<T> {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<T>,
}

impl Tensors {
    /// Reads `path`.
    pub fn open(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self {
            bytes,
            name: path.display().to_string(),
        }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .view()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// A tensor's stored dtype, shape and bytes.
    pub fn raw(&self, key: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = self.view();
        let t = st
            .tensor(key)
            .unwrap_or_else(|e| panic!("{}: {key}: {e}", self.name));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    /// Whether `key` is present.
    pub fn has(&self, key: &str) -> bool {
        self.view().names().contains(&key)
    }

    /// A float tensor (f32, bf16 or f16 on disk) as f32.
    pub fn f32(&self, key: &str) -> HostTensor<f32> {
        let st = self.view();
        let t = st
            .tensor(key)
            .unwrap_or_else(|e| panic!("{}: {key}: {e}", self.name));
        let data = phantom_infer::io::float_values(&t)
            .unwrap_or_else(|| panic!("{key}: {:?} is not a float dtype", t.dtype()));
        HostTensor {
            shape: t.shape().to_vec(),
            data,
        }
    }

    /// An integer tensor (i64 or u8 on disk) as i64.
    pub fn i64(&self, key: &str) -> HostTensor<i64> {
        let st = self.view();
        let t = st
            .tensor(key)
            .unwrap_or_else(|e| panic!("{}: {key}: {e}", self.name));
        let raw = t.data();
        let data = match t.dtype() {
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Dtype::U8 => raw.iter().map(|&b| b as i64).collect(),
            other => panic!("{key}: {other:?} is not an integer dtype"),
        };
        HostTensor {
            shape: t.shape().to_vec(),
            data,
        }
    }
}

impl HostTensor<f32> {
    /// On `device` as a rank-`D` tensor.
    pub fn to_device<const D: usize>(&self, device: &Device) -> Tensor<D> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), self.shape.clone()),
            device,
        )
    }
}

impl HostTensor<i64> {
    /// Rows of a `[B, T]` tensor.
    pub fn rows(&self) -> Vec<Vec<i64>> {
        let t = self.shape[1];
        self.data.chunks(t).map(<[i64]>::to_vec).collect()
    }
}

/// Values of a device tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")
}

/// Largest |a − b| over the positions where `keep` is true (None keeps all); NaN as soon as
/// either side holds a NaN or an infinity there, so that no `diff <= tol` check can pass over
/// a broken value (`f32::max` alone would drop NaNs).
pub fn max_abs_diff(a: &[f32], b: &[f32], keep: Option<&[bool]>) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(i, _)| keep.is_none_or(|k| k[*i]))
        .map(|(_, (x, y))| {
            if x.is_finite() && y.is_finite() {
                (x - y).abs()
            } else {
                f32::NAN
            }
        })
        .fold(0.0, |worst, d| {
            if d.is_nan() || worst.is_nan() {
                f32::NAN
            } else {
                worst.max(d)
            }
        })
}

/// Asserts `|a − b| ≤ atol + rtol·|b|` elementwise where `keep` is true.
#[track_caller]
pub fn assert_close(what: &str, a: &[f32], b: &[f32], keep: Option<&[bool]>, atol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    let mut worst = (0.0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if keep.is_some_and(|k| !k[i]) {
            continue;
        }
        assert!(x.is_finite(), "{what}: non-finite value at {i}");
        let excess = (x - y).abs() - atol * (1.0 + y.abs());
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    assert!(
        worst.0 <= 0.0,
        "{what}: mismatch at flat index {}: got {}, want {} (max |diff| {})",
        worst.1,
        a[worst.1],
        b[worst.1],
        max_abs_diff(a, b, keep)
    );
}

/// Expands a `[B, T]` mask to a `[B, T, inner]` keep-mask.
pub fn expand_mask(mask: &[Vec<bool>], inner: usize) -> Vec<bool> {
    mask.iter()
        .flat_map(|row| row.iter().flat_map(move |&m| std::iter::repeat_n(m, inner)))
        .collect()
}

/// The devices the tests run on: every compiled backend (a `cuda` or `tch` build on a machine
/// without the matching runtime fails here, naming it). `PHANTOM_TEST_DEVICES`
/// (comma-separated `--device` names) overrides the list.
pub fn test_devices() -> Vec<(String, Device)> {
    let names: Vec<String> = match std::env::var("PHANTOM_TEST_DEVICES") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        Err(_) => {
            let mut names = Vec::new();
            if cfg!(feature = "flex") {
                names.push("flex".to_string());
            }
            if cfg!(feature = "ndarray") {
                names.push("ndarray".to_string());
            }
            if cfg!(feature = "wgpu") {
                names.push("wgpu".to_string());
            }
            if cfg!(feature = "tch") {
                names.push("tch".to_string());
            }
            if cfg!(feature = "cuda") {
                names.push("cuda".to_string());
            }
            names
        }
    };
    names
        .into_iter()
        .map(|name| {
            let device = phantom_model::device::device(Some(&name))
                .unwrap_or_else(|e| panic!("test device `{name}`: {e}"));
            (name, device)
        })
        .collect()
}

/// A reference fixture folder: its model and its recorded outputs.
pub struct Fixture {
    /// Folder name under `fixtures/phantom-ref`.
    pub name: &'static str,
    /// Recorded inputs and outputs.
    pub outputs: Tensors,
}

impl Fixture {
    /// Opens `fixtures/phantom-ref/{name}`.
    pub fn open(name: &'static str) -> Self {
        Self {
            name,
            outputs: Tensors::open(fixtures().join(name).join("outputs.safetensors")),
        }
    }

    /// The folder.
    pub fn dir(&self) -> PathBuf {
        fixtures().join(self.name)
    }

    /// The model loaded on `device`.
    pub fn model(&self, device: &Device) -> phantom_model::PhantomModel {
        phantom_model::load_model(self.dir(), device, phantom_model::LoadOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// A `[B, T]` id/mask pair as model input.
    pub fn input(&self, prefix: &str) -> phantom_model::ModelInput {
        let ids = self.outputs.i64(&format!("{prefix}.input_ids")).rows();
        let mask = self.outputs.i64(&format!("{prefix}.attention_mask")).rows();
        phantom_model::ModelInput {
            input_ids: ids
                .iter()
                .map(|r| r.iter().map(|&i| i as u32).collect())
                .collect(),
            attention_mask: mask
                .iter()
                .map(|r| r.iter().map(|&m| m != 0).collect())
                .collect(),
        }
    }
}

/// The shared vision input of the model fixtures: two bf16-exact noise tiles.
pub fn vision_pixels(device: &Device) -> Tensor<4> {
    Tensors::open(fixtures().join("vision_inputs.safetensors"))
        .f32("pixel_values")
        .to_device(device)
}

/// Every model fixture: Qwen2 (0.5B, tied and untied head), InternLM2 (1.8B/7B), Phi-3 (3.8B).
pub const MODEL_FIXTURES: [&str; 4] = ["tiny_tied", "tiny_untied", "internlm2_tiny", "phi3_tiny"];

/// Largest |got − want| over `keep`, as a fraction of the largest |want| there; NaN when either
/// side holds a non-finite value.
pub fn relative_error(got: &[f32], want: &[f32], keep: Option<&[bool]>) -> f32 {
    let scale = want
        .iter()
        .enumerate()
        .filter(|(i, _)| keep.is_none_or(|k| k[*i]))
        .fold(0.0f32, |m, (_, x)| m.max(x.abs()));
    max_abs_diff(got, want, keep) / scale.max(f32::MIN_POSITIVE)
}

/// A model computed in half precision on `device` (already set to `dtype`) against the f32
/// reference of every model fixture, on the left-padded text batch: the prefill logits of the
/// real tokens, the logits of eight cached decode steps fed the reference's tokens, those of
/// three-beam copies of the rows (the cache reordered as beam search does), and the first
/// greedy token of each row. `rel_tol` bounds every logit error as a fraction of the largest
/// reference logit. Returns the worst relative error seen, per fixture.
pub fn check_half_precision(
    dev_name: &str,
    device: &Device,
    precision: phantom_model::device::Precision,
    rel_tol: f32,
) -> Vec<(&'static str, f32)> {
    use phantom_infer::Session;
    let options = phantom_model::device::load_options(device, precision);
    let compute = options.dtype;
    let mut report = Vec::new();
    for name in MODEL_FIXTURES {
        let fx = Fixture::open(name);
        let ctx = format!("{dev_name} {precision} {name}");
        let model = phantom_model::load_model(fx.dir(), device, options)
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        // The weights are in the precision asked for (on flex with f32 arithmetic around them).
        let o_proj = &model.language_model.model.layers[0].self_attn.o_proj;
        assert_eq!(
            o_proj.weight.val().dtype(),
            precision.dtype(),
            "{ctx}: weights"
        );
        assert_eq!(
            model.language_model.model.norm.gamma.val().dtype(),
            compute,
            "{ctx}: norms"
        );
        let mut worst = 0.0f32;
        let mut check = |what: &str, got: Vec<f32>, want: &[f32], keep: Option<&[bool]>| {
            let err = relative_error(&got, want, keep);
            assert!(
                err <= rel_tol,
                "{ctx} {what}: off by {err} of the largest logit (allowed {rel_tol})"
            );
            worst = worst.max(err);
        };

        // The padded batch in one forward.
        let input = fx.input("text");
        let logits = model.forward(&input, None).unwrap();
        assert_eq!(logits.dtype(), compute, "{ctx}: logits");
        let want = fx.outputs.f32("text.logits_generate_pos");
        let keep = expand_mask(&input.attention_mask, want.shape[2]);
        check("prefill logits", values(logits), &want.data, Some(&keep));

        // Cached decode steps, fed the reference's greedy tokens.
        let want_ids = fx.outputs.i64("text.gen.sequences").rows();
        let want_steps = fx.outputs.f32("text.gen.step_logits");
        let (steps, b, v) = (
            want_steps.shape[0],
            want_steps.shape[1],
            want_steps.shape[2],
        );
        let step_logits = |step: usize| &want_steps.data[step * b * v..(step + 1) * b * v];
        let (mut session, mut logits) = Session::prefill(&model, &input, None).unwrap();
        // The first greedy token is the reference's, unless the reference itself has a near
        // tie there that half precision cannot resolve (tiny_untied's second row: 5e-3 between
        // its top two logits, finer than bf16's 1.6e-2 step at that size): then it must be the
        // tied token.
        let scale = step_logits(0).iter().fold(0.0f32, |m, x| m.max(x.abs()));
        for (row, got) in values(logits.clone()).chunks(v).enumerate() {
            let pick = phantom_infer::generate::argmax(got) as usize;
            let reference = &step_logits(0)[row * v..(row + 1) * v];
            let want = want_ids[row][0] as usize;
            let shortfall = reference[want] - reference[pick];
            assert!(
                pick == want || shortfall <= rel_tol * scale,
                "{ctx} row {row}: first greedy token {pick}, the reference's {want} \
                 (its logit is {shortfall} higher there)"
            );
        }
        for step in 0..steps {
            check(
                &format!("decode step {step}"),
                values(logits.clone()),
                step_logits(step),
                None,
            );
            if step + 1 < steps {
                let feed: Vec<u32> = want_ids.iter().map(|r| r[step] as u32).collect();
                logits = session.step(&feed).unwrap();
            }
        }

        // Three beams per row: copies of each row through the reordered cache.
        let (mut session, _) = Session::prefill(&model, &input, None).unwrap();
        let beams: Vec<usize> = (0..b).flat_map(|r| [r, r, r]).collect();
        session.select_rows(&beams);
        let feed: Vec<u32> = beams.iter().map(|&r| want_ids[r][0] as u32).collect();
        let got = values(session.step(&feed).unwrap());
        let want: Vec<f32> = beams
            .iter()
            .flat_map(|&r| step_logits(1)[r * v..(r + 1) * v].iter().copied())
            .collect();
        check("beam rows", got, &want, None);
        report.push((name, worst));
    }
    report
}

/// The `--device` names of wgpu's backends.
const WGPU_DEVICES: [&str; 6] = ["wgpu", "wgpu-cpu", "vulkan", "metal", "dx12", "gl"];

/// Asserts that each of `expected` (`--device` names) that the tests run on is among the
/// half-precision `devices`.
pub fn assert_computes_half(devices: &[(String, Device)], expected: &[&str], precision: &str) {
    for (name, _) in test_devices() {
        if expected.contains(&name.as_str()) {
            assert!(
                devices.iter().any(|(n, _)| *n == name),
                "{name} computes in {precision}"
            );
        }
    }
}

/// The test devices (see [`test_devices`]) set to compute in `precision`: every one that can.
/// ndarray computes in f32 only and wgpu has no bf16; any other refusal fails the test.
pub fn half_precision_devices(
    precision: phantom_model::device::Precision,
) -> Vec<(String, Device)> {
    use phantom_model::device::{Precision, device_with_precision};
    test_devices()
        .into_iter()
        .filter_map(
            |(name, _)| match device_with_precision(Some(&name), precision) {
                Ok(device) => Some((name, device)),
                Err(_) if name == "ndarray" => None,
                // WGSL has no bf16.
                Err(_) if WGPU_DEVICES.contains(&name.as_str()) && precision == Precision::Bf16 => {
                    None
                }
                Err(e) => panic!("{name} in {precision}: {e}"),
            },
        )
        .collect()
}

/// The trained demo model's greedy answer about its square, computed on `device` in
/// `precision`.
pub fn demo_answer(device: &Device, precision: phantom_model::device::Precision) -> String {
    use phantom_model::processor::image::ImageProcessor;
    use phantom_model::processor::prompt::Turn;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo_model");
    let options = phantom_model::device::load_options(device, precision);
    let model = phantom_model::load_model(&dir, device, options)
        .unwrap_or_else(|e| panic!("demo model: {e}"));
    let chat = phantom_infer::Chat::from_dir(model, &dir).unwrap();
    let image = ImageProcessor::default()
        .open(dir.join("square.png"))
        .unwrap();
    let config = phantom_infer::GenerationConfig {
        max_new_tokens: 16,
        ..phantom_infer::GenerationConfig::default()
    };
    let (text, _) = chat
        .answer(
            &[Turn::question("What colour is the square?")],
            std::slice::from_ref(&image),
            &config,
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
    text
}
