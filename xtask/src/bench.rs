//! `cargo xtask bench-infer`: one side-by-side run on this machine of this project (flex, in
//! f32, f16 and bf16, from checkpoint folders), a plain-PyTorch model of the same shapes (f32
//! and bf16) and llama.cpp on a GGUF of the same decoder (F32, F16, Q8_0, Q4_0), as one table
//! that names the CPU.
//!
//! Set-up happens once and is kept under `<target>/bench`: the random checkpoint folders, the
//! PyTorch venv (`xtask/bench/setup_venv.sh`), node-llama-cpp from `xtask/bench/llama`'s lock
//! file (prebuilt CPU binaries, nothing compiled), the llama.cpp source bundled in it and the
//! GGUF files `xtask/bench/llama/make_gguf.py` makes with its converter.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{json_of, run, tch, web};

/// What to measure.
pub struct Options {
    /// Decode steps per context (the first is a warm-up).
    pub decode_steps: usize,
    /// Leave out PyTorch.
    pub no_torch: bool,
    /// Leave out llama.cpp.
    pub no_llama: bool,
    /// Runs of every configuration, alternated; the table shows the median.
    pub repeats: usize,
}

/// One row of the table: a name and a command printing one JSON report.
struct Row {
    name: String,
    command: Box<dyn Fn() -> Command>,
    reports: Vec<Value>,
}

fn bench_dir() -> PathBuf {
    web::target_dir().join("bench")
}

/// The CPU's model name and its vector extensions, from `lscpu`.
fn cpu() -> String {
    let out = Command::new("lscpu").output().ok();
    let text = out.map_or_else(String::new, |o| {
        String::from_utf8_lossy(&o.stdout).to_string()
    });
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map_or_else(String::new, |(_, v)| v.trim().to_string())
    };
    let flags = field("Flags");
    let vector: Vec<&str> = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
    ]
    .into_iter()
    .filter(|f| flags.split_whitespace().any(|x| x == *f))
    .collect();
    format!(
        "{} ({} CPUs; {})",
        field("Model name"),
        field("CPU(s)"),
        vector.join(", ")
    )
}

/// A random Phantom-0.5B checkpoint stored as `dtype`, made once.
fn checkpoint(bin: &Path, dtype: &str) -> anyhow::Result<PathBuf> {
    let dir = bench_dir().join(format!("phantom-0.5b-{dtype}"));
    if !dir.join("config.json").is_file() {
        let mut init = Command::new(bin);
        init.args(["init", "--size", "0.5b", "--dtype", dtype, "--out"])
            .arg(&dir);
        run(
            init,
            &format!("writing a random 0.5B checkpoint in {dtype}"),
        )?;
    }
    Ok(dir)
}

/// `f32_dir` quantized as `scheme` by `phantom-infer quantize` (floats in bf16), made once
/// (and again over a folder written before the embeddings were quantized, whose config has no
/// `embeddings` entry).
fn quantized_checkpoint(bin: &Path, f32_dir: &Path, scheme: &str) -> anyhow::Result<PathBuf> {
    let dir = bench_dir().join(format!("phantom-0.5b-{scheme}"));
    let current = std::fs::read_to_string(dir.join("config.json"))
        .is_ok_and(|config| config.contains("\"embeddings\""));
    if !current {
        crate::quantize_folder(bin, f32_dir, &dir, scheme)?;
    }
    Ok(dir)
}

/// node-llama-cpp (prebuilt CPU libraries, from the lock file) and the GGUF files, made once.
fn llama_setup(python: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = web::root().join("xtask/bench/llama");
    if !root.join("node_modules/node-llama-cpp").is_dir() {
        let mut npm = Command::new("npm");
        npm.current_dir(&root).args([
            "ci",
            "--ignore-scripts",
            "--omit=optional",
            "--no-audit",
            "--no-fund",
        ]);
        run(npm, "installing node-llama-cpp (xtask/bench/llama)")?;
    }
    let source = bench_dir().join("llama.cpp");
    if !source.join("convert_hf_to_gguf.py").is_file() {
        let bundle = root.join("node_modules/node-llama-cpp/llama/gitRelease.bundle");
        let mut git = Command::new("git");
        git.args(["clone", "--quiet"]).arg(&bundle).arg(&source);
        run(git, "unpacking the llama.cpp source node-llama-cpp bundles")?;
    }
    let converter_ready = Command::new(python)
        .args(["-c", "import transformers, numpy, sentencepiece"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !converter_ready {
        let mut pip = Command::new(python);
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "transformers==4.57.6",
            "numpy",
            "sentencepiece",
        ]);
        run(pip, "installing the GGUF converter's Python packages")?;
    }
    let gguf = bench_dir().join("gguf");
    let lib = root.join("node_modules/@node-llama-cpp/linux-x64/bins/linux-x64");
    let mut make = Command::new(python);
    make.arg(root.join("make_gguf.py"))
        .arg("--llama-cpp")
        .arg(&source)
        .arg("--lib")
        .arg(&lib)
        .arg("--tokenizer")
        .arg(web::root().join("tests/fixtures/phantom-ref/tokenizer"))
        .arg("--out")
        .arg(&gguf);
    run(make, "making the GGUF files (once)")?;
    Ok((root.join("bench.mjs"), gguf))
}

/// Median of the values of `key` over the reports, with the range when they differ.
pub(crate) fn cell(reports: &[Value], key: &str, digits: usize) -> String {
    let mut values: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.get(key).and_then(Value::as_f64))
        .collect();
    if values.is_empty() {
        return "–".into();
    }
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    let (lo, hi) = (values[0], values[values.len() - 1]);
    if values.len() > 1 && hi > lo {
        format!("{median:.digits$} ({lo:.digits$}–{hi:.digits$})")
    } else {
        format!("{median:.digits$}")
    }
}

/// Runs the benchmark and prints the table.
pub fn bench_infer(options: &Options) -> anyhow::Result<()> {
    // The release build users run: the test profile optimises only the model crate, and the
    // generic tensor code instantiated in the binary's own crates would run slower.
    let mut build = crate::cargo();
    build.args(["build", "--release", "-p", "phantom-infer"]);
    run(build, "building phantom-infer (release)")?;
    let bin = web::target_dir().join("release/phantom-infer");
    std::fs::create_dir_all(bench_dir()).context("creating the bench folder")?;
    let f32_dir = checkpoint(&bin, "f32")?;
    let bf16_dir = checkpoint(&bin, "bf16")?;

    let steps = options.decode_steps.to_string();
    let mut rows: Vec<Row> = Vec::new();
    let q8_dir = quantized_checkpoint(&bin, &f32_dir, "q8")?;
    let q4_dir = quantized_checkpoint(&bin, &f32_dir, "q4")?;
    for (name, dtype, dir) in [
        ("f32", "f32", &f32_dir),
        ("f16", "f16", &bf16_dir),
        ("bf16", "bf16", &bf16_dir),
        ("q8", "bf16", &q8_dir),
        ("q4", "bf16", &q4_dir),
    ] {
        let (bin, dir, steps) = (bin.clone(), dir.clone(), steps.clone());
        rows.push(Row {
            name: format!("phantom-rs flex {name}"),
            command: Box::new(move || {
                let mut cmd = Command::new(&bin);
                cmd.args(["bench", "--device", "flex", "--ttft", "--dtype", dtype])
                    .arg("--model")
                    .arg(&dir)
                    .args(["--decode-steps", &steps]);
                cmd
            }),
            reports: Vec::new(),
        });
    }
    let python = if options.no_torch && options.no_llama {
        None
    } else {
        Some(tch::torch_python()?)
    };
    if let (false, Some(python)) = (options.no_torch, &python) {
        let script = web::root().join("xtask/bench/torch_phantom.py");
        for dtype in ["float32", "bfloat16"] {
            let (python, script, steps) = (python.clone(), script.clone(), steps.clone());
            rows.push(Row {
                name: format!("PyTorch {dtype}"),
                command: Box::new(move || {
                    let mut cmd = Command::new(&python);
                    cmd.arg(&script)
                        .args(["--size", "0.5b", "--ttft", "--dtype", dtype])
                        .args(["--decode-steps", &steps]);
                    cmd
                }),
                reports: Vec::new(),
            });
        }
    }
    if let (false, Some(python)) = (options.no_llama, &python) {
        let (script, gguf) = llama_setup(python)?;
        for quant in ["f32", "f16", "q8_0", "q4_0"] {
            let (script, steps) = (script.clone(), steps.clone());
            let file = gguf.join(format!("qwen2-0.5b-{quant}.gguf"));
            rows.push(Row {
                name: format!("llama.cpp {}", quant.to_uppercase()),
                command: Box::new(move || {
                    let mut cmd = Command::new("node");
                    // Every core, as the other rows use (node-llama-cpp's 0 does not mean that).
                    let threads = std::thread::available_parallelism().map_or(1, usize::from);
                    cmd.arg(&script).arg("--model").arg(&file).args([
                        "--threads",
                        &threads.to_string(),
                        "--decode-steps",
                        &steps,
                    ]);
                    cmd
                }),
                reports: Vec::new(),
            });
        }
    }

    for repeat in 0..options.repeats.max(1) {
        for row in &mut rows {
            let what = format!("{} (run {})", row.name, repeat + 1);
            row.reports.push(json_of((row.command)(), &what)?);
        }
    }

    let bandwidth = rows
        .iter()
        .flat_map(|r| &r.reports)
        .filter_map(|r| r.get("read_bandwidth_gbs").and_then(Value::as_f64))
        .fold(0.0f64, f64::max);
    let decoder_params = rows
        .iter()
        .flat_map(|r| &r.reports)
        .find_map(|r| r.get("params_decoder").and_then(Value::as_f64))
        .unwrap_or(0.0);
    println!(
        "\n### Phantom-0.5B shapes, CPU, {} run(s) alternated (median, range)\n\nMachine: {}\n",
        options.repeats.max(1),
        cpu()
    );
    println!(
        "| | load s | vision ms/tile | first token, 1 tile (s) | first token, 6 tiles (s) | \
         prefill tok/s (128) | prefill tok/s (1822) | decode tok/s @128 | decode tok/s @1024 | \
         peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let r = &row.reports;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            cell(r, "load_s", 2),
            cell(r, "vision_ms_per_tile_warm", 0),
            cell(r, "ttft_1_tile_s", 1),
            cell(r, "ttft_6_tile_s", 1),
            cell(r, "prefill_tokens_per_s", 0),
            cell(r, "prefill_tokens_per_s_1822", 0),
            cell(r, "decode_tokens_per_s_128", 1),
            cell(r, "decode_tokens_per_s_1024", 1),
            cell(r, "peak_rss_mb", 0),
        );
    }
    if bandwidth > 0.0 && decoder_params > 0.0 {
        println!(
            "\nDecode bound from the measured read bandwidth ({bandwidth:.1} GB/s, every core \
             reading a 1 GiB buffer): f32 {:.1} tok/s, f16/bf16 {:.1} tok/s ({:.0} M decoder \
             weights read per token).",
            bandwidth * 1e9 / (decoder_params * 4.0),
            bandwidth * 1e9 / (decoder_params * 2.0),
            decoder_params / 1e6
        );
    }
    if rows.is_empty() {
        bail!("nothing was measured");
    }
    Ok(())
}
