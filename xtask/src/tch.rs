//! `cargo xtask test-tch`: the backend tests on libtorch (CPU). Burn 0.22 builds on `tch` 0.22,
//! which needs libtorch 2.9.0; PyTorch's 2.9.0 wheel from PyPI carries it, so the venv of the
//! benchmark (`xtask/bench/setup_venv.sh`) provides it, and `tch` links it through
//! `LIBTORCH_USE_PYTORCH`. The build gets its own target folder: a second Burn build whose
//! features would otherwise churn the main one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{cargo, run_tests, web};

/// The python of the PyTorch venv, created on first use (about 1 GB of wheels).
pub fn torch_python() -> anyhow::Result<PathBuf> {
    let setup = web::root().join("xtask/bench/setup_venv.sh");
    eprintln!("xtask: PyTorch venv ({})", setup.display());
    let out = Command::new("bash")
        .arg(&setup)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("setting up the PyTorch venv")?;
    if !out.status.success() {
        bail!("{} failed ({})", setup.display(), out.status);
    }
    let python = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    if python.is_empty() {
        bail!("{} printed no python path", setup.display());
    }
    Ok(PathBuf::from(python))
}

/// The wheel's `torch/lib`, which the test binaries load libtorch from.
fn torch_lib(python: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let lib = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !lib.join("libtorch_cpu.so").is_file() {
        bail!(
            "no libtorch_cpu.so under the venv's torch ({})",
            lib.display()
        );
    }
    Ok(lib)
}

/// Builds the tests with the `tch` feature and runs every backend test on `--device tch`.
pub fn test() -> anyhow::Result<()> {
    let python = torch_python()?;
    let bin = python.parent().context("venv python has no folder")?;
    let lib = torch_lib(&python)?;
    let join = |first: &Path, var: &str| -> anyhow::Result<std::ffi::OsString> {
        let rest = std::env::var_os(var).unwrap_or_default();
        Ok(std::env::join_paths(
            std::iter::once(first.to_path_buf()).chain(std::env::split_paths(&rest)),
        )?)
    };
    let mut test = cargo();
    test.args([
        "test",
        "-p",
        "phantom-tests",
        "--features",
        "phantom-tests/tch",
    ])
    .env("CARGO_TARGET_DIR", web::target_dir().join("tch"))
    .env("LIBTORCH_USE_PYTORCH", "1")
    .env("PATH", join(bin, "PATH")?)
    .env("LD_LIBRARY_PATH", join(&lib, "LD_LIBRARY_PATH")?)
    .env("PHANTOM_TEST_DEVICES", "tch");
    run_tests(
        test,
        "cargo test -p phantom-tests --features phantom-tests/tch (PHANTOM_TEST_DEVICES=tch)",
    )
}
