//! `phantom-train train`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use phantom_model::processor::tokenizer::Tokenizer;
use phantom_model::{LoadOptions, load_model};
use phantom_train::batch::TripleEncoder;
use phantom_train::data::{Dataset, FieldNames, read_triples};
use phantom_train::loader::TripleSource;
use phantom_train::stage::LoraSettings;
use phantom_train::trainer::{TrainConfig, export, train as run_training};
use phantom_train::{Objective, PreferenceLoss, Stage};

use super::RunArgs;

/// Arguments of `train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Phantom model folder to start from (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Training triples: JSON Lines, or a JSON array of objects.
    #[arg(long)]
    data: PathBuf,
    /// Held-out triples for the per-checkpoint metrics (default: 2% of the training triples,
    /// at most 64, drawn with --seed and left out of training).
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Folder that relative image paths start from (default: the data file's folder).
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Field holding the question.
    #[arg(long, default_value = "question")]
    field_question: String,
    /// Field holding the correct answer.
    #[arg(long, default_value = "chosen")]
    field_chosen: String,
    /// Field holding the wrong or vague answer.
    #[arg(long, default_value = "rejected")]
    field_rejected: String,
    /// Field holding the image path (optional per record).
    #[arg(long, default_value = "image")]
    field_image: String,
    /// Skip malformed records (they are counted) instead of stopping before training.
    #[arg(long)]
    skip_bad: bool,
    /// Run folder: checkpoints, metrics.jsonl, the exported model in `model/`.
    #[arg(long)]
    out: PathBuf,
    /// The paper's recipe: 1 trains the projector and phantom modules with PO (LLM and vision
    /// tower frozen); 2 unfreezes the LLM too and trains with plain SFT (the paper measured PO
    /// worse there; vision tower frozen unless --train-vision); all trains every weight.
    #[arg(long, default_value = "1")]
    stage: Stage,
    /// po, sft or simpo. Default: the paper's for the stage (po for 1 and all, sft for 2).
    #[arg(long)]
    objective: Option<Objective>,
    /// Reward scale β.
    #[arg(long, default_value_t = 2.0)]
    beta: f64,
    /// Reward margin γ.
    #[arg(long, default_value_t = 0.5)]
    gamma: f64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Final learning rate of the cosine.
    #[arg(long, default_value_t = 1e-6)]
    min_lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Triples per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches averaged per optimizer step.
    #[arg(long, default_value_t = 1)]
    accumulation: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Global gradient-norm clip (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Optimizer steps between checkpoints.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Checkpoints kept on disk.
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Continue the run in --out from its latest complete checkpoint.
    #[arg(long)]
    resume: bool,
    /// LoRA rank for stage 2 (off by default).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha (default: the rank).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Also train the vision tower in stage 2.
    #[arg(long)]
    train_vision: bool,
    /// Most tiles per image (1–6).
    #[arg(long, default_value_t = 6)]
    max_tiles: usize,
    /// Optimizer steps between progress lines.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    #[command(flatten)]
    run: RunArgs,
}

fn read(args: &TrainArgs, path: &Path, fields: &FieldNames) -> anyhow::Result<Dataset> {
    let set = read_triples(path, fields, args.image_root.as_deref(), args.skip_bad)?;
    if !set.skipped.is_empty() {
        eprintln!(
            "{}: skipped {} malformed record(s); first: {}",
            path.display(),
            set.skipped.len(),
            set.skipped[0]
        );
    }
    Ok(set)
}

/// Runs a fine-tuning job.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let fields = FieldNames {
        question: args.field_question.clone(),
        chosen: args.field_chosen.clone(),
        rejected: args.field_rejected.clone(),
        image: args.field_image.clone(),
    };
    let train_set = read(&args, &args.data, &fields)?;
    let valid_triples = match &args.valid {
        Some(path) => Some(read(&args, path, &fields)?.triples),
        None => None,
    };

    let devices = args.run.devices()?;
    let device = devices
        .first()
        .ok_or_else(|| anyhow::anyhow!("no device"))?;
    let tokenizer_path = args.model.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .with_context(|| format!("loading the tokenizer {}", tokenizer_path.display()))?;
    let model = load_model(&args.model, device, LoadOptions::default())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let encoder = TripleEncoder::new(&model, tokenizer, args.max_tiles)?;

    let source = |triples| TripleSource {
        triples,
        encoder: encoder.clone(),
    };
    let train_source = source(train_set.triples);
    let bad = train_source.check();
    if !bad.is_empty() {
        let shown: Vec<String> = bad
            .iter()
            .take(10)
            .map(|(_, reason)| format!("  {}: {reason}", args.data.display()))
            .collect();
        if !args.skip_bad {
            anyhow::bail!(
                "{} record(s) cannot be trained on:\n{}\n(pass --skip-bad to skip them)",
                bad.len(),
                shown.join("\n")
            );
        }
        eprintln!(
            "skipping {} record(s) that cannot be trained on:\n{}",
            bad.len(),
            shown.join("\n")
        );
    }
    let skip: std::collections::HashSet<usize> = bad.iter().map(|(i, _)| *i).collect();
    let kept = train_source
        .triples
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .map(|(_, t)| t.clone())
        .collect::<Vec<_>>();
    if kept.is_empty() {
        anyhow::bail!("no usable triple in {}", args.data.display());
    }
    // Held-out metrics never come from training data.
    let (kept, valid_triples) = match valid_triples {
        Some(valid) => (kept, valid),
        None => {
            let (train, held) = hold_out(kept, args.seed);
            eprintln!(
                "no --valid: {} of the {} triples are held out for the checkpoint metrics and \
                 not trained on",
                held.len(),
                train.len() + held.len()
            );
            (train, held)
        }
    };
    if kept.is_empty() || valid_triples.is_empty() {
        anyhow::bail!(
            "{} triple(s) cannot be split into training and validation; pass --valid FILE",
            kept.len() + valid_triples.len()
        );
    }
    let objective = args.objective.unwrap_or(match args.stage {
        Stage::Two => Objective::Sft,
        Stage::One | Stage::All => Objective::Po,
    });

    let config = TrainConfig {
        out_dir: args.out.clone(),
        stage: args.stage,
        train_vision: args.train_vision,
        lora: args.lora_rank.map(|rank| LoraSettings {
            rank,
            alpha: args.lora_alpha.unwrap_or(rank as f64),
        }),
        loss: PreferenceLoss {
            objective,
            beta: args.beta,
            gamma: args.gamma,
        },
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup,
        steps: args.steps,
        batch_size: args.batch_size,
        accumulation: args.accumulation,
        weight_decay: args.weight_decay,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        keep_checkpoints: args.keep_checkpoints,
        resume: args.resume,
        dashboard: args.run.dashboard(),
        log_every: args.log_every,
        label: format!("phantom-train stage {}", args.stage),
    };
    let outcome = run_training(
        model,
        Arc::new(source(kept)),
        Arc::new(source(valid_triples)),
        &config,
        &devices,
    )?;
    if outcome.interrupted {
        println!(
            "stopped; continue with the same command and --resume (checkpoints in {})",
            config.checkpoint_dir().display()
        );
        return Ok(());
    }
    let model_dir = config.model_dir();
    export(&outcome.model, &tokenizer_path, &model_dir)?;
    println!(
        "trained {} steps in {:.0} s; model written to {}",
        outcome.steps,
        outcome.seconds,
        model_dir.display()
    );
    Ok(())
}

/// Splits off 2% of `triples` (at most 64; one when there are at least two) for validation,
/// drawn with `seed`; the rest keep their order.
fn hold_out<T>(triples: Vec<T>, seed: u64) -> (Vec<T>, Vec<T>) {
    use rand::SeedableRng;
    use rand::seq::index::sample;
    let n = triples.len();
    let k = if n < 2 { 0 } else { (n / 50).clamp(1, 64) };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let held: std::collections::HashSet<usize> = sample(&mut rng, n, k).into_iter().collect();
    let (mut train, mut valid) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (i, t) in triples.into_iter().enumerate() {
        if held.contains(&i) {
            valid.push(t);
        } else {
            train.push(t);
        }
    }
    (train, valid)
}
