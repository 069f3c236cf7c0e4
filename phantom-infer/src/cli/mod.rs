//! The `phantom-infer` subcommands.

mod bench;
mod chat;
mod convert;
mod init;
mod preprocess;
mod quantize;
mod serve;
mod tokens;

use std::path::PathBuf;

use anyhow::Context;
use burn::prelude::Device;
use clap::{Args, Parser, Subcommand};
use phantom_model::PhantomModel;
use phantom_model::device::{DEVICE_NAMES, Precision, auto_precision, load_options, set_precision};
use phantom_model::quantize::Quantization;

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
    /// An OpenAI-compatible HTTP server (chat completions with images, streaming, batching)
    /// that also serves the web page.
    Serve(serve::ServeArgs),
    /// An image through the released tiling and normalisation → pixel_values.
    Preprocess(preprocess::PreprocessArgs),
    /// Speed and memory of a released size (random weights) on one backend, as JSON.
    Bench(bench::BenchArgs),
    /// Write a quantized copy of a model folder (8- or 4-bit linear weights) that every
    /// subcommand and the web page load like any other folder.
    Quantize(quantize::QuantizeArgs),
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
    /// Precision: auto (the checkpoint's own where the backend computes in it fast — bf16 for
    /// the released checkpoints on flex and libtorch — f32 otherwise), f32, f16 or bf16. On
    /// flex, f16 and bf16 keep the weights in half precision and compute in f32.
    #[arg(long, default_value = "auto")]
    pub dtype: DtypeChoice,
    /// Quantize the linear weights while loading: q8 or q4 (8- or 4-bit codes, one scale per
    /// 32 inputs). A folder written by `phantom-infer quantize` loads quantized without it.
    #[arg(long)]
    pub quantize: Option<Quantization>,
    /// No progress bar while loading.
    #[arg(long)]
    pub quiet_load: bool,
}

/// `--dtype`: a precision, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeChoice {
    /// The checkpoint's own precision where the backend computes in it, f32 otherwise.
    Auto,
    /// This precision.
    Fixed(Precision),
}

impl std::str::FromStr for DtypeChoice {
    type Err = phantom_model::PhantomError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            other => other.parse().map(Self::Fixed),
        }
    }
}

impl ModelArgs {
    /// The precision the model runs in on `device`.
    pub fn precision(&self, device: &Device) -> anyhow::Result<Precision> {
        Ok(match self.dtype {
            DtypeChoice::Fixed(p) => p,
            DtypeChoice::Auto => {
                let stored = phantom_model::weights::stored_dtype(&self.model)
                    .with_context(|| format!("reading {}", self.model.display()))?;
                auto_precision(device, stored)
            }
        })
    }

    /// Starts the device in the chosen precision and loads the model onto it, with a progress
    /// bar for checkpoints that take a while.
    pub fn load(&self) -> anyhow::Result<PhantomModel> {
        let mut device = phantom_model::device::device(self.device.as_deref())?;
        let precision = self.precision(&device)?;
        set_precision(&mut device, precision).map_err(|e| {
            anyhow::anyhow!(
                "--dtype {precision} on `{}`: {e}; use --dtype f32 or another device",
                self.device.as_deref().unwrap_or("auto")
            )
        })?;
        let options = load_options(&device, precision).quantized(self.quantize);
        let bar = indicatif::ProgressBar::hidden();
        let shown = std::cell::Cell::new(false);
        let start = std::time::Instant::now();
        let model = phantom_model::load_model_with_progress(
            &self.model,
            &device,
            options,
            |done, total| {
                // Only a load that takes a moment gets a bar.
                if !self.quiet_load && !shown.get() && start.elapsed().as_millis() > 300 {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "loading {bar:30} {bytes}/{total_bytes} {elapsed}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    shown.set(true);
                }
                bar.set_length(total);
                bar.set_position(done);
            },
        )
        .with_context(|| format!("loading {}", self.model.display()))?;
        bar.finish_and_clear();
        crate::allocator::running();
        let wanted = phantom_model::PhantomConfig::from_file(self.model.join("config.json"))
            .ok()
            .and_then(|c| c.quantization.map(|q| q.scheme))
            .or(self.quantize);
        if let Some(scheme) = wanted
            && model.config.quantization.is_none()
        {
            eprintln!(
                "note: `{}` has no quantized arithmetic; the {scheme} weights run dequantized to {precision}",
                self.device.as_deref().unwrap_or("this device")
            );
        }
        Ok(model)
    }
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Forward(args) => tokens::forward(args),
            Command::Generate(args) => tokens::generate(args),
            Command::Chat(args) => chat::chat(args),
            Command::Serve(args) => serve::serve(args),
            Command::Preprocess(args) => preprocess::preprocess(args),
            Command::Bench(args) => bench::bench(args),
            Command::Quantize(args) => quantize::quantize(args),
            Command::Init(args) => init::init(args),
            Command::ConvertTokenizer(args) => convert::convert(args),
        }
    }
}
