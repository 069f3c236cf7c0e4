//! The `phantom-train` subcommands.

mod bench;
mod demo;
mod train;

use clap::{Args, Parser, Subcommand};
use phantom_model::device::DEVICE_NAMES;
use phantom_train::Dashboard;

/// Train Phantom vision-language models with Phantom Optimization on any Burn backend.
#[derive(Parser, Debug)]
#[command(name = "phantom-train", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Train a small Phantom from scratch on generated pictures of shapes and report its
    /// held-out accuracy (with --ablation, against SFT-only and plain-attention variants).
    Demo(demo::DemoArgs),
    /// Fine-tune a Phantom checkpoint on preference triples (JSON Lines or a JSON array).
    Train(train::TrainArgs),
    /// Time one training step (forward, backward, AdamW) of a released size with random
    /// weights: PO against SFT, in stage 1 and stage 2, with peak memory.
    Bench(bench::BenchArgs),
}

/// Device and display options shared by the subcommands.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Backend; repeat for data-parallel training on several devices.
    #[arg(long, help = format!("Backend to train on: {DEVICE_NAMES} (default: best compiled); repeat for several devices"))]
    pub device: Vec<String>,
    /// Print progress lines even on a terminal, instead of Burn's dashboard.
    #[arg(long, conflicts_with = "quiet")]
    pub plain: bool,
    /// Print nothing but the results.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    /// The display mode.
    pub fn dashboard(&self) -> Dashboard {
        if self.quiet {
            Dashboard::Quiet
        } else if self.plain {
            Dashboard::Plain
        } else {
            Dashboard::Auto
        }
    }

    /// Starts the devices.
    pub fn devices(&self) -> anyhow::Result<Vec<burn::prelude::Device>> {
        if self.device.is_empty() {
            return Ok(vec![phantom_model::device::device(None)?]);
        }
        self.device
            .iter()
            .map(|d| Ok(phantom_model::device::device(Some(d))?))
            .collect()
    }
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Demo(args) => demo::demo(args),
            Command::Train(args) => train::train(args),
            Command::Bench(args) => bench::bench(args),
        }
    }
}
