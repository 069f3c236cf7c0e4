//! `phantom-train demo`.

use std::path::PathBuf;

use clap::Args;
use phantom_train::demo::shapes::QuestionKind;
use phantom_train::demo::{DemoOptions, evaluate_folder, run};

use super::RunArgs;

/// Arguments of `demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder (data, tokenizer, runs, model, report.json).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Also train SFT-only and plain-attention variants at equal steps, each over several seeds,
    /// and print mean ± std per variant with what the differences say.
    #[arg(long)]
    ablation: bool,
    /// Optimizer steps per variant.
    #[arg(long, default_value_t = DemoOptions::default().steps)]
    steps: usize,
    /// Triples per step.
    #[arg(long, default_value_t = DemoOptions::default().batch_size)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = DemoOptions::default().lr)]
    lr: f64,
    /// Phantom weight η of the phantom variants.
    #[arg(long, default_value_t = DemoOptions::default().eta)]
    eta: f64,
    /// Seed of data, weights and order.
    #[arg(long, default_value_t = DemoOptions::default().seed)]
    seed: u64,
    /// Runs per variant (seeds `--seed`, `--seed + 1`, …); default 3 with --ablation, else 1.
    #[arg(long)]
    seeds: Option<usize>,
    /// Training triples.
    #[arg(long, default_value_t = DemoOptions::default().train_size)]
    train_size: usize,
    /// Held-out triples.
    #[arg(long, default_value_t = DemoOptions::default().eval_size)]
    eval_size: usize,
    /// Question kinds to ask, comma-separated: colour, shape, count, position (default: all).
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Train nothing: measure the held-out accuracy of an exported demo model folder (e.g.
    /// runs/demo/model) on the held-out triples of --seed, --eval-size and --kinds.
    #[arg(long, value_name = "MODEL_DIR")]
    evaluate: Option<PathBuf>,
    /// With --evaluate: quantize the model's linear weights while loading (q8 or q4).
    #[arg(long, requires = "evaluate")]
    quantize: Option<phantom_model::quantize::Quantization>,
    #[command(flatten)]
    run: RunArgs,
}

/// Runs the demo.
pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let devices = args.run.devices()?;
    if devices.len() > 1 {
        anyhow::bail!(
            "the demo trains on one device, and {} were given with --device; pass one (the \
             `train` command spreads a run over several)",
            devices.len()
        );
    }
    let device = devices
        .first()
        .ok_or_else(|| anyhow::anyhow!("no device"))?;
    let kinds = args
        .kinds
        .iter()
        .map(|name| {
            QuestionKind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown question kind `{name}` (expected colour, shape, count or position)"
                    )
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.steps < 2 {
        anyhow::bail!("--steps must be at least 2");
    }
    let options = DemoOptions {
        out_dir: args.out,
        ablation: args.ablation,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        eta: args.eta,
        seed: args.seed,
        seeds: args
            .seeds
            .unwrap_or(if args.ablation { 3 } else { 1 })
            .max(1),
        train_size: args.train_size,
        eval_size: args.eval_size,
        kinds,
        dashboard: args.run.dashboard(),
    };
    if let Some(dir) = &args.evaluate {
        let load = phantom_model::LoadOptions::default().quantized(args.quantize);
        let (accuracy, by_kind) = evaluate_folder(&options, device, dir, load)?;
        let kinds: Vec<String> = by_kind
            .iter()
            .map(|(kind, a)| format!("{kind} {:.1}%", a * 100.0))
            .collect();
        println!(
            "{}{}: held-out accuracy {:.1}% ({} questions; {})",
            dir.display(),
            args.quantize.map(|q| format!(" ({q})")).unwrap_or_default(),
            accuracy * 100.0,
            options.eval_size,
            kinds.join(", ")
        );
        return Ok(());
    }
    let report = run(&options, device)?;
    println!("report: {}", options.out_dir.join("report.json").display());
    let _ = report;
    Ok(())
}
