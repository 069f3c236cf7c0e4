//! Shared helpers of the cross-crate tests: fixture access and tensor comparison.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures/phantom-ref`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/phantom-ref")
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

/// Largest |a − b| over the positions where `keep` is true (None keeps all).
pub fn max_abs_diff(a: &[f32], b: &[f32], keep: Option<&[bool]>) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(i, _)| keep.is_none_or(|k| k[*i]))
        .map(|(_, (x, y))| (x - y).abs())
        .fold(0.0, f32::max)
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
