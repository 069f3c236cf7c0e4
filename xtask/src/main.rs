//! `cargo xtask …`: the project's tasks in one place.

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
}

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

fn main() -> anyhow::Result<()> {
    match Xtask::parse().task {
        Task::Test { no_wgpu } => {
            // One build with every CPU backend (and wgpu) so that the parity tests run on each
            // of them; features unify across the workspace, so burn compiles once.
            let features = if no_wgpu {
                "phantom-tests/ndarray"
            } else {
                "phantom-tests/ndarray,phantom-tests/wgpu"
            };
            let mut test = cargo();
            test.args(["test", "--workspace", "--features", features]);
            run(test, &format!("cargo test --workspace --features {features}"))?;
            Ok(())
        }
    }
}
