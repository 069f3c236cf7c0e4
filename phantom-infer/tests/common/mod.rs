//! What the binary's tests share: running `phantom-infer` and finding the fixtures.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The repository's `tests/fixtures` folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Runs the `phantom-infer` binary of this build with `args` (no backtraces in its errors).
pub fn phantom_infer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phantom-infer"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("the phantom-infer binary runs")
}

/// `phantom-infer chat --json` on the trained demo model, asked the colour of the square in
/// its own picture, on flex, with `extra` options.
// Not every test binary that shares this module asks the demo model.
#[allow(dead_code)]
pub fn ask_demo(extra: &[&str]) -> Output {
    let model = fixtures().join("demo_model");
    let image = model.join("square.png");
    let (model, image) = (model.display().to_string(), image.display().to_string());
    let mut args = vec![
        "chat",
        "--model",
        &model,
        "--image",
        &image,
        "--prompt",
        "What colour is the square?",
        "--device",
        "flex",
        "--json",
    ];
    args.extend_from_slice(extra);
    phantom_infer(&args)
}
