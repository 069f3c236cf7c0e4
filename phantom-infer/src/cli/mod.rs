//! The `phantom-infer` subcommands.

mod tokens;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use phantom_model::device::DEVICE_NAMES;
use phantom_model::{LoadOptions, PhantomModel};

/// Run Phantom vision-language models (0.5B–7B) on any Burn backend.
#[derive(Parser, Debug)]
#[command(name = "phantom-infer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Logits of a token batch: inputs.safetensors → logits [B, T, V] in out.safetensors.
    Forward(tokens::ForwardArgs),
    /// Greedy continuation of a token batch with the KV cache; prints JSON on stdout.
    Generate(tokens::GenerateArgs),
}

/// Options every model-running subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder: config.json and model.safetensors (or shards with an index).
    #[arg(long)]
    pub model: PathBuf,
    /// Backend: the best compiled one by default.
    #[arg(long, help = format!("Backend to run on: {DEVICE_NAMES} (default: best compiled)"))]
    pub device: Option<String>,
}

impl ModelArgs {
    /// Starts the device and loads the model onto it.
    pub fn load(&self) -> anyhow::Result<PhantomModel> {
        let device = phantom_model::device::device(self.device.as_deref())?;
        phantom_model::load_model(&self.model, &device, LoadOptions::default())
            .with_context(|| format!("loading {}", self.model.display()))
    }
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Forward(args) => tokens::forward(args),
            Command::Generate(args) => tokens::generate(args),
        }
    }
}
