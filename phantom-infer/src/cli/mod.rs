//! The `phantom-infer` subcommands.

mod bench;
mod chat;
mod convert;
mod init;
mod preprocess;
mod tokens;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use phantom_model::device::{DEVICE_NAMES, Precision, device_with_precision};
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
    /// Ask about images: one-shot with --prompt, otherwise an interactive session.
    Chat(chat::ChatArgs),
    /// An image through the released tiling and normalisation → pixel_values.
    Preprocess(preprocess::PreprocessArgs),
    /// Speed and memory of a released size (random weights) on one backend, as JSON.
    Bench(bench::BenchArgs),
    /// Write a randomly initialised checkpoint of a released size in the official layout.
    Init(init::InitArgs),
    /// Convert a SentencePiece tokenizer.model (Phantom-1.8B/-7B) into tokenizer.json.
    ConvertTokenizer(convert::ConvertArgs),
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
    /// Precision the model computes in: f32, f16 or bf16 (half the memory; flex, tch, CUDA,
    /// and wgpu adapters with shader-f16 for f16).
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
}

impl ModelArgs {
    /// Starts the device in the chosen precision and loads the model onto it.
    pub fn load(&self) -> anyhow::Result<PhantomModel> {
        let device = device_with_precision(self.device.as_deref(), self.dtype)?;
        let options = LoadOptions {
            dtype: self.dtype.dtype(),
        };
        phantom_model::load_model(&self.model, &device, options)
            .with_context(|| format!("loading {}", self.model.display()))
    }
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Forward(args) => tokens::forward(args),
            Command::Generate(args) => tokens::generate(args),
            Command::Chat(args) => chat::chat(args),
            Command::Preprocess(args) => preprocess::preprocess(args),
            Command::Bench(args) => bench::bench(args),
            Command::Init(args) => init::init(args),
            Command::ConvertTokenizer(args) => convert::convert(args),
        }
    }
}
