//! A small static file server for the web page: the page's folder at `/`, a model folder at
//! `/model/`, single files wherever they are mapped. Loopback only; GET and HEAD.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

/// What the server answers with.
#[derive(Clone, Debug, Default)]
pub struct Site {
    /// URL prefix (starting and ending with `/`) → folder.
    folders: Vec<(String, PathBuf)>,
    /// Exact URL path → file; wins over the folders.
    files: Vec<(String, PathBuf)>,
}

impl Site {
    /// Serves `dir` under `prefix` (`/` or `/name/`).
    pub fn folder(mut self, prefix: &str, dir: impl Into<PathBuf>) -> Self {
        self.folders.push((prefix.to_string(), dir.into()));
        // Longest prefix first, so `/model/` wins over `/`.
        self.folders
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        self
    }

    /// Serves `file` at exactly `path`.
    pub fn file(mut self, path: &str, file: impl Into<PathBuf>) -> Self {
        self.files.push((path.to_string(), file.into()));
        self
    }

    /// The file for a URL path, refusing anything that climbs out of its folder.
    fn resolve(&self, path: &str) -> Option<PathBuf> {
        if let Some((_, file)) = self.files.iter().find(|(p, _)| p == path) {
            return Some(file.clone());
        }
        let (prefix, dir) = self
            .folders
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))?;
        let rest = Path::new(&path[prefix.len()..]);
        if rest
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return None;
        }
        let mut full = dir.join(rest);
        if full.is_dir() {
            full.push("index.html");
        }
        full.is_file().then_some(full)
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        // `WebAssembly.instantiateStreaming` insists on this type.
        "wasm" => "application/wasm",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// Decodes `%XX` escapes of a URL path.
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)
}

fn handle(mut stream: TcpStream, site: &Site) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Drain the header lines; nothing in them changes the answer.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut words = request.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
        );
    }
    let path = percent_decode(target.split(['?', '#']).next().unwrap_or("/"));
    let Some(file) = site.resolve(&path) else {
        return respond(&mut stream, "404 Not Found", "text/plain", b"not found\n");
    };
    let mut f = std::fs::File::open(&file)?;
    let len = f.metadata()?.len();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {len}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        content_type(&file)
    )?;
    if method == "GET" {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n])?;
        }
    }
    stream.flush()
}

/// Binds `127.0.0.1:port` (0 picks a free port) and serves `site` from background threads;
/// returns the address.
pub fn start(site: Site, port: u16) -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let addr = listener.local_addr()?;
    let site = Arc::new(site);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let site = site.clone();
            std::thread::spawn(move || {
                // A browser dropping a connection is not the server's problem.
                let _ = handle(stream, &site);
            });
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_their_folders_only() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let site = Site::default()
            .folder("/", root.join("phantom-wasm/web"))
            .folder("/model/", root.join("tests/fixtures/phantom-ref/tiny_tied"))
            .file(
                "/model/tokenizer.json",
                root.join("tests/fixtures/toy_tokenizer/tokenizer.json"),
            );
        assert!(site.resolve("/").unwrap().ends_with("web/index.html"));
        assert!(
            site.resolve("/model/config.json")
                .unwrap()
                .ends_with("tiny_tied/config.json")
        );
        assert!(
            site.resolve("/model/tokenizer.json")
                .unwrap()
                .ends_with("toy_tokenizer/tokenizer.json")
        );
        assert_eq!(site.resolve("/model/../../README.md"), None);
        assert_eq!(site.resolve("/nothing.here"), None);
        assert_eq!(percent_decode("/a%20b%2"), "/a b%2");
    }
}
