//! `phantom-infer chat`: ask a Phantom model about images, one-shot or interactively, with the
//! answer streamed as it is generated.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use phantom_infer::chat::TOKENIZER_FILE;
use phantom_infer::{Chat, GenerationConfig, Timings};
use phantom_model::processor::image::{ImageProcessor, RgbImage};
use phantom_model::processor::tokenizer::Tokenizer;

use super::ModelArgs;

/// Arguments of `chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An image to ask about (repeatable; PNG, JPEG, WebP, GIF or BMP).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The question; without it, an interactive session starts (empty line or EOF ends it).
    #[arg(long)]
    prompt: Option<String>,
    /// Tokenizer file (default: tokenizer.json in the model folder).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Most 448×448 tiles per image (1–6): fewer is faster, more sees finer detail.
    #[arg(long, default_value_t = 6)]
    max_tiles: usize,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens when sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Penalty for tokens already seen (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Beam search width (the paper evaluates with 3).
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Print one JSON object per answer instead of streamed text.
    #[arg(long)]
    json: bool,
    /// No progress bars or timings.
    #[arg(long)]
    quiet: bool,
}

fn spinner(quiet: bool, message: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(message.to_string());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// `phantom-infer chat`.
pub fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let processor = ImageProcessor::new(args.max_tiles)?;
    // Read the images first: a bad file should fail before minutes of weight loading.
    let images: Vec<RgbImage> = args
        .images
        .iter()
        .map(|p| processor.open(p))
        .collect::<Result<_, _>>()?;
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.model.join(TOKENIZER_FILE));
    if !tokenizer_path.exists() && args.model.model.join("tokenizer.model").exists() {
        anyhow::bail!(
            "{} has a SentencePiece tokenizer.model but no tokenizer.json; create it once with \
             `phantom-infer convert-tokenizer --model {}`",
            args.model.model.display(),
            args.model.model.display()
        );
    }
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .with_context(|| format!("loading the tokenizer {}", tokenizer_path.display()))?;

    let start = Instant::now();
    let mut model_args = args.model.clone();
    model_args.quiet_load |= args.quiet || args.json;
    let model = model_args.load()?;
    let load_time = start.elapsed();
    let mut chat = Chat::new(model, tokenizer)?;
    chat.inputs.images.max_tiles = processor.max_tiles;
    if !args.quiet {
        eprintln!(
            "loaded {} on {:?} in {:.1} s",
            args.model.model.display(),
            chat.model.device(),
            load_time.as_secs_f64()
        );
    }
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        num_beams: args.num_beams,
        stop_token_ids: Vec::new(),
    };
    config.validate()?;

    // The conversation keeps its KV cache between questions: a later turn costs only its own
    // tokens, and the pictures are encoded once.
    let mut conversation = chat.conversation(images);
    let mut ask = |question: String| -> anyhow::Result<()> {
        let bar = spinner(args.quiet || args.json, "reading the prompt");
        let mut first = true;
        let stdout = std::io::stdout();
        let (answer, generation) = conversation.ask(question, &config, |piece| {
            if first {
                bar.finish_and_clear();
                first = false;
            }
            if !args.json {
                let mut out = stdout.lock();
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
            ControlFlow::Continue(())
        })?;
        bar.finish_and_clear();
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "answer": answer,
                    "tokens": generation.sequences[0],
                    "timings": generation.timings.to_json(),
                })
            );
        } else {
            println!();
            if !args.quiet {
                eprintln!("{}", describe(&generation.timings));
            }
        }
        Ok(())
    };

    if let Some(prompt) = args.prompt.clone() {
        return ask(prompt);
    }
    let stdin = std::io::stdin();
    loop {
        if !args.quiet {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let question = line.trim();
        if question.is_empty() {
            break;
        }
        ask(question.to_string())?;
    }
    Ok(())
}

fn describe(t: &Timings) -> String {
    let mut parts = Vec::new();
    if t.tiles > 0 {
        parts.push(format!(
            "vision {} tile(s) in {:.0} ms ({:.0} ms/tile)",
            t.tiles,
            t.vision.as_secs_f64() * 1e3,
            t.vision.as_secs_f64() * 1e3 / t.tiles as f64
        ));
    }
    parts.push(format!(
        "prefill {} tokens in {:.0} ms ({:.1} tok/s)",
        t.prompt_tokens,
        t.prefill.as_secs_f64() * 1e3,
        t.prefill_tokens_per_s()
    ));
    parts.push(format!(
        "decode {} tokens in {:.0} ms ({:.1} tok/s)",
        t.decode_tokens,
        t.decode.as_secs_f64() * 1e3,
        t.decode_tokens_per_s()
    ));
    parts.join(" · ")
}
