//! `phantom-infer serve` driven over HTTP as clients drive it: the trained demo model answers a
//! picture sent as a data URL the way `phantom-infer chat` does, streamed and whole, alone and
//! in concurrent batches; bad requests get OpenAI-shaped errors and leave the server healthy;
//! SIGTERM stops it. (The official `openai` client and curl drive it in `cargo xtask
//! test-serve`.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

/// A running server, stopped when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let model = common::fixtures().join("demo_model");
        let mut child = Command::new(env!("CARGO_BIN_EXE_phantom-infer"))
            .args(["serve", "--port", "0", "--device", "flex", "--model"])
            .arg(&model)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the server starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server prints its address");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        Self { child, addr }
    }

    /// One HTTP/1.1 exchange: status and body.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut stream = TcpStream::connect(&self.addr).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        stream.write_all(head.as_bytes()).expect("writes");
        stream.write_all(body).expect("writes");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("reads");
        let text = String::from_utf8_lossy(&response).to_string();
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    }

    fn chat(&self, request: &Value) -> (u16, Value) {
        let (status, body) = self.request(
            "POST",
            "/v1/chat/completions",
            request.to_string().as_bytes(),
        );
        let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        (status, value)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of a chunked transfer.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

fn square_url() -> String {
    let png = std::fs::read(common::fixtures().join("demo_model/square.png")).expect("png");
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

fn question(stream: bool) -> Value {
    json!({
        "model": "demo",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": square_url()}},
            {"type": "text", "text": "What colour is the square?"}
        ]}],
        "max_tokens": 16,
        "stream": stream,
        "stream_options": {"include_usage": true}
    })
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn the_server_answers_like_the_chat_command() {
    let server = Server::start(&[]);
    let (status, body) = server.request("GET", "/health", b"");
    assert_eq!((status, body.contains("ok")), (200, true), "{body}");
    let (status, body) = server.request("GET", "/v1/models", b"");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(models["data"][0]["id"], "demo_model");

    // What the chat command answers.
    let out = common::ask_demo(&["--max-new-tokens", "16"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chat: Value = serde_json::from_slice(&out.stdout).expect("json");
    let want = chat["answer"].as_str().expect("answer").to_string();
    assert_eq!(want, "The square is red.");

    let (status, answer) = server.chat(&question(false));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let usage = &answer["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 16, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    // Streamed: a role chunk, content chunks, a finish chunk, the usage, then [DONE].
    let (status, body) = server.request(
        "POST",
        "/v1/chat/completions",
        question(true).to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let events = events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );

    // A stop sequence cuts the answer before it.
    let mut stopped = question(false);
    stopped["stop"] = json!(["is"]);
    let (_, answer) = server.chat(&stopped);
    assert_eq!(answer["choices"][0]["message"]["content"], "The square ");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    // A token budget cuts it too.
    let mut short = question(false);
    short["max_tokens"] = json!(2);
    let (_, answer) = server.chat(&short);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(answer["usage"]["completion_tokens"], 2);

    // Concurrent requests decode in one batch and answer alike.
    let answers: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let server = &server;
                s.spawn(move || server.chat(&question(false)).1)
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a thread"))
            .collect()
    });
    for answer in &answers {
        assert_eq!(answer["choices"][0]["message"]["content"], want.as_str());
    }
    let (_, metrics) = server.request("GET", "/metrics", b"");
    assert!(
        metrics.contains("phantom_requests_total{outcome=\"ok\"}"),
        "{metrics}"
    );
    let ok: u64 = metrics
        .lines()
        .find(|l| l.starts_with("phantom_requests_total{outcome=\"ok\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(ok >= 12, "{metrics}");
    // The picture went through the vision tower once; every other request found it cached.
    assert!(
        metrics.contains("phantom_vision_encodes_total{cached=\"true\"}"),
        "{metrics}"
    );
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() {
    let server = Server::start(&["--max-body-mib", "1"]);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid_json"),
        (
            json!({"messages": [{"role": "robot", "content": "hi"}]})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000_000})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]})
            .to_string()
            .into_bytes(),
            400,
            "invalid_value",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]})
            .to_string()
            .into_bytes(),
            400,
            "invalid_value",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]})
            .to_string()
            .into_bytes(),
            400,
            "invalid_value",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "num_beams": 100_000})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
        ),
        (vec![b'x'; 2 << 20], 413, "request_too_large"),
    ];
    for (body, status, code) in cases {
        let (got, text) = server.request("POST", "/v1/chat/completions", &body);
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(got, status, "{text}");
        assert_eq!(value["error"]["code"], code, "{text}");
        assert!(
            value["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(value["error"].get("type").is_some() && value["error"].get("param").is_some());
    }
    let (status, text) = server.request("GET", "/v1/nothing", b"");
    assert_eq!(status, 404, "{text}");
    // Still healthy and answering.
    let (status, _) = server.request("GET", "/health", b"");
    assert_eq!(status, 200);
    let (status, answer) = server.chat(&question(false));
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn sigterm_stops_the_server() {
    let mut server = Server::start(&["--shutdown-grace-s", "5"]);
    let (status, _) = server.request("GET", "/health", b"");
    assert_eq!(status, 200);
    let pid = server.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()));
    let start = std::time::Instant::now();
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            assert!(status.success() || status.code().is_some(), "{status:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the server did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A metric's value in the Prometheus text of `/metrics`.
fn metric(server: &Server, name: &str) -> Option<f64> {
    let (_, text) = server.request("GET", "/metrics", b"");
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    let server = Server::start(&[]);
    let mut long = question(true);
    long["max_tokens"] = json!(1900);
    long["ignore_eos"] = json!(true);
    let body = long.to_string();
    let mut stream = TcpStream::connect(&server.addr).expect("connects");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        server.addr,
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("writes");
    stream.write_all(body.as_bytes()).expect("writes");
    // Read until the answer has started, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"The") {
        let n = stream.read(&mut buf).expect("reads");
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    let cancelled = "phantom_requests_total{outcome=\"cancelled\"}";
    let start = std::time::Instant::now();
    loop {
        let done = metric(&server, cancelled) == Some(1.0)
            && metric(&server, "phantom_batch_size") == Some(0.0);
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the generation went on after the client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Far fewer decode steps than the 1,900 tokens asked for.
    let steps = metric(&server, "phantom_decode_steps_total").expect("steps");
    assert!(steps < 1800.0, "{steps} decode steps");
    let (status, answer) = server.chat(&question(false));
    assert_eq!(status, 200, "{answer}");
}
