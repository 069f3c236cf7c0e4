//! `cargo xtask …`: the project's tasks in one place.

mod serve;
mod tch;
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
    /// Side-by-side CPU benchmark: this project on each CPU backend and a plain-PyTorch
    /// reference of the same shapes, with the memory-bandwidth bound of decoding.
    BenchInfer {
        /// Model sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "0.5b")]
        sizes: Vec<String>,
        /// Decode steps per context (the first is a warm-up).
        #[arg(long, default_value_t = 9)]
        decode_steps: usize,
        /// Skip the PyTorch reference.
        #[arg(long)]
        no_torch: bool,
    },
    /// The browser build: `phantom-wasm` for wasm32 in release, and its JavaScript glue from
    /// the `wasm-bindgen` CLI at the locked version (installed from crates.io if missing) in
    /// `phantom-wasm/web/pkg/`.
    Wasm,
    /// Serves the web page on 127.0.0.1, with a model folder at `model/` (run `cargo xtask
    /// wasm` first).
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

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
fn run_tests(mut cmd: Command, what: &str) -> anyhow::Result<()> {
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
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
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

fn bench_infer(sizes: &[String], decode_steps: usize, no_torch: bool) -> anyhow::Result<()> {
    let mut build = cargo();
    // The dev profile compiles every dependency (Burn's kernels included) at opt-level 3 and
    // shares its build with `cargo xtask test`, so the benchmark costs no second Burn build.
    build.args([
        "build",
        "-p",
        "phantom-infer",
        "--features",
        "flex,ndarray,wgpu",
    ]);
    run(build, "building phantom-infer (flex + ndarray)")?;
    let bin = web::target_dir().join("debug/phantom-infer");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let columns = [
        ("vision_ms_per_tile", "vision ms/tile"),
        ("prefill_tokens_per_s", "prefill tok/s (128)"),
        ("decode_tokens_per_s_128", "decode tok/s @128"),
        ("decode_tokens_per_s_1024", "decode tok/s @1024"),
        ("peak_rss_mb", "peak RSS MiB"),
    ];
    for size in sizes {
        let mut rows: Vec<(String, serde_json::Value)> = Vec::new();
        for device in ["flex", "ndarray"] {
            let mut cmd = Command::new(&bin);
            cmd.args([
                "bench",
                "--size",
                size,
                "--device",
                device,
                "--decode-steps",
            ])
            .arg(decode_steps.to_string());
            rows.push((
                device.to_string(),
                json_of(cmd, &format!("bench {size} on {device}"))?,
            ));
        }
        let torch = if no_torch {
            None
        } else {
            let python = tch::torch_python()?;
            let mut cmd = Command::new(python);
            cmd.arg(root.join("xtask/bench/torch_phantom.py"))
                .args(["--size", size, "--decode-steps"])
                .arg(decode_steps.to_string());
            Some(json_of(cmd, &format!("PyTorch reference {size}"))?)
        };
        if let Some(t) = &torch {
            rows.push(("pytorch".into(), t.clone()));
        }
        let get = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
        println!(
            "\n### Phantom-{size} shapes, f32, this machine ({} threads)\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let mut header = String::from("| backend |");
        let mut rule = String::from("|---|");
        for (_, name) in columns {
            header.push_str(&format!(" {name} |"));
            rule.push_str("---|");
        }
        println!("{header}\n{rule}");
        for (name, v) in &rows {
            let mut line = format!("| {name} |");
            for (key, _) in columns {
                match (get(v, key), torch.as_ref().and_then(|t| get(t, key))) {
                    (Some(x), Some(t)) if name != "pytorch" && t > 0.0 => {
                        line.push_str(&format!(" {x:.1} ({:.2}×) |", x / t))
                    }
                    (Some(x), _) => line.push_str(&format!(" {x:.1} |")),
                    (None, _) => line.push_str(" – |"),
                }
            }
            println!("{line}");
        }
        if let Some((_, first)) = rows.first() {
            println!(
                "\nDecode bound: {:.0} MB of f32 decoder weights per token ÷ {:.1} GB/s copy bandwidth (read + write) = {:.1} tok/s.\n(×) is ours ÷ PyTorch: above 1 is faster for tokens/s, slower for ms and memory.",
                get(first, "weight_bytes_per_token").unwrap_or(0.0) / 1e6,
                get(first, "copy_bandwidth_gbs").unwrap_or(0.0),
                get(first, "decode_bound_tokens_per_s").unwrap_or(0.0)
            );
        }
    }
    Ok(())
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
            sizes,
            decode_steps,
            no_torch,
        } => bench_infer(&sizes, decode_steps, no_torch),
        Task::Wasm => web::build(),
        Task::ServeWeb { port, model } => {
            let (model, tokenizer) = model.resolve()?;
            let mut site = serve::Site::default()
                .folder("/", web::web_dir())
                .folder("/model/", &model);
            if let Some(t) = tokenizer {
                site = site.file("/model/tokenizer.json", t);
            }
            if !web::web_dir().join("pkg/phantom_wasm.js").is_file() {
                eprintln!("xtask: phantom-wasm/web/pkg is missing; run `cargo xtask wasm` first");
            }
            let addr = serve::start(site, port)?;
            println!(
                "Serving the Phantom page at http://{addr}/ (model: {}); Ctrl-C stops.",
                model.display()
            );
            loop {
                std::thread::park();
            }
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
        } => {
            let (model, tokenizer) = model.resolve()?;
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
