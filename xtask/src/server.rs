//! `phantom-infer serve` as a child process of a task: the API and the web page from one
//! process, stopped with SIGTERM when the task is done.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// A running server.
pub struct Server {
    child: Child,
    /// `host:port` it listens on.
    pub addr: String,
}

impl Server {
    /// Starts `bin serve` for `model` on 127.0.0.1:`port` (0: any free port), serving the page
    /// from `web` when given.
    pub fn start(
        bin: &Path,
        model: &Path,
        tokenizer: Option<&Path>,
        web: Option<&Path>,
        port: u16,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--device", "flex", "--port", &port.to_string()])
            .arg("--model")
            .arg(model)
            .stdout(Stdio::piped());
        if let Some(t) = tokenizer {
            cmd.arg("--tokenizer").arg(t);
        }
        if let Some(w) = web {
            cmd.arg("--web").arg(w);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            bail!("phantom-infer serve did not start (it printed {line:?})");
        };
        Ok(Self {
            addr: addr.to_string(),
            child,
        })
    }

    /// Waits until the server exits (Ctrl-C reaches it too).
    pub fn wait(mut self) -> anyhow::Result<()> {
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
