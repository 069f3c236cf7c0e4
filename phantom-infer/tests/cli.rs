//! The `phantom-infer` binary as a user runs it: `chat --json` on the trained demo model, in f32
//! and in bf16, quantized folders, and the errors a mistyped option or a wrong folder gives (never a panic).

mod common;

use std::path::PathBuf;

use common::{fixtures, phantom_infer};
use serde_json::Value;

fn demo_model() -> PathBuf {
    fixtures().join("demo_model")
}

fn ask(dtype: &str) -> Value {
    let out = common::ask_demo(&["--dtype", dtype, "--quiet"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{dtype}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{dtype}: {e}: {stdout}"))
}

#[test]
fn chat_json_answers_in_f32_and_bf16() {
    for dtype in ["f32", "bf16"] {
        let reply = ask(dtype);
        assert_eq!(reply["answer"], "The square is red.", "{dtype}");
        let tokens: Vec<u64> = reply["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert_eq!(tokens, [273, 316, 266, 332, 19, 2], "{dtype}");
        let timings = &reply["timings"];
        assert_eq!(timings["tiles"], 1, "{dtype}");
        // 16 vision tokens between <img> and </img>, plus the template's text.
        assert_eq!(timings["prompt_tokens"], 31, "{dtype}");
        assert_eq!(timings["decode_tokens"], 5, "{dtype}");
    }
}

/// The answer of `chat --json` on `model` (with `extra` options).
fn answer(model: &str, extra: &[&str]) -> String {
    let image = demo_model().join("square.png");
    let mut args = vec![
        "chat",
        "--model",
        model,
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "What colour is the square?",
        "--device",
        "flex",
        "--json",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let out = phantom_infer(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    reply["answer"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_quantized_folder_answers_as_the_model_quantized_at_load() {
    let model = demo_model();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for scheme in ["q8", "q4"] {
        let out_dir = dir.path().join(scheme);
        let out = out_dir.to_str().unwrap();
        let run = phantom_infer(&[
            "quantize", "--model", model, "--out", out, "--scheme", scheme,
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        // The tokenizer and the other files come along.
        assert!(out_dir.join("tokenizer.json").exists() && out_dir.join("square.png").exists());
        let from_folder = answer(out, &[]);
        let at_load = answer(model, &["--quantize", scheme]);
        assert_eq!(from_folder, at_load, "{scheme}");
        if scheme == "q8" {
            assert_eq!(from_folder, "The square is red.");
        }
        // The folder is not written over by accident.
        let again = phantom_infer(&[
            "quantize", "--model", model, "--out", out, "--scheme", scheme,
        ]);
        assert_eq!(again.status.code(), Some(1));
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(err.contains("--overwrite"), "{err}");
    }
    let out = phantom_infer(&[
        "quantize", "--model", model, "--out", model, "--scheme", "q8",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another folder"),
        "{err}"
    );
    let out = phantom_infer(&[
        "chat",
        "--model",
        model,
        "--prompt",
        "hi",
        "--quantize",
        "q3",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown quantization scheme `q3`"), "{err}");
}

#[test]
fn bad_options_and_folders_are_clear_errors() {
    let model = demo_model();
    let model = model.to_str().unwrap();

    let out = phantom_infer(&["chat", "--model", model, "--prompt", "hi", "--dtype", "f8"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown dtype `f8`"), "{err}");

    if cfg!(feature = "ndarray") {
        let out = phantom_infer(&[
            "chat", "--model", model, "--prompt", "hi", "--device", "ndarray", "--dtype", "f16",
        ]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--dtype f16 on `ndarray`"), "{err}");
        assert!(err.contains("cannot compute in f16"), "{err}");
    }

    let missing = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("no-such-model");
    let out = phantom_infer(&[
        "chat",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-model"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
