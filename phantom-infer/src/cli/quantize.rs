//! `phantom-infer quantize`: a model folder → a folder with 8- or 4-bit linear weights and
//! token embeddings
//! (`phantom_model::quantize` describes the layout) and every other file copied, which every
//! subcommand and the web page load like any other folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::DType;
use clap::Args;
use phantom_model::LoadOptions;
use phantom_model::device::Precision;
use phantom_model::quantize::{Quantization, QuantizationConfig};

/// Arguments of `quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The model folder to quantize (config.json, safetensors, tokenizer files).
    #[arg(long)]
    model: PathBuf,
    /// Where to write the quantized folder.
    #[arg(long)]
    out: PathBuf,
    /// q8 (8-bit codes) or q4 (4-bit codes), one f16 scale per 32 inputs.
    #[arg(long)]
    scheme: Quantization,
    /// Quantize an untied LM head too (smaller, a little less exact).
    #[arg(long)]
    lm_head: bool,
    /// Keep the token embeddings (and a head tied to them) in float: larger and slower to
    /// decode, a little more exact.
    #[arg(long)]
    float_embeddings: bool,
    /// Precision of what stays in float (norms, biases, phantom gates, and the embeddings
    /// with --float-embeddings).
    #[arg(long, default_value = "bf16")]
    float_dtype: Precision,
    /// Replace the model files of an existing folder at --out.
    #[arg(long)]
    overwrite: bool,
}

/// Files of a model folder that the quantized folder replaces rather than copies.
fn is_weights_or_config(name: &str) -> bool {
    name == "config.json"
        || name == "model.safetensors.index.json"
        || (name.starts_with("model") && name.ends_with(".safetensors"))
}

/// Bytes of the weight files of `dir`.
fn weight_bytes(dir: &Path) -> anyhow::Result<u64> {
    let files = phantom_model::weights::weight_files(dir)?;
    Ok(files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum())
}

/// `phantom-infer quantize`.
pub fn quantize(args: QuantizeArgs) -> anyhow::Result<()> {
    let source = args
        .model
        .canonicalize()
        .with_context(|| format!("{}", args.model.display()))?;
    if args.out.exists() {
        let out = args.out.canonicalize()?;
        if out == source {
            bail!("--out must be another folder than --model");
        }
        if out.join("config.json").exists() && !args.overwrite {
            bail!(
                "{} already holds a model; pass --overwrite to replace it",
                args.out.display()
            );
        }
    }
    // Quantized on flex, whose quantized tensors the writer reads back.
    let device = phantom_model::device::device(Some("flex"))
        .context("quantizing needs the flex backend (build with the `flex` feature)")?;
    let config = QuantizationConfig::new(args.scheme)
        .with_lm_head(args.lm_head)
        .with_embeddings(!args.float_embeddings);
    let options = LoadOptions {
        quantize: Some(config),
        ..LoadOptions::default()
    };
    let start = std::time::Instant::now();
    let model = phantom_model::load_model(&args.model, &device, options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    if model.config.quantization.map(|q| q.scheme) != Some(args.scheme) {
        bail!("the flex backend did not keep the weights quantized");
    }
    let float_dtype: DType = args.float_dtype.dtype();
    phantom_model::save_model_as(&model, &args.out, float_dtype)
        .with_context(|| format!("writing {}", args.out.display()))?;
    for entry in std::fs::read_dir(&args.model)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || is_weights_or_config(name) || !entry.file_type()?.is_file() {
            continue;
        }
        std::fs::copy(entry.path(), args.out.join(name))
            .with_context(|| format!("copying {name}"))?;
    }
    let before = weight_bytes(&args.model)?;
    let after = weight_bytes(&args.out)?;
    eprintln!(
        "wrote {} ({}, floats in {}): weights {:.1} MiB, {:.0}% of {:.1} MiB, in {:.1} s",
        args.out.display(),
        args.scheme,
        args.float_dtype,
        after as f64 / (1 << 20) as f64,
        100.0 * after as f64 / before.max(1) as f64,
        before as f64 / (1 << 20) as f64,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
