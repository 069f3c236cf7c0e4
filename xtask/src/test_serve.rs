//! `cargo xtask test-serve`: `phantom-infer serve` with the trained demo model, driven by the
//! clients its users have — the official `openai` Python package (in a venv made once) and
//! curl — including a load test of concurrent streaming clients.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::server::Server;
use crate::web;

/// The `openai` release the test pins.
const OPENAI: &str = "openai==3.57.0";

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "120"])
        .args(args)
        .output()
        .context("running curl (install it: apt-get install curl)")?;
    if !out.status.success() {
        bail!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Runs the clients against a fresh server and closes with a pass/fail count.
pub fn test_serve() -> anyhow::Result<()> {
    crate::build_bins("building phantom-infer")?;
    let python = crate::python_with("openai-venv", OPENAI, "openai")?;
    let root = web::root();
    let model = root.join("tests/fixtures/demo_model");
    let image = model.join("square.png");
    let bin = web::target_dir().join("debug/phantom-infer");
    let server = Server::start(&bin, &model, None, None, 0)?;
    let addr = server.addr.clone();
    eprintln!("xtask: server at {addr}");

    let (mut passed, mut failed) = (0usize, Vec::new());
    let mut check = |name: &str, ok: bool, detail: &str| {
        eprintln!("curl: {} {name}", if ok { "ok  " } else { "FAIL" });
        if ok {
            passed += 1;
        } else {
            failed.push(format!("{name}: {detail}"));
        }
    };
    let expect = "The square is red.";
    let health = curl(&[&format!("http://{addr}/health")])?;
    check("health", health.contains("ok"), &health);
    let body = request_body(&image, false)?;
    let body_path = web::target_dir().join("serve-request.json");
    std::fs::write(&body_path, &body)?;
    let data = format!("@{}", body_path.display());
    let url = format!("http://{addr}/v1/chat/completions");
    let answer = curl(&["-H", "Content-Type: application/json", "-d", &data, &url])?;
    let value: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
    check(
        "answer",
        value["choices"][0]["message"]["content"] == expect,
        &answer,
    );
    std::fs::write(&body_path, request_body(&image, true)?)?;
    let streamed = curl(&[
        "-N",
        "-H",
        "Content-Type: application/json",
        "-d",
        &data,
        &url,
    ])?;
    let text: String = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    check(
        "streamed answer",
        text == expect && streamed.trim_end().ends_with("data: [DONE]"),
        &streamed,
    );
    let refused = curl(&["-H", "Content-Type: application/json", "-d", "{", &url])?;
    check(
        "malformed JSON refused",
        refused.contains("\"error\""),
        &refused,
    );

    let out = Command::new(&python)
        .arg(root.join("xtask/serve/openai_client.py"))
        .arg("--base-url")
        .arg(format!("http://{addr}/v1"))
        .arg("--image")
        .arg(&image)
        .args([
            "--question",
            "What colour is the square?",
            "--expect",
            expect,
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running the openai client")?;
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    let client_line = report
        .lines()
        .find_map(|l| l.strip_prefix("openai: "))
        .unwrap_or("0 passed, 1 failed");
    let count = |word: &str| -> usize {
        client_line
            .split(',')
            .find(|p| p.contains(word))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    passed += count("passed");
    if count("failed") > 0 || !out.status.success() {
        failed.push(format!("the openai client: {client_line}"));
    }
    drop(server);
    for f in &failed {
        eprintln!("  {f}");
    }
    println!("test-serve: {passed} passed, {} failed", failed.len());
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("the server failed {} check(s)", failed.len())
    }
}

fn request_body(image: &Path, stream: bool) -> anyhow::Result<String> {
    use base64::Engine as _;
    let png = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    Ok(serde_json::json!({
        "model": "demo",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What colour is the square?"}
        ]}],
        "max_tokens": 16,
        "stream": stream,
    })
    .to_string())
}
