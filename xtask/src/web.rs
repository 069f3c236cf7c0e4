//! `cargo xtask wasm`: the browser build. A release build of `phantom-wasm` for
//! `wasm32-unknown-unknown`, then the `wasm-bindgen` CLI at exactly the version of the
//! `wasm-bindgen` crate in `Cargo.lock` (the two must match) writes the JavaScript glue into
//! `phantom-wasm/web/pkg/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{cargo, run};

const TARGET: &str = "wasm32-unknown-unknown";

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The folder the page is served from.
pub fn web_dir() -> PathBuf {
    root().join("phantom-wasm/web")
}

/// Cargo's target folder (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// The version of a package in `Cargo.lock`.
fn locked_version(package: &str) -> anyhow::Result<String> {
    let lock = root().join("Cargo.lock");
    let text =
        std::fs::read_to_string(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{package}\"")
            && let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = "))
        {
            return Ok(v.trim_matches('"').to_string());
        }
    }
    bail!("{package} is not in {}", lock.display())
}

fn ensure_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match installed {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == TARGET) =>
        {
            Ok(())
        }
        Ok(_) => {
            let mut add = Command::new("rustup");
            add.args(["target", "add", TARGET]);
            run(add, &format!("rustup target add {TARGET}"))
        }
        // Without rustup the toolchain may still carry the target; the build will say if not.
        Err(_) => Ok(()),
    }
}

/// The `wasm-bindgen` CLI matching `version`, installed from crates.io when missing.
fn wasm_bindgen_cli(version: &str) -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"));
    let bin = home.join("bin/wasm-bindgen");
    let current = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if current == format!("wasm-bindgen {version}") {
        return Ok(bin);
    }
    // Not `--locked`: the CLI's own lock file names a dependency version crates.io has yanked.
    let mut install = cargo();
    install.args([
        "install",
        "wasm-bindgen-cli",
        "--version",
        version,
        "--force",
    ]);
    run(
        install,
        &format!("cargo install wasm-bindgen-cli --version {version}"),
    )?;
    Ok(bin)
}

/// Builds the page's WebAssembly module and its JavaScript glue into `phantom-wasm/web/pkg/`.
pub fn build() -> anyhow::Result<()> {
    ensure_target()?;
    let version = locked_version("wasm-bindgen")?;
    let cli = wasm_bindgen_cli(&version)?;
    let mut build = cargo();
    // SIMD and the 4 GiB memory ceiling come from `.cargo/config.toml`.
    build.args([
        "build",
        "--release",
        "--target",
        TARGET,
        "-p",
        "phantom-wasm",
    ]);
    run(
        build,
        &format!("cargo build --release --target {TARGET} -p phantom-wasm"),
    )?;
    let wasm = target_dir().join(TARGET).join("release/phantom_wasm.wasm");
    let out = web_dir().join("pkg");
    let mut bindgen = Command::new(cli);
    bindgen
        .args(["--target", "web", "--no-typescript", "--out-dir"])
        .arg(&out)
        .arg(&wasm);
    run(
        bindgen,
        &format!("wasm-bindgen {version} → {}", out.display()),
    )?;
    let size = std::fs::metadata(out.join("phantom_wasm_bg.wasm")).map_or(0, |m| m.len());
    eprintln!(
        "xtask: {} ({:.1} MB)",
        out.join("phantom_wasm_bg.wasm").display(),
        size as f64 / 1e6
    );
    Ok(())
}
