//! `cargo xtask gpu-check`: the GPU backends of this machine, checked and measured as one table.
//!
//! With an NVIDIA GPU (`nvidia-smi` lists one) it builds the `cuda` and `wgpu` features in
//! `<target>/gpu` (a build of its own, so that the CPU build is left as it is), runs the
//! backend tests (parity with the official outputs in f32, half precision, quantized weights)
//! on `cuda` and on `vulkan` (wgpu pinned to Vulkan), then `phantom-infer bench` with
//! Phantom-0.5B shapes (random weights) on each, in f32 and in each backend's half precision.
//! Without one it runs the same tests on wgpu's software path (Mesa's Vulkan, as `cargo xtask
//! test` does) and names what it skipped.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::bail;
use serde_json::Value;

use crate::{TEST_FEATURES, bench::cell, cargo, json_of, run, web};

/// The test binaries that exercise a backend end to end.
const BACKEND_TESTS: [&str; 4] = ["parity", "precision_f16", "precision_bf16", "quantized"];

/// The time the whole check is meant to fit in on a GPU machine.
const BUDGET_S: u64 = 8 * 60;

/// The NVIDIA GPUs `nvidia-smi` lists (name, memory, driver), none where it is missing.
fn nvidia_gpus() -> Vec<String> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ])
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// Passed and failed tests of a `cargo test` run, its output passed through; an error when it
/// failed without a failing test (it did not build).
fn count_tests(cmd: Command, what: &str) -> anyhow::Result<(u64, u64)> {
    let (passed, failed, status) = crate::test_counts(cmd, what)?;
    if !status.success() && failed == 0 {
        bail!("{what} failed ({status})");
    }
    Ok((passed, failed))
}

/// `cargo test` of the backend test binaries with `features`, on `devices`.
fn backend_tests(features: &str, devices: &str, target: Option<&Path>) -> Command {
    let mut test = cargo();
    test.args(["test", "--workspace", "--features", features]);
    for name in BACKEND_TESTS {
        test.args(["--test", name]);
    }
    test.env("PHANTOM_TEST_DEVICES", devices);
    if let Some(dir) = target {
        test.env("CARGO_TARGET_DIR", dir);
    }
    test
}

/// One line of the table.
struct Line {
    backend: String,
    tests: String,
    dtype: String,
    report: Option<Value>,
}

fn print_table(title: &str, lines: &[Line]) {
    println!("\n{title}\n");
    println!(
        "| backend | backend tests | dtype | vision ms/tile | prefill tok/s (128) | decode tok/s @128 | decode tok/s @1024 | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for line in lines {
        let reports: Vec<Value> = line.report.iter().cloned().collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            line.backend,
            line.tests,
            line.dtype,
            cell(&reports, "vision_ms_per_tile_warm", 0),
            cell(&reports, "prefill_tokens_per_s", 0),
            cell(&reports, "decode_tokens_per_s_128", 1),
            cell(&reports, "decode_tokens_per_s_1024", 1),
            cell(&reports, "peak_rss_mb", 0),
        );
    }
}

fn tally((passed, failed): (u64, u64)) -> String {
    format!("{passed} passed, {failed} failed")
}

/// Runs the check and prints the table.
pub fn gpu_check() -> anyhow::Result<()> {
    let start = Instant::now();
    let gpus = nvidia_gpus();
    if gpus.is_empty() {
        return software_only(start);
    }
    let target = web::target_dir().join("gpu");
    let features = "phantom-tests/cuda,phantom-tests/wgpu";
    let mut lines = Vec::new();
    let mut failed = 0;
    let mut counts = Vec::new();
    for device in ["cuda", "vulkan"] {
        let tally_of = count_tests(
            backend_tests(features, device, Some(&target)),
            &format!(
                "backend tests on {device} ({features}, {})",
                target.display()
            ),
        )?;
        failed += tally_of.1;
        counts.push((device, tally_of));
    }
    let mut build = cargo();
    build
        .args([
            "build",
            "--release",
            "-p",
            "phantom-infer",
            "--features",
            "phantom-infer/cuda,phantom-infer/wgpu",
        ])
        .env("CARGO_TARGET_DIR", &target);
    run(build, "building phantom-infer with cuda and wgpu (release)")?;
    let bin = target.join("release/phantom-infer");
    // wgpu has no bf16 (WGSL lacks it): its half precision is f16.
    for (device, tally_of) in counts {
        let dtypes: &[&str] = if device == "cuda" {
            &["f32", "bf16"]
        } else {
            &["f32", "f16"]
        };
        for dtype in dtypes {
            let mut bench = Command::new(&bin);
            bench.args([
                "bench", "--size", "0.5b", "--device", device, "--dtype", dtype,
            ]);
            let report = json_of(bench, &format!("0.5B bench on {device} in {dtype}"))
                .inspect_err(|e| eprintln!("xtask: {e:#}"))
                .ok();
            lines.push(Line {
                backend: device.into(),
                tests: tally(tally_of),
                dtype: (*dtype).into(),
                report,
            });
        }
    }
    let elapsed = start.elapsed().as_secs();
    print_table(
        &format!(
            "GPU: {}; Phantom-0.5B shapes, random weights; whole check {} min {} s{}",
            gpus.join("; "),
            elapsed / 60,
            elapsed % 60,
            if elapsed > BUDGET_S {
                format!(" (over its {} min budget)", BUDGET_S / 60)
            } else {
                String::new()
            }
        ),
        &lines,
    );
    if failed > 0 {
        bail!("{failed} backend tests failed");
    }
    if lines.iter().any(|l| l.report.is_none()) {
        bail!("a benchmark failed (see above)");
    }
    Ok(())
}

/// No NVIDIA GPU: the backend tests on wgpu's software path, and what was skipped.
fn software_only(start: Instant) -> anyhow::Result<()> {
    let (passed, failed) = count_tests(
        backend_tests(TEST_FEATURES, "wgpu", None),
        "backend tests on wgpu (software path; no NVIDIA GPU)",
    )?;
    let elapsed = start.elapsed().as_secs();
    print_table(
        &format!(
            "No NVIDIA GPU (nvidia-smi lists none): wgpu on its software path only; whole check \
             {} min {} s",
            elapsed / 60,
            elapsed % 60
        ),
        &[Line {
            backend: "wgpu (software)".into(),
            tests: tally((passed, failed)),
            dtype: "f32, f16".into(),
            report: None,
        }],
    );
    println!(
        "\nSkipped: the `cuda` build and its backend tests, wgpu on a GPU's Vulkan driver, and the \
         Phantom-0.5B benchmark on both (a software rasteriser would take hours over it)."
    );
    if failed > 0 {
        bail!("{failed} backend tests failed on wgpu");
    }
    Ok(())
}
