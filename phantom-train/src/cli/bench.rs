//! `phantom-train bench`: the cost of one training step (forward, backward, AdamW) of a
//! released size with random weights, for PO against SFT in stage 1 and stage 2.
//!
//! Each configuration runs in a fresh process, so that its peak resident memory is its own.

use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use burn::optim::AdamWConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::train::TrainStep;
use clap::Args;
use phantom_model::PhantomModel;
use phantom_model::processor::image::PixelValues;
use phantom_train::batch::{PreferenceBatch, PreferenceItem};
use phantom_train::stage::{prepare, with_autodiff};
use phantom_train::step::{PoModel, StepSettings};
use phantom_train::{Objective, PreferenceLoss, Stage};
use serde_json::{Value, json};

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Released size whose shapes are used (random weights), or `demo` for the demo's model.
    #[arg(long, default_value = "0.5b")]
    size: String,
    /// Backend (default: the best compiled).
    #[arg(long)]
    device: Option<String>,
    /// Measure only this stage (default: 1 and 2, each in its own process).
    #[arg(long)]
    stage: Option<Stage>,
    /// Measure only this objective (default: sft and po).
    #[arg(long)]
    objective: Option<Objective>,
    /// Timed optimizer steps (after one untimed).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Triples per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Tiles of each triple's picture (256 prompt tokens each).
    #[arg(long, default_value_t = 1)]
    tiles: usize,
    /// Tokens of each answer.
    #[arg(long, default_value_t = 16)]
    answer_len: usize,
}

/// Runs the benchmark and prints a table (or, for one configuration, one JSON line).
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let (Some(stage), Some(objective)) = (args.stage, args.objective) {
        let report = measure(&args, stage, objective)?;
        println!("{report}");
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let stages = args.stage.map_or(vec![Stage::One, Stage::Two], |s| vec![s]);
    let objectives = args
        .objective
        .map_or(vec![Objective::Sft, Objective::Po], |o| vec![o]);
    println!(
        "| size | stage | objective | tokens/step | step s | tokens/s | peak RSS MiB | vs SFT |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for stage in stages {
        let mut sft_seconds = None;
        for &objective in &objectives {
            let mut cmd = Command::new(&exe);
            cmd.args(["bench", "--size", &args.size])
                .args(["--stage", &stage.to_string()])
                .args(["--objective", objective.name()])
                .args(["--steps", &args.steps.to_string()])
                .args(["--batch-size", &args.batch_size.to_string()])
                .args(["--tiles", &args.tiles.to_string()])
                .args(["--answer-len", &args.answer_len.to_string()]);
            if let Some(d) = &args.device {
                cmd.args(["--device", d]);
            }
            let out = cmd.output().context("running a benchmark configuration")?;
            if !out.status.success() {
                anyhow::bail!(
                    "stage {stage}, {}: {}",
                    objective.name(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let report: Value = serde_json::from_str(text.trim())
                .with_context(|| format!("reading the report {text}"))?;
            let seconds = report["step_s"].as_f64().unwrap_or(f64::NAN);
            if objective == Objective::Sft {
                sft_seconds = Some(seconds);
            }
            let ratio =
                sft_seconds.map_or_else(|| "–".to_string(), |s| format!("{:.2}x", seconds / s));
            println!(
                "| {} | {stage} | {} | {} | {seconds:.2} | {:.1} | {:.0} | {ratio} |",
                args.size,
                objective.name(),
                report["tokens_per_step"],
                report["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                report["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    Ok(())
}

/// One configuration: builds the model, runs an untimed step, then times `args.steps`.
fn measure(args: &BenchArgs, stage: Stage, objective: Objective) -> anyhow::Result<Value> {
    let device = phantom_model::device::device(args.device.as_deref())?;
    let config = if args.size == "demo" {
        demo_config()?
    } else {
        phantom_model::presets::config(&args.size)?
    };
    let model = PhantomModel::new(config, &device);
    let batch = random_batch(&model, args)?;
    let model = prepare(with_autodiff(model), stage, false, None)?;
    let loss = PreferenceLoss {
        objective,
        ..PreferenceLoss::default()
    };
    let mut po = PoModel::new(model, StepSettings::new(loss, 1, Some(1.0)));
    let mut optim = AdamWConfig::new().init();
    let mut timed = Vec::new();
    for step in 0..=args.steps {
        let start = Instant::now();
        let out = TrainStep::step(&po, batch.clone());
        if !out.item.loss.is_finite() {
            anyhow::bail!("the loss is {}", out.item.loss);
        }
        po = po.optimize(&mut optim, ModuleLearningRate::from(1e-5), out.grads);
        if step > 0 {
            timed.push(start.elapsed().as_secs_f64());
        }
    }
    let step_s = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
    let tokens = batch.tokens(objective.uses_rejected());
    Ok(json!({
        "size": args.size,
        "device": format!("{device:?}"),
        "stage": stage.to_string(),
        "objective": objective.name(),
        "batch_size": args.batch_size,
        "tiles": args.tiles,
        "tokens_per_step": tokens,
        "step_s": step_s,
        "tokens_per_s": tokens as f64 / step_s,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// The demo's model, with a tokenizer trained on demo texts as the demo does.
fn demo_config() -> anyhow::Result<phantom_model::PhantomConfig> {
    use phantom_train::demo;
    let samples = demo::shapes::generate(200, 7, demo::model::IMAGE_SIZE as u32);
    let trained = demo::tokenizer::train_tokenizer(&demo::tokenizer_corpus(&samples), 512)
        .map_err(|e| anyhow::anyhow!("training the demo tokenizer: {e}"))?;
    let dir = std::env::temp_dir().join(format!("phantom-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tokenizer.json");
    demo::tokenizer::save(&trained, &path)
        .map_err(|e| anyhow::anyhow!("saving the demo tokenizer: {e}"))?;
    let tokenizer = phantom_model::processor::tokenizer::Tokenizer::from_file(&path)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(demo::model::config(&tokenizer, 1.0)?)
}

/// Triples of the benchmark's shape: a question about a picture (its vision tokens plus about
/// 30 of text) and two answers, with random ids and pixels.
fn random_batch(model: &PhantomModel, args: &BenchArgs) -> anyhow::Result<PreferenceBatch> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let vocab = model.config.llm.vocab_size as u32;
    let image = model.config.image_token_index;
    let side = model.config.vision.image_size;
    let mut text = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                loop {
                    let id = rng.random_range(0..vocab.min(100_000));
                    // Any id but the picture placeholder.
                    if id != image {
                        break id;
                    }
                }
            })
            .collect()
    };
    let mut items = Vec::with_capacity(args.batch_size);
    for _ in 0..args.batch_size {
        let mut prompt = text(6);
        prompt.extend(std::iter::repeat_n(
            image,
            args.tiles * model.config.tokens_per_tile(),
        ));
        prompt.extend(text(24));
        let pixels = PixelValues {
            data: (0..args.tiles * 3 * side * side)
                .map(|i| ((i % 255) as f32 / 127.5) - 1.0)
                .collect(),
            num_tiles: args.tiles,
            tile_size: side,
        };
        items.push(PreferenceItem {
            prompt,
            chosen: text(args.answer_len),
            rejected: text(args.answer_len),
            pixels: Some(pixels),
        });
    }
    Ok(PreferenceBatch { items })
}

/// Peak resident memory of this process so far, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
