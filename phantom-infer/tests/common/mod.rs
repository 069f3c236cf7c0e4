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
