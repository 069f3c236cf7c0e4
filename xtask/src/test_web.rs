//! `cargo xtask test-web`: the page end to end in headless Chromium, on both browser backends,
//! against the native CLI's answer for the same model, picture, question and token budget.
//!
//! The native `phantom-infer chat --json` answer is computed first. Then the page, the model
//! folder and the tokenizer are served on 127.0.0.1 and `phantom-wasm/web/test/e2e.mjs`
//! (playwright-core) drives Chromium twice: once without WebGPU, where the page must fall back
//! to WebAssembly on the CPU, and once with `--enable-unsafe-webgpu`, where it must pick WebGPU
//! (a software SwiftShader adapter on machines without a GPU). Both greedy answers, token for
//! token and as streamed into the page, must equal the native one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::server::Server;
use crate::web;
use crate::{cargo, json_of, run};

/// What to run.
pub struct TestWeb {
    /// Model folder (`config.json`, weights).
    pub model: PathBuf,
    /// `tokenizer.json` (default: the model folder's).
    pub tokenizer: Option<PathBuf>,
    /// The picture.
    pub image: PathBuf,
    /// The question.
    pub prompt: String,
    /// Token budget of both answers.
    pub max_new_tokens: usize,
    /// Times the question is asked on each loaded page (the first answer on WebGPU includes
    /// compiling its kernels; later ones show the steady speed).
    pub asks: usize,
    /// A built `phantom-infer` to take the native answer from (default: build one).
    pub native_bin: Option<PathBuf>,
    /// Browser backends to test: `cpu`, `webgpu`.
    pub backends: Vec<String>,
    /// The Chromium binary.
    pub chromium: PathBuf,
    /// Limit for each browser run.
    pub timeout_s: u64,
    /// Skip `cargo xtask wasm` (the page's `pkg/` is already built).
    pub no_build: bool,
}

/// Installs playwright-core from the lock file next to the test when it is missing.
fn ensure_playwright(dir: &Path) -> anyhow::Result<()> {
    if dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        return Ok(());
    }
    let mut npm = Command::new("npm");
    npm.args(["ci", "--no-audit", "--no-fund"]).current_dir(dir);
    run(npm, "npm ci (playwright-core)")
}

/// The test build's `phantom-infer` (or `given`).
pub fn native_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(bin) = given {
        return Ok(bin.to_path_buf());
    }
    // Exactly the build of `cargo xtask test` (which leaves `phantom-infer` in `debug/`), so
    // that after the tests this costs nothing; any other feature set would rebuild Burn.
    let mut build = cargo();
    build.args([
        "test",
        "--workspace",
        "--no-run",
        "--features",
        crate::TEST_FEATURES,
    ]);
    run(build, "building phantom-infer (the test build)")?;
    let bin = web::target_dir().join("debug/phantom-infer");
    if !bin.is_file() {
        bail!("the test build left no {}", bin.display());
    }
    Ok(bin)
}

/// `model` quantized as `scheme` by `phantom-infer quantize` into the target folder.
pub fn quantized(model: &Path, scheme: &str, native_bin: Option<&Path>) -> anyhow::Result<PathBuf> {
    let bin = native_binary(native_bin)?;
    let out = web::target_dir().join(format!("web-model-{scheme}"));
    crate::quantize_folder(&bin, model, &out, scheme)?;
    Ok(out)
}

impl TestWeb {
    fn tokenizer(&self) -> PathBuf {
        self.tokenizer
            .clone()
            .unwrap_or_else(|| self.model.join("tokenizer.json"))
    }

    /// The native CLI's answer as `{"answer", "tokens", "timings"}`.
    fn native_answer(&self) -> anyhow::Result<Value> {
        let bin = native_binary(self.native_bin.as_deref())?;
        let mut chat = Command::new(&bin);
        chat.arg("chat")
            .arg("--model")
            .arg(&self.model)
            .arg("--tokenizer")
            .arg(self.tokenizer())
            .arg("--image")
            .arg(&self.image)
            .args([
                "--prompt",
                &self.prompt,
                "--device",
                "flex",
                "--json",
                "--quiet",
            ])
            .args(["--max-new-tokens", &self.max_new_tokens.to_string()]);
        json_of(chat, &format!("native answer ({})", bin.display()))
    }

    /// Runs the whole check and prints a summary; fails on any mismatch.
    pub fn run(&self) -> anyhow::Result<()> {
        for backend in &self.backends {
            if backend != "cpu" && backend != "webgpu" {
                bail!("unknown browser backend `{backend}`; expected cpu or webgpu");
            }
        }
        if !self.no_build {
            web::build()?;
        }
        let native = self.native_answer()?;
        let test_dir = web::web_dir().join("test");
        ensure_playwright(&test_dir)?;

        let bin = native_binary(self.native_bin.as_deref())?;
        let tokenizer = self.tokenizer();
        let server = Server::start(
            &bin,
            &self.model,
            Some(&tokenizer),
            Some(&web::web_dir()),
            0,
        )?;
        let url = format!("http://{}/", server.addr);
        eprintln!("xtask: serving the page at {url}");

        let mut runs = Vec::new();
        let mut failures = Vec::new();
        for backend in &self.backends {
            let mut node = Command::new("node");
            node.arg(test_dir.join("e2e.mjs"))
                .args(["--url", &url, "--prompt", &self.prompt])
                .arg("--image")
                .arg(&self.image)
                .args(["--max-new-tokens", &self.max_new_tokens.to_string()])
                .args(["--asks", &self.asks.to_string()])
                .arg("--chromium")
                .arg(&self.chromium)
                .args(["--timeout-s", &self.timeout_s.to_string()]);
            if backend == "webgpu" {
                node.arg("--webgpu");
            }
            eprintln!("xtask: headless Chromium, expecting the page to pick `{backend}`");
            let out = node.output().context("starting node")?;
            let text = String::from_utf8_lossy(&out.stdout);
            let report: Value = text
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| {
                    json!({"ok": false, "error": format!("no report; stderr: {}",
                        String::from_utf8_lossy(&out.stderr))})
                });
            let problems = compare(backend, &report, &native);
            if problems.is_empty() {
                eprintln!("xtask: {backend}: the browser's answer equals the native one");
            } else {
                for p in &problems {
                    eprintln!("xtask: {backend}: {p}");
                }
                if let Some(lines) = report.get("console").and_then(Value::as_array) {
                    eprintln!("xtask: {backend}: the page's console:");
                    for l in lines {
                        eprintln!("    {}", l.as_str().unwrap_or(""));
                    }
                }
                failures.push(backend.clone());
            }
            runs.push((backend.clone(), report));
        }
        summarise(&native, &runs);
        let out = web::target_dir().join("test-web.json");
        let all = json!({
            "native": native,
            "browser": runs.iter().map(|(b, r)| json!({"expected": b, "report": r})).collect::<Vec<_>>(),
        });
        if std::fs::write(&out, serde_json::to_string_pretty(&all)?).is_ok() {
            eprintln!("xtask: full reports in {}", out.display());
        }
        if !failures.is_empty() {
            bail!("test-web failed on: {}", failures.join(", "));
        }
        println!("test-web: {} backend(s) passed", runs.len());
        Ok(())
    }
}

/// Every way the browser's run differs from what is expected.
fn compare(backend: &str, report: &Value, native: &Value) -> Vec<String> {
    if report.get("ok") != Some(&Value::Bool(true)) {
        return vec![format!(
            "the page did not answer: {}",
            report.get("error").and_then(Value::as_str).unwrap_or("?")
        )];
    }
    let answers = report
        .get("answers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if answers.is_empty() {
        return vec!["the page reported no answer".into()];
    }
    let tokens = native
        .get("tokens")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let mut problems = Vec::new();
    for (i, answer) in answers.iter().enumerate() {
        let n = i + 1;
        let field = |k: &str| answer.get(k).unwrap_or(&Value::Null);
        if field("backend").as_str() != Some(backend) {
            problems.push(format!(
                "answer {n} ran on {}, expected {backend}",
                field("backend")
            ));
        }
        if answer.get("tokens") != native.get("tokens") {
            problems.push(format!(
                "answer {n}: tokens differ: browser {} vs native {}",
                field("tokens"),
                native.get("tokens").unwrap_or(&Value::Null)
            ));
        }
        if answer.get("answer") != native.get("answer") {
            problems.push(format!(
                "answer {n}: text differs: browser {} vs native {}",
                field("answer"),
                native.get("answer").unwrap_or(&Value::Null)
            ));
        }
        if answer.get("shown") != native.get("answer") {
            problems.push(format!(
                "answer {n}: the text streamed into the page differs from the answer"
            ));
        }
        let updates = field("updates").as_u64().unwrap_or(0);
        if tokens > 1 && updates < 2 {
            problems.push(format!(
                "answer {n} did not stream ({updates} update(s) of the page for {tokens} tokens)"
            ));
        }
    }
    problems
}

fn summarise(native: &Value, runs: &[(String, Value)]) {
    let num = |v: &Value, path: &[&str]| {
        path.iter()
            .try_fold(v, |v, k| v.get(k))
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    println!("\n| run | backend | vision ms | prefill tok/s | decode tok/s | tokens | load ms |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| native CLI | flex | {:.0} | {:.1} | {:.1} | {} | – |",
        num(native, &["timings", "vision_ms"]),
        num(native, &["timings", "prefill_tokens_per_s"]),
        num(native, &["timings", "decode_tokens_per_s"]),
        native
            .get("tokens")
            .and_then(Value::as_array)
            .map_or(0, Vec::len),
    );
    for (expected, r) in runs {
        let adapter = r
            .pointer("/info/adapter")
            .and_then(Value::as_str)
            .map(|a| format!(" ({a})"))
            .unwrap_or_default();
        let answers = r.get("answers").and_then(Value::as_array);
        for (i, a) in answers.into_iter().flatten().enumerate() {
            let load = if i == 0 {
                format!("{:.0}", num(r, &["load_ms"]))
            } else {
                "–".into()
            };
            println!(
                "| Chromium, expecting {expected}, answer {} | {}{adapter} | {:.0} | {:.1} | {:.1} | {} | {load} |",
                i + 1,
                a.get("backend").and_then(Value::as_str).unwrap_or("–"),
                num(a, &["timings", "vision_ms"]),
                num(a, &["timings", "prefill_tokens_per_s"]),
                num(a, &["timings", "decode_tokens_per_s"]),
                a.get("tokens")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len),
            );
        }
        if answers.is_none_or(|a| a.is_empty()) {
            println!("| Chromium, expecting {expected} | failed | – | – | – | – | – |");
        }
    }
    for (expected, r) in runs {
        if let Some(limits) = r.pointer("/info/limits").filter(|l| !l.is_null()) {
            println!("\n{expected}: WebGPU limits in use: {limits}");
        }
    }
    println!();
}
