//! `phantom-infer convert-tokenizer`: the SentencePiece `tokenizer.model` of the InternLM2 sizes
//! (Phantom-1.8B, -7B) → a `tokenizer.json` next to it, once.

use std::path::PathBuf;

use clap::Args;
use phantom_model::processor::sentencepiece::convert_file;

/// Arguments of `convert-tokenizer`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Model folder holding tokenizer.model (and optionally added_tokens.json,
    /// tokenizer_config.json).
    #[arg(long)]
    model: PathBuf,
    /// Replace an existing tokenizer.json.
    #[arg(long)]
    overwrite: bool,
}

/// `phantom-infer convert-tokenizer`.
pub fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let written = convert_file(&args.model, args.overwrite)?;
    eprintln!("wrote {}", written.display());
    Ok(())
}
