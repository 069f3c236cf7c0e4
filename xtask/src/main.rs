//! `cargo xtask …`: the project's tasks in one place.

mod bench;
mod gpu_check;
mod server;
mod tch;
mod test_dashboard;
mod test_serve;
mod test_web;
mod web;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "phantom-rs project tasks")]
struct Xtask {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The whole test suite, with the parity tests on flex, ndarray and wgpu (Mesa's software
    /// Vulkan/GL where there is no GPU).
    Test {
        /// Skip the wgpu run (no Vulkan/GL driver on this machine).
        #[arg(long)]
        no_wgpu: bool,
    },
    /// The backend tests on libtorch (CPU): PyTorch 2.9.0's wheel from PyPI in a venv (set up
    /// once), a separate build in `<target>/tch`, every parity test on `--device tch`.
    TestTch,
    /// Side-by-side CPU benchmark on this machine: phantom-rs on flex (f32, f16, bf16) next to
    /// a plain-PyTorch model of the same shapes (f32, bf16) and llama.cpp on a GGUF of the same
    /// decoder (F32, F16, Q8_0, Q4_0), as one table naming the CPU. Set-up (checkpoints, venv,
    /// node-llama-cpp, GGUF files) happens once under `<target>/bench`.
    BenchInfer {
        /// Decode steps per context (the first is a warm-up).
        #[arg(long, default_value_t = 9)]
        decode_steps: usize,
        /// Runs of every configuration, alternated; the table shows the median and range.
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Skip the PyTorch reference.
        #[arg(long)]
        no_torch: bool,
        /// Skip llama.cpp.
        #[arg(long)]
        no_llama: bool,
    },
    /// The GPU backends as one table: on a machine with an NVIDIA GPU, the `cuda` and `wgpu`
    /// (Vulkan) builds, their backend tests and the Phantom-0.5B benchmark on each; without
    /// one, the backend tests on wgpu's software path, naming what was skipped.
    GpuCheck,
    /// `phantom-infer serve` with the demo model, driven by the official `openai` Python
    /// package (venv made once) and curl, with a load test of concurrent streaming clients.
    TestServe,
    /// The demo's training dashboard in a 120x40 pseudo-terminal, rendered by the `pyte`
    /// terminal emulator (venv made once): checks the PO metrics are drawn and saves the frame.
    TestDashboard,
    /// The browser build: `phantom-wasm` for wasm32 in release, and its JavaScript glue from
    /// the `wasm-bindgen` CLI at the locked version (installed from crates.io if missing) in
    /// `phantom-wasm/web/pkg/`.
    Wasm,
    /// Serves the web page on 127.0.0.1 with `phantom-infer serve`, a model folder at
    /// `model/` and the OpenAI API at `/v1` (run `cargo xtask wasm` first).
    ServeWeb {
        /// Port on 127.0.0.1.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[command(flatten)]
        model: WebModel,
    },
    /// The page end to end in headless Chromium, on WebAssembly (CPU) and on WebGPU, checked
    /// against the native CLI's greedy answer for the same input.
    TestWeb {
        #[command(flatten)]
        model: WebModel,
        /// The picture to ask about.
        #[arg(long, default_value = "tests/fixtures/demo_model/square.png")]
        image: PathBuf,
        /// The question.
        #[arg(long, default_value = "What colour is the square?")]
        prompt: String,
        /// New tokens of both answers.
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// Times the question is asked on each loaded page (later answers run with the GPU
        /// kernels already compiled).
        #[arg(long, default_value_t = 1)]
        asks: usize,
        /// A built phantom-infer binary for the native answer (default: build it).
        #[arg(long)]
        native_bin: Option<PathBuf>,
        /// Browser backends to test.
        #[arg(long, value_delimiter = ',', default_value = "cpu,webgpu")]
        backends: Vec<String>,
        /// The Chromium to drive.
        #[arg(long, default_value = "/usr/bin/chromium")]
        chromium: PathBuf,
        /// Seconds allowed to each browser run.
        #[arg(long, default_value_t = 900)]
        timeout_s: u64,
        /// Use the page's existing build instead of running `cargo xtask wasm`.
        #[arg(long)]
        no_build: bool,
        /// Quantize the model first (`phantom-infer quantize --scheme q8|q4`) and test the
        /// quantized folder.
        #[arg(long)]
        quantize: Option<String>,
    },
}

/// The demo model `phantom-train demo` trained, served by default.
const DEFAULT_WEB_MODEL: &str = "tests/fixtures/demo_model";
/// The tiny reference model of the parity tests, whose tokenizer lives apart from it.
const TINY_MODEL: &str = "tests/fixtures/phantom-ref/tiny_tied";

/// The model a web task serves.
#[derive(clap::Args)]
struct WebModel {
    /// Model folder with config.json and model.safetensors (or shards); the default is the
    /// demo model trained by `phantom-train demo`.
    #[arg(long, default_value = DEFAULT_WEB_MODEL)]
    model: PathBuf,
    /// tokenizer.json to serve with it (default: the one in the model folder, or the toy
    /// tokenizer of the tests for the tiny reference model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

impl WebModel {
    /// Absolute paths (the tasks run from the repository root either way).
    fn resolve(&self) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
        let root = web::root();
        let model = root.join(&self.model);
        if !model.join("config.json").is_file() {
            bail!("{} has no config.json", model.display());
        }
        let tokenizer = match &self.tokenizer {
            Some(t) => Some(root.join(t)),
            None if !model.join("tokenizer.json").is_file()
                && self.model == Path::new(TINY_MODEL) =>
            {
                Some(root.join("tests/fixtures/toy_tokenizer/tokenizer.json"))
            }
            None => None,
        };
        Ok((model, tokenizer))
    }
}

/// The features of `cargo xtask test`: every CPU backend and wgpu, unified across the workspace.
pub(crate) const TEST_FEATURES: &str = "phantom-tests/ndarray,phantom-tests/wgpu";

/// Builds the workspace's binaries with the test features (the artifacts the tests share).
pub(crate) fn build_bins(what: &str) -> anyhow::Result<()> {
    let mut build = cargo();
    build.args([
        "build",
        "--workspace",
        "--features",
        TEST_FEATURES,
        "--bins",
    ]);
    run(build, what)
}

/// The Python of a venv under the target folder holding `package` (a pinned requirement),
/// made once; `module` is what it imports.
pub(crate) fn python_with(
    venv: &str,
    package: &str,
    module: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let venv = web::target_dir().join(venv);
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        let mut create = Command::new("python3");
        create.args(["-m", "venv"]).arg(&venv);
        run(create, &format!("creating {}", venv.display()))?;
        let mut pip = Command::new(&python);
        pip.args(["-m", "pip", "install", "--quiet", package]);
        run(pip, &format!("installing {package}"))?;
    }
    Ok(python)
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `phantom-infer quantize --model MODEL --out OUT --scheme SCHEME` with the binary `bin`.
fn quantize_folder(bin: &Path, model: &Path, out: &Path, scheme: &str) -> anyhow::Result<()> {
    let mut quantize = Command::new(bin);
    quantize
        .arg("quantize")
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(["--scheme", scheme, "--overwrite"]);
    run(
        quantize,
        &format!("quantizing {} as {scheme}", model.display()),
    )
}

fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and closes with one line totalling every test
/// binary's result (the doc-test runs come last and would otherwise close on "0 passed").
fn run_tests(cmd: Command, what: &str) -> anyhow::Result<()> {
    let (passed, failed, status) = test_counts(cmd, what)?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through: the passed and failed tests over every test
/// binary, and the exit status.
pub(crate) fn test_counts(
    mut cmd: Command,
    what: &str,
) -> anyhow::Result<(u64, u64, std::process::ExitStatus)> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {what}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            let (p, f) = result_counts(&line);
            passed += p;
            failed += f;
        }
    }
    Ok((passed, failed, child.wait()?))
}

/// The passed and failed counts of a `test result: …` line of `cargo test` (zeros for any
/// other line).
fn result_counts(line: &str) -> (u64, u64) {
    let (mut passed, mut failed) = (0, 0);
    if let Some(rest) = line.strip_prefix("test result: ") {
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let n: u64 = n.trim_start_matches("ok.").trim().parse().unwrap_or(0);
            match label {
                "passed" => passed += n,
                "failed" => failed += n,
                _ => {}
            }
        }
    }
    (passed, failed)
}

/// Runs a command and parses the JSON object it prints last on stdout.
fn json_of(mut cmd: Command, what: &str) -> anyhow::Result<serde_json::Value> {
    eprintln!("xtask: {what}");
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("{what} printed no JSON: {text}"))
}

fn main() -> anyhow::Result<()> {
    match Xtask::parse().task {
        Task::Test { no_wgpu } => {
            // One build with every CPU backend (and wgpu) so that the parity tests run on each
            // of them; features unify across the workspace, so burn compiles once.
            let features = if no_wgpu {
                "phantom-tests/ndarray"
            } else {
                TEST_FEATURES
            };
            let mut test = cargo();
            test.args(["test", "--workspace", "--features", features]);
            run_tests(
                test,
                &format!("cargo test --workspace --features {features}"),
            )
        }
        Task::TestTch => tch::test(),
        Task::BenchInfer {
            decode_steps,
            repeats,
            no_torch,
            no_llama,
        } => bench::bench_infer(&bench::Options {
            decode_steps,
            no_torch,
            no_llama,
            repeats,
        }),
        Task::GpuCheck => gpu_check::gpu_check(),
        Task::TestServe => test_serve::test_serve(),
        Task::TestDashboard => test_dashboard::test_dashboard(),
        Task::Wasm => web::build(),
        Task::ServeWeb { port, model } => {
            let (model, tokenizer) = model.resolve()?;
            if !web::web_dir().join("pkg/phantom_wasm.js").is_file() {
                eprintln!("xtask: phantom-wasm/web/pkg is missing; run `cargo xtask wasm` first");
            }
            let bin = test_web::native_binary(None)?;
            let server = server::Server::start(
                &bin,
                &model,
                tokenizer.as_deref(),
                Some(&web::web_dir()),
                port,
            )?;
            println!(
                "Serving the Phantom page at http://{}/ and the OpenAI API at http://{}/v1 \
                 (model: {}); Ctrl-C stops.",
                server.addr,
                server.addr,
                model.display()
            );
            server.wait()
        }
        Task::TestWeb {
            model,
            image,
            prompt,
            max_new_tokens,
            asks,
            native_bin,
            backends,
            chromium,
            timeout_s,
            no_build,
            quantize,
        } => {
            let (mut model, tokenizer) = model.resolve()?;
            if let Some(scheme) = quantize {
                model = test_web::quantized(&model, &scheme, native_bin.as_deref())?;
            }
            test_web::TestWeb {
                model,
                tokenizer,
                image: web::root().join(image),
                prompt,
                max_new_tokens,
                asks,
                native_bin: native_bin.map(|b| web::root().join(b)),
                backends,
                chromium,
                timeout_s,
                no_build,
            }
            .run()
        }
    }
}
