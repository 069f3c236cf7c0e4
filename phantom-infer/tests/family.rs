//! The `phantom-infer` binary's token-level subcommands on the reference fixtures of every
//! backbone (Qwen2 tied and untied, InternLM2, Phi-3) and every compiled CPU backend: `forward`
//! reproduces the official logits and `generate` the official greedy ids.

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures, phantom_infer};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

const FIXTURES: [&str; 4] = ["tiny_tied", "tiny_untied", "internlm2_tiny", "phi3_tiny"];
const ATOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    fixtures().join("phantom-ref").join(name)
}

fn devices() -> Vec<&'static str> {
    let mut out = Vec::new();
    if cfg!(feature = "flex") {
        out.push("flex");
    }
    if cfg!(feature = "ndarray") {
        out.push("ndarray");
    }
    out
}

/// Shape and values of tensor `key` of a safetensors buffer, stored as `dtype` and decoded
/// `N` little-endian bytes at a time.
fn tensor<T, const N: usize>(
    st: &SafeTensors,
    key: &str,
    dtype: Dtype,
    decode: fn([u8; N]) -> T,
) -> (Vec<usize>, Vec<T>) {
    let t = st.tensor(key).unwrap_or_else(|_| panic!("{key}"));
    assert_eq!(t.dtype(), dtype, "{key}");
    let v = t
        .data()
        .chunks_exact(N)
        .map(|c| decode(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn ints(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<i64>) {
    tensor(st, key, Dtype::I64, i64::from_le_bytes)
}

fn floats(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<f32>) {
    tensor(st, key, Dtype::F32, f32::from_le_bytes)
}

/// Writes the fixture's text batch as the CLI's inputs file.
fn write_inputs(outputs: &SafeTensors, path: &Path) -> Vec<Vec<bool>> {
    let (ids_shape, ids) = ints(outputs, "text.input_ids");
    let (mask_shape, mask) = ints(outputs, "text.attention_mask");
    let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ids_bytes, mask_bytes) = (bytes(&ids), bytes(&mask));
    let tensors = [
        (
            "input_ids",
            TensorView::new(Dtype::I64, ids_shape.clone(), &ids_bytes).unwrap(),
        ),
        (
            "attention_mask",
            TensorView::new(Dtype::I64, mask_shape.clone(), &mask_bytes).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, path).unwrap();
    mask.chunks(mask_shape[1])
        .map(|r| r.iter().map(|&m| m != 0).collect())
        .collect()
}

/// Runs the binary, which must succeed; its stdout.
fn run(args: &[&str]) -> Vec<u8> {
    let out = phantom_infer(args);
    assert!(
        out.status.success(),
        "phantom-infer {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn forward_and_generate_reproduce_every_backbone_on_every_cpu_backend() {
    let tmp = std::env::temp_dir().join(format!("phantom-family-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for name in FIXTURES {
        let dir = fixture(name);
        let bytes = std::fs::read(dir.join("outputs.safetensors")).unwrap();
        let outputs = SafeTensors::deserialize(&bytes).unwrap();
        let inputs = tmp.join(format!("{name}.inputs.safetensors"));
        let mask = write_inputs(&outputs, &inputs);
        let (want_shape, want) = floats(&outputs, "text.logits_generate_pos");
        let (_, want_ids) = ints(&outputs, "text.gen.sequences");
        let (model, inputs_arg) = (dir.to_str().unwrap(), inputs.to_str().unwrap());
        for device in devices() {
            let out = tmp.join(format!("{name}.{device}.logits.safetensors"));
            run(&[
                "forward",
                "--model",
                model,
                "--inputs",
                inputs_arg,
                "--out",
                out.to_str().unwrap(),
                "--device",
                device,
            ]);
            let got_bytes = std::fs::read(&out).unwrap();
            let (got_shape, got) = floats(&SafeTensors::deserialize(&got_bytes).unwrap(), "logits");
            assert_eq!(got_shape, want_shape, "{device}/{name}");
            let v = want_shape[2];
            let worst = got
                .iter()
                .zip(&want)
                .enumerate()
                .filter(|(i, _)| mask[i / v / want_shape[1]][(i / v) % want_shape[1]])
                .map(|(_, (g, w))| (g - w).abs())
                .fold(0.0f32, |m, d| {
                    if m.is_nan() || d.is_nan() {
                        f32::NAN
                    } else {
                        m.max(d)
                    }
                });
            assert!(worst <= ATOL, "{device}/{name}: logits off by {worst}");

            let stdout = run(&[
                "generate",
                "--model",
                model,
                "--inputs",
                inputs_arg,
                "--max-new-tokens",
                "8",
                "--device",
                device,
            ]);
            let reply: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
            let got_ids: Vec<i64> = reply["sequences"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()))
                .collect();
            assert_eq!(got_ids, want_ids, "{device}/{name}: greedy ids");
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}
