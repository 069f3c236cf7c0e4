//! Token-level subcommands: `forward` and `generate`, for checking the port against the
//! PyTorch implementation tensor for tensor.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context;
use burn::prelude::*;
use clap::Args;
use phantom_infer::io::{InputsFile, read_inputs, write_f32};
use phantom_infer::{GenerationConfig, generate as run_generation};
use phantom_model::PhantomModel;

use super::ModelArgs;

/// Arguments of `forward`.
#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// input_ids (i64 [B,T], left-padded), attention_mask, optional pixel_values [N,3,448,448].
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `logits` (f32 [B,T,V]).
    #[arg(long)]
    out: PathBuf,
}

/// Arguments of `generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// input_ids (i64 [B,T], left-padded), attention_mask, optional pixel_values.
    #[arg(long)]
    inputs: PathBuf,
    /// Most new tokens per row.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
}

fn pixels(model: &PhantomModel, file: &InputsFile) -> Option<Tensor<4>> {
    file.pixel_values
        .as_ref()
        .map(|p| Tensor::from_data(TensorData::new(p.data.clone(), p.shape), &model.device()))
}

/// `phantom-infer forward`.
pub fn forward(args: ForwardArgs) -> anyhow::Result<()> {
    let file = read_inputs(&args.inputs)?;
    let model = args.model.load()?;
    let logits = model.forward(&file.input, pixels(&model, &file))?;
    let shape = logits.dims().to_vec();
    let data = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading logits back: {e:?}"))?;
    write_f32(&args.out, &[("logits", shape, data)])
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

/// `phantom-infer generate`.
pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let file = read_inputs(&args.inputs)?;
    let model = args.model.load()?;
    let config = GenerationConfig::greedy(args.max_new_tokens, model.config.eos_token_ids.clone());
    let out = run_generation(&model, &file.input, pixels(&model, &file), &config, |_| {
        ControlFlow::Continue(())
    })?;
    println!("{}", serde_json::json!({ "sequences": out.sequences }));
    Ok(())
}
