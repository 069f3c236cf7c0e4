//! `phantom-infer init`: a randomly initialised checkpoint of a released size in the official
//! layout, for trying the tools on the real shapes without downloading weights.

use std::path::PathBuf;

use clap::Args;
use phantom_model::PhantomModel;

/// Arguments of `init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Model size: 0.5b, 1.8b, 3.8b or 7b.
    #[arg(long, default_value = "0.5b")]
    size: String,
    /// Output folder (config.json + model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Split the weights into this many shards with an index, as the released 3.8B and 7B
    /// are (1 = a single model.safetensors).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Precision of the stored weights: f32, f16 or bf16 (the released checkpoints' own).
    #[arg(long, default_value = "f32")]
    dtype: phantom_model::device::Precision,
}

/// `phantom-infer init`.
pub fn init(args: InitArgs) -> anyhow::Result<()> {
    let config = phantom_model::presets::config(&args.size)?;
    let device = phantom_model::device::device(Some("flex"))
        .or_else(|_| phantom_model::device::device(None))?;
    let model = PhantomModel::new(config, &device);
    phantom_model::save_model_as(&model, &args.out, args.dtype.dtype())?;
    drop(model);
    let files = phantom_model::split_into_shards(&args.out, args.shards)?;
    eprintln!(
        "wrote a random {} checkpoint to {} ({} weight file(s))",
        args.size,
        args.out.display(),
        files.len()
    );
    Ok(())
}
