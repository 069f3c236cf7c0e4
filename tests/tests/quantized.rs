//! Quantized weights (8 and 4 bits, blocks of 32): the kernels against the same model with
//! the weights dequantized, the distance to the float model on the reference fixtures, the
//! folder round trip, and the errors a broken quantized folder gives.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::DType;
use phantom_model::quantize::{Quantization, QuantizationConfig};
use phantom_model::{LoadOptions, PhantomModel, load_model, save_model_as};
use phantom_tests::*;
use safetensors::Dtype;

const FIXTURES: [&str; 4] = ["tiny_tied", "tiny_untied", "internlm2_tiny", "phi3_tiny"];

fn load(dir: &std::path::Path, device: &Device, scheme: Option<Quantization>) -> PhantomModel {
    load_model(dir, device, LoadOptions::default().quantized(scheme))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Logits of the fixture's text batch (`[2, 48, V]`) and of its picture prompt
/// (`[1, 561, V]`), with the keep-mask of the text batch's real positions.
fn logits(fx: &Fixture, model: &PhantomModel, device: &Device) -> (Vec<f32>, Vec<f32>, Vec<bool>) {
    let input = fx.input("text");
    let text = model.forward(&input, None).expect("text forward");
    let v = text.dims()[2];
    let keep = expand_mask(&input.attention_mask, v);
    let mm = fx.input("mm");
    let mm = model
        .forward(&mm, Some(vision_pixels(device)))
        .expect("picture forward");
    (values(text), values(mm), keep)
}

/// Both prompts' logits (`(text, picture)`, as [`logits`] gives them) within 1e-4 of the
/// wanted ones, the text batch at its real positions only.
fn assert_same_logits(what: &str, got: (&[f32], &[f32]), want: (&[f32], &[f32]), keep: &[bool]) {
    assert_close(&format!("{what}: text"), got.0, want.0, Some(keep), 1e-4);
    assert_close(&format!("{what}: picture"), got.1, want.1, None, 1e-4);
}

/// Share of positions whose top token agrees, and the mean KL(float ‖ quantized) of the
/// next-token distributions, over the rows of width `v` kept by `keep`.
fn agreement(float: &[f32], quantized: &[f32], v: usize, keep: Option<&[bool]>) -> (f64, f64) {
    let mut same = 0usize;
    let mut kl = 0f64;
    let mut rows = 0usize;
    for (i, (p, q)) in float.chunks(v).zip(quantized.chunks(v)).enumerate() {
        if keep.is_some_and(|k| !k[i * v]) {
            continue;
        }
        let argmax = |x: &[f32]| {
            x.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (j, &y)| if y > b.1 { (j, y) } else { b })
                .0
        };
        same += usize::from(argmax(p) == argmax(q));
        let log_softmax = |x: &[f32]| {
            let top = x.iter().fold(f32::MIN, |m, &y| m.max(y)) as f64;
            let sum: f64 = x.iter().map(|&y| (y as f64 - top).exp()).sum();
            x.iter()
                .map(|&y| y as f64 - top - sum.ln())
                .collect::<Vec<_>>()
        };
        let (lp, lq) = (log_softmax(p), log_softmax(q));
        kl += lp
            .iter()
            .zip(&lq)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
        rows += 1;
    }
    (same as f64 / rows as f64, kl / rows as f64)
}

/// `model` with every quantized weight replaced by its dequantized values: the same weights
/// through the float products.
fn dequantized(model: PhantomModel) -> PhantomModel {
    struct Dequantize;
    impl ModuleMapper for Dequantize {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| match t.dtype() {
                DType::QFloat(_) => t.dequantize(),
                _ => t,
            })
        }
    }
    model.map(&mut Dequantize)
}

/// Whether the quantized products of `device_name` take the float activations as they are:
/// flex on a processor with AVX512-VNNI quantizes the activations of its products with more
/// than a few rows too (`phantom_model::kernels::vnni`).
fn float_activations(device_name: &str) -> bool {
    #[cfg(feature = "flex")]
    if device_name == "flex" {
        return !phantom_model::kernels::quant::quantizes_activations();
    }
    let _ = device_name;
    true
}

/// Logit error (as `assert_close` counts it) that quantizing the activations per block of 32
/// may add on the fixtures: each block's rounding is at most half a step of 1/127 of its
/// largest value, but the tiny random models (logits of std 0.8) amplify it through their
/// layers, to 0.1 at worst (a mean KL of about 1e-4). A product reading the wrong codes or
/// scales is off by the logits' whole size; `vnni.rs` checks the integer products exactly.
const ACTIVATION_ROUNDING: f32 = 0.15;

#[test]
fn quantized_kernels_equal_the_model_with_dequantized_weights() {
    for name in FIXTURES {
        let fx = Fixture::open(name);
        for scheme in [Quantization::Q8, Quantization::Q4] {
            // Every backend computes with the same weights: quantized where it multiplies
            // them so (flex, wgpu), dequantized at load elsewhere (ndarray, libtorch); the
            // backends that keep the float activations agree with each other.
            let mut first: Option<(String, Vec<f32>, Vec<f32>)> = None;
            for (device_name, device) in test_devices() {
                let model = load(&fx.dir(), &device, Some(scheme));
                let native = phantom_model::quantize::native(&device);
                assert_eq!(
                    model.config.quantization.map(|q| q.scheme),
                    native.then_some(scheme),
                    "{device_name}: quantized exactly where the device multiplies quantized weights"
                );
                let what = format!("{name} {scheme} on {device_name}");
                let (text, mm, keep) = logits(&fx, &model, &device);
                let (want_text, want_mm, _) = logits(&fx, &dequantized(model), &device);
                if !float_activations(&device_name) {
                    let tol = ACTIVATION_ROUNDING;
                    assert_close(
                        &format!("{what}: text"),
                        &text,
                        &want_text,
                        Some(&keep),
                        tol,
                    );
                    assert_close(&format!("{what}: picture"), &mm, &want_mm, None, tol);
                    continue;
                }
                assert_same_logits(&what, (&text, &mm), (&want_text, &want_mm), &keep);
                match &first {
                    None => first = Some((device_name, text, mm)),
                    Some((other, first_text, first_mm)) => {
                        let what = format!("{what} against {other}");
                        assert_close(&what, &text, first_text, Some(&keep), 1e-4);
                        assert_close(&what, &mm, first_mm, None, 1e-4);
                    }
                }
            }
        }
    }
}

/// A quantized copy of the tied fixture written to a temporary folder.
fn quantized_folder(scheme: Quantization) -> (tempfile::TempDir, PhantomModel, Device) {
    quantized_folder_as(QuantizationConfig::new(scheme))
}

/// [`quantized_folder`] quantized as `config` says.
fn quantized_folder_as(config: QuantizationConfig) -> (tempfile::TempDir, PhantomModel, Device) {
    let device = phantom_model::device::device(Some("flex")).expect("flex");
    let fx = Fixture::open("tiny_tied");
    let options = LoadOptions {
        quantize: Some(config),
        ..LoadOptions::default()
    };
    let model = load_model(fx.dir(), &device, options).expect("the fixture quantized");
    let dir = tempfile::tempdir().expect("temporary folder");
    save_model_as(&model, dir.path(), DType::BF16).expect("writing the quantized folder");
    (dir, model, device)
}

#[test]
fn a_quantized_folder_loads_back_to_the_same_model_on_every_backend() {
    let fx = Fixture::open("tiny_tied");
    for scheme in [Quantization::Q8, Quantization::Q4] {
        let (dir, model, device) = quantized_folder(scheme);
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("config.json")).expect("config.json"),
        )
        .expect("JSON");
        assert_eq!(config["quantization"]["scheme"], scheme.name());
        assert_eq!(config["quantization"]["block_size"], 32);
        let file = Tensors::open(dir.path().join("model.safetensors"));
        let key = "language_model.model.layers.0.mlp.down_proj.weight";
        let codes = file.raw(key);
        let scales = file.raw(&format!("{key}_scale"));
        // down_proj is [64, 128]: 128 inputs in 4 blocks.
        match scheme {
            Quantization::Q8 => assert_eq!((codes.0, codes.1), (Dtype::I8, vec![64, 128])),
            Quantization::Q4 => assert_eq!((codes.0, codes.1), (Dtype::U8, vec![64, 64])),
        }
        assert_eq!((scales.0, scales.1), (Dtype::F16, vec![64, 4]));
        // The token embeddings ([512, 64], tied to the head) are quantized along each row.
        let key = "language_model.model.embed_tokens.weight";
        let codes = file.raw(key);
        match scheme {
            Quantization::Q8 => assert_eq!((codes.0, codes.1), (Dtype::I8, vec![512, 64])),
            Quantization::Q4 => assert_eq!((codes.0, codes.1), (Dtype::U8, vec![512, 32])),
        }
        let scales = file.raw(&format!("{key}_scale"));
        assert_eq!((scales.0, scales.1), (Dtype::F16, vec![512, 2]));
        // Norms stay in float, in the dtype asked for.
        assert_eq!(file.raw("language_model.model.norm.weight").0, Dtype::BF16);

        // The same model from the folder, without asking for quantization: the embeddings
        // and norms went through bf16, so compare against the in-memory model cast alike.
        let want = phantom_model::cast_parameters(model, LoadOptions::uniform(DType::BF16));
        let want = phantom_model::cast_parameters(want, LoadOptions::default());
        // Its logits as flex computes them, and with the float activations as they are.
        let (flex_text, flex_mm, keep) = logits(&fx, &want, &device);
        let (float_text, float_mm, _) = logits(&fx, &dequantized(want), &device);
        for (device_name, device) in test_devices() {
            let back = load(dir.path(), &device, None);
            let (text, mm, _) = logits(&fx, &back, &device);
            let what = format!("{scheme} folder on {device_name}");
            let want = if float_activations(&device_name) {
                (float_text.as_slice(), float_mm.as_slice())
            } else {
                (flex_text.as_slice(), flex_mm.as_slice())
            };
            assert_same_logits(&what, (&text, &mm), want, &keep);
        }
        // Asking for the scheme it has is fine; another one is refused.
        let device = phantom_model::device::device(Some("flex")).expect("flex");
        load(dir.path(), &device, Some(scheme));
        let other = match scheme {
            Quantization::Q8 => Quantization::Q4,
            Quantization::Q4 => Quantization::Q8,
        };
        let err = load_model(
            dir.path(),
            &device,
            LoadOptions::default().quantized(Some(other)),
        )
        .expect_err("another scheme is refused")
        .to_string();
        assert!(err.contains("already quantized"), "{err}");
    }
}

/// Rewrites `tensor` of the folder's weights with `dtype`, `shape` and `bytes`.
fn replace_tensor(
    dir: &std::path::Path,
    tensor: &str,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
) {
    let path = dir.join("model.safetensors");
    let data = std::fs::read(&path).expect("weights");
    let file = safetensors::SafeTensors::deserialize(&data).expect("safetensors");
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    let entry = tensors
        .iter_mut()
        .find(|t| t.0 == tensor)
        .expect("the tensor to replace");
    (entry.1, entry.2, entry.3) = (dtype, shape, bytes);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).expect("view");
            (name.clone(), view)
        })
        .collect();
    let out = safetensors::serialize(views, None).expect("serialize");
    drop(file);
    std::fs::write(&path, out).expect("write");
}

/// Every quantized weight of `model`, dequantized, by parameter path.
fn dequantized_weights(model: &PhantomModel) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            if let DType::QFloat(_) = t.dtype() {
                self.0.push(values(t.dequantize()));
            }
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

#[test]
fn embeddings_kept_in_float_stay_float_through_a_folder() {
    // As `quantize --float-embeddings` writes it, and as folders did before the embeddings
    // could be quantized (their config has no `embeddings` entry, read as false).
    let fx = Fixture::open("tiny_tied");
    let config = QuantizationConfig::new(Quantization::Q4).with_embeddings(false);
    let (dir, model, device) = quantized_folder_as(config);
    let file = Tensors::open(dir.path().join("model.safetensors"));
    let key = "language_model.model.embed_tokens.weight";
    assert_eq!(file.raw(key).0, Dtype::BF16);
    let config_path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("config"))
            .expect("JSON");
    assert_eq!(json["quantization"]["embeddings"], false);
    json["quantization"]
        .as_object_mut()
        .expect("object")
        .remove("embeddings");
    std::fs::write(&config_path, json.to_string()).expect("write");
    let back = load(dir.path(), &device, None);
    let embeddings = back.language_model.model.embed_tokens.weight.val();
    assert!(!matches!(embeddings.dtype(), DType::QFloat(_)));
    let want = phantom_model::cast_parameters(model, LoadOptions::uniform(DType::BF16));
    let want = phantom_model::cast_parameters(want, LoadOptions::default());
    let (want_text, want_mm, keep) = logits(&fx, &want, &device);
    let (text, mm, _) = logits(&fx, &back, &device);
    assert_same_logits(
        "float embeddings",
        (&text, &mm),
        (&want_text, &want_mm),
        &keep,
    );
}

#[test]
fn tiny_weights_keep_their_codes_through_a_folder() {
    // A layer scaled down 1000×: its f16 scales are subnormal, where a block's largest code
    // can fall short of ±127 and re-deriving codes from values would change them. Flex keeps
    // the stored codes (Burn's GPU kernels re-derive them, see `weights.rs`).
    let fx = Fixture::open("tiny_tied");
    let dir = tempfile::tempdir().expect("temporary folder");
    std::fs::copy(fx.dir().join("config.json"), dir.path().join("config.json")).expect("config");
    std::fs::copy(
        fx.dir().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .expect("weights");
    let key = "language_model.model.layers.0.mlp.down_proj.weight";
    let (dtype, shape, bytes) = Tensors::open(dir.path().join("model.safetensors")).raw(key);
    let small: Vec<u8> = bytes
        .chunks_exact(4)
        .flat_map(|b| (f32::from_le_bytes(b.try_into().expect("4 bytes")) * 1e-3).to_le_bytes())
        .collect();
    replace_tensor(dir.path(), key, dtype, shape, small);

    let flex = phantom_model::device::device(Some("flex")).expect("flex");
    let model = load(dir.path(), &flex, Some(Quantization::Q8));
    let want = dequantized_weights(&model);
    let out = tempfile::tempdir().expect("temporary folder");
    save_model_as(&model, out.path(), DType::F32).expect("writing");
    let back = load(out.path(), &flex, None);
    let got = dequantized_weights(&back);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "quantized weight {i} changed through the folder");
    }
}

#[test]
fn broken_quantized_folders_are_named() {
    let device = phantom_model::device::device(Some("flex")).expect("flex");
    let key = "language_model.model.layers.1.self_attn.o_proj.weight";
    let load_err = |dir: &std::path::Path| -> String {
        load_model(dir, &device, LoadOptions::default())
            .expect_err("the broken folder is refused")
            .to_string()
    };

    // A fresh quantized folder with one tensor rewritten: the error loading it.
    let broken = |scheme: Quantization, tensor: &str, dtype: Dtype, shape: &[usize], bytes| {
        let (dir, _, _) = quantized_folder(scheme);
        replace_tensor(dir.path(), tensor, dtype, shape.to_vec(), bytes);
        load_err(dir.path())
    };
    let scales = format!("{key}_scale");
    let scales = scales.as_str();

    let nan = half::f16::NAN.to_bits().to_le_bytes();
    let mut out_of_range = vec![1u8; 64 * 64];
    out_of_range[5] = 0x80;
    // (what, scheme, tensor rewritten, its dtype, shape and bytes, words the error must hold)
    let cases = [
        (
            "scales of the wrong shape",
            Quantization::Q8,
            scales,
            Dtype::F16,
            [64, 3],
            vec![0; 64 * 3 * 2],
            [scales, "[64, 2]"],
        ),
        (
            "4-bit codes in a q8 folder",
            Quantization::Q8,
            key,
            Dtype::U8,
            [64, 32],
            vec![0x88; 64 * 32],
            [key, "I8"],
        ),
        (
            "a NaN scale",
            Quantization::Q4,
            scales,
            Dtype::F16,
            [64, 2],
            (0..64 * 2).flat_map(|_| nan).collect(),
            [scales, "NaN"],
        ),
        (
            "a code outside ±127",
            Quantization::Q8,
            key,
            Dtype::I8,
            [64, 64],
            out_of_range,
            [key, "-128"],
        ),
        (
            "embedding codes of the wrong shape",
            Quantization::Q8,
            "language_model.model.embed_tokens.weight",
            Dtype::I8,
            [512, 32],
            vec![0; 512 * 32],
            ["embed_tokens", "[512, 64]"],
        ),
        (
            "a zero scale",
            Quantization::Q8,
            scales,
            Dtype::F16,
            [64, 2],
            vec![0; 64 * 2 * 2],
            [scales, "positive"],
        ),
    ];
    for (what, scheme, tensor, dtype, shape, bytes, words) in cases {
        let err = broken(scheme, tensor, dtype, &shape, bytes);
        assert!(words.iter().all(|w| err.contains(w)), "{what}: {err}");
    }

    // Codes without a quantization section.
    let (dir, _, _) = quantized_folder(Quantization::Q8);
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("config"))
            .expect("JSON");
    config
        .as_object_mut()
        .expect("object")
        .remove("quantization");
    std::fs::write(&config_path, config.to_string()).expect("write");
    let err = load_err(dir.path());
    assert!(err.contains("no `quantization` section"), "{err}");

    // An unknown scheme in config.json.
    config["quantization"] =
        serde_json::json!({"scheme": "q3", "block_size": 32, "scale_dtype": "f16"});
    std::fs::write(&config_path, config.to_string()).expect("write");
    let err = load_err(dir.path());
    assert!(err.contains("q3"), "{err}");
}

#[test]
fn quantized_models_stay_close_to_the_float_model() {
    let device = phantom_model::device::device(Some("flex")).expect("flex");
    for name in FIXTURES {
        let fx = Fixture::open(name);
        let (float_text, float_mm, keep) = logits(&fx, &fx.model(&device), &device);
        let v = 512;
        for (scheme, min_top1, max_kl) in
            [(Quantization::Q8, 0.9, 1e-3), (Quantization::Q4, 0.4, 0.1)]
        {
            let model = load(&fx.dir(), &device, Some(scheme));
            let (text, mm, _) = logits(&fx, &model, &device);
            let (top1_text, kl_text) = agreement(&float_text, &text, v, Some(&keep));
            let (top1_mm, kl_mm) = agreement(&float_mm, &mm, v, None);
            println!(
                "{name} {scheme}: top-1 agreement text {top1_text:.3}, picture {top1_mm:.3}; \
                 mean KL text {kl_text:.2e}, picture {kl_mm:.2e}"
            );
            for (what, top1, kl) in [("text", top1_text, kl_text), ("picture", top1_mm, kl_mm)] {
                assert!(
                    top1 >= min_top1 && kl <= max_kl && kl.is_finite(),
                    "{name} {scheme} {what}: top-1 {top1}, KL {kl}"
                );
            }
        }
    }
}
