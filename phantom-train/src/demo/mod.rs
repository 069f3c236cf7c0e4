//! The built-in demo: generate Phantom triples about coloured shapes, train a tokenizer and a
//! small Phantom from scratch with Phantom Optimization, measure held-out accuracy (optionally
//! against the ablations), export the model and answer a question with it.

pub mod model;
pub mod shapes;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;
use phantom_infer::chat::Chat;
use phantom_infer::generate::GenerationConfig;
use phantom_model::PhantomModel;
use phantom_model::processor::prompt::Turn;
use phantom_model::processor::tokenizer::Tokenizer;
use serde::Serialize;

use crate::batch::TripleEncoder;
use crate::data::{FieldNames, read_triples};
use crate::error::{Result, TrainError};
use crate::loader::TripleSource;
use crate::loss::{Objective, PreferenceLoss};
use crate::stage::Stage;
use crate::trainer::{Dashboard, TrainConfig, export, train};
use shapes::{QuestionKind, ShapeSample};

/// Settings of the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Output folder: data, tokenizer, runs, the exported model, `report.json`.
    pub out_dir: PathBuf,
    /// Also train the ablations: SFT only (phantom on), and PO with the phantom dimension off.
    pub ablation: bool,
    /// Optimizer steps per variant.
    pub steps: usize,
    /// Triples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Phantom weight η of the "phantom on" variants.
    pub eta: f64,
    /// Seed of the data, and of initialisation and order in the first run of each variant.
    pub seed: u64,
    /// Runs per variant, with initialisation and order seeds `seed`, `seed + 1`, …
    pub seeds: usize,
    /// Training triples.
    pub train_size: usize,
    /// Held-out triples.
    pub eval_size: usize,
    /// Question kinds asked (all four when empty).
    pub kinds: Vec<QuestionKind>,
    /// Progress display.
    pub dashboard: Dashboard,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs/demo"),
            ablation: false,
            steps: 2400,
            batch_size: 8,
            lr: 1e-3,
            eta: 1.0,
            seed: 7,
            seeds: 1,
            train_size: 19_200,
            eval_size: 200,
            kinds: Vec::new(),
            dashboard: Dashboard::Auto,
        }
    }
}

/// One trained variant, as written to `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct VariantReport {
    /// Short name.
    pub name: String,
    /// Loss used.
    pub objective: Objective,
    /// Whether the phantom dimension was on (η > 0).
    pub phantom: bool,
    /// η.
    pub eta: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Triples per step.
    pub batch_size: usize,
    /// Seed.
    pub seed: u64,
    /// Share of held-out questions answered correctly (greedy decoding).
    pub heldout_accuracy: f64,
    /// The same per question kind.
    pub accuracy_by_kind: Vec<(String, f64)>,
    /// Accuracy on as many training questions (how much of the gap is generalisation).
    pub train_accuracy: f64,
    /// Seconds of training.
    pub train_seconds: f64,
    /// Seconds of the held-out evaluation.
    pub eval_seconds: f64,
}

/// The whole demo's result.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    /// Backend the demo ran on.
    pub device: String,
    /// Training and held-out triples.
    pub train_triples: usize,
    /// Held-out triples.
    pub heldout_triples: usize,
    /// Per variant.
    pub variants: Vec<VariantReport>,
    /// The exported model folder.
    pub model_dir: PathBuf,
    /// The sample question answered at the end.
    pub sample_question: String,
    /// The model's answer to it.
    pub sample_answer: String,
    /// The correct answer.
    pub sample_expected: String,
    /// Whether the answer is right.
    pub sample_correct: bool,
    /// Mean and spread of each variant over its runs.
    pub summary: Vec<VariantSummary>,
}

struct Variant {
    name: &'static str,
    objective: Objective,
    phantom: bool,
}

/// Runs the demo on `device` and writes `report.json` into the output folder.
pub fn run(options: &DemoOptions, device: &Device) -> Result<DemoReport> {
    let out = &options.out_dir;
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let say = |msg: String| {
        if options.dashboard != Dashboard::Quiet {
            eprintln!("{msg}");
        }
    };

    // 1. Data: written as JSON Lines + PNGs and read back through the user-facing reader.
    let data_dir = out.join("data");
    let image_size = model::IMAGE_SIZE as u32;
    let kinds = &options.kinds;
    let train_samples = shapes::generate_kinds(options.train_size, options.seed, image_size, kinds);
    let eval_samples = held_out(options);
    let io = |e: std::io::Error| TrainError::io(&data_dir, e);
    let train_file = shapes::write_jsonl(&data_dir, &train_samples, "train").map_err(io)?;
    let eval_file = shapes::write_jsonl(&data_dir, &eval_samples, "heldout").map_err(io)?;
    say(format!(
        "data: {} training and {} held-out triples in {}",
        train_samples.len(),
        eval_samples.len(),
        data_dir.display()
    ));

    // 2. Tokenizer trained on the demo's texts and the chat template.
    let tokenizer_path = out.join("tokenizer.json");
    let corpus = tokenizer_corpus(&train_samples);
    let trained = tokenizer::train_tokenizer(&corpus, 512)
        .map_err(|e| TrainError::Config(format!("training the tokenizer: {e}")))?;
    tokenizer::save(&trained, &tokenizer_path)
        .map_err(|e| TrainError::Config(format!("saving the tokenizer: {e}")))?;
    let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    say(format!(
        "tokenizer: {} tokens → {}",
        tokenizer.vocab_size(),
        tokenizer_path.display()
    ));

    let fields = FieldNames::default();
    let train_set = read_triples(&train_file, &fields, None, false)?;
    let eval_set = read_triples(&eval_file, &fields, None, false)?;

    // 3. Variants, each from the same initial weights and data order.
    let mut variants = vec![Variant {
        name: "po+phantom",
        objective: Objective::Po,
        phantom: true,
    }];
    if options.ablation {
        variants.push(Variant {
            name: "sft+phantom",
            objective: Objective::Sft,
            phantom: true,
        });
        variants.push(Variant {
            name: "po-plain",
            objective: Objective::Po,
            phantom: false,
        });
    }

    let mut reports = Vec::new();
    let mut main_model = None;
    for variant in &variants {
        for run in 0..options.seeds.max(1) {
            let seed = options.seed + run as u64;
            let eta = if variant.phantom { options.eta } else { 0.0 };
            let config = model::config(&tokenizer, eta)?;
            device.seed(seed);
            let mut phantom = PhantomModel::new(config, device);
            vision_embedding_init(&mut phantom);
            small_embedding_init(&mut phantom);
            let encoder = TripleEncoder::new(&phantom, tokenizer.clone(), 1)?;
            let source = |triples| {
                Arc::new(TripleSource {
                    triples,
                    encoder: encoder.clone(),
                })
            };
            let valid_subset = eval_set.triples.iter().take(64).cloned().collect();
            let run_config = TrainConfig {
                out_dir: if options.seeds > 1 {
                    out.join("runs")
                        .join(format!("{}-seed{seed}", variant.name))
                } else {
                    out.join("runs").join(variant.name)
                },
                stage: Stage::All,
                loss: PreferenceLoss {
                    objective: variant.objective,
                    ..PreferenceLoss::default()
                },
                lr: options.lr,
                min_lr: options.lr / 20.0,
                warmup_steps: (options.steps / 10).max(1).min(options.steps - 1),
                steps: options.steps,
                batch_size: options.batch_size,
                accumulation: 1,
                weight_decay: 0.01,
                max_grad_norm: Some(1.0),
                seed,
                checkpoint_every: options.steps.div_ceil(2),
                keep_checkpoints: 1,
                dashboard: options.dashboard,
                log_every: 25,
                label: format!("demo {} (seed {seed})", variant.name),
                ..TrainConfig::default()
            };
            // A rerun of the demo starts its variants afresh.
            let run_dir = &run_config.out_dir;
            if run_dir.exists() {
                std::fs::remove_dir_all(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
            }
            let outcome = train(
                phantom,
                source(train_set.triples.clone()),
                source(valid_subset),
                &run_config,
                std::slice::from_ref(device),
            )?;
            if outcome.interrupted {
                return Err(TrainError::Training(format!(
                    "variant {} was stopped before the end",
                    variant.name
                )));
            }
            let chat = Chat::new(outcome.model, tokenizer.clone())?;
            let start = Instant::now();
            let (accuracy, by_kind) = evaluate(&chat, &eval_samples)?;
            let eval_seconds = start.elapsed().as_secs_f64();
            let seen = &train_samples[..eval_samples.len().min(train_samples.len())];
            let (train_accuracy, _) = evaluate(&chat, seen)?;
            say(format!(
                "{} (seed {seed}): held-out accuracy {:.1}% ({} questions; {:.1}% on as many \
             training ones), trained in {:.0} s",
                variant.name,
                accuracy * 100.0,
                eval_samples.len(),
                train_accuracy * 100.0,
                outcome.seconds
            ));
            reports.push(VariantReport {
                name: variant.name.to_string(),
                objective: variant.objective,
                phantom: variant.phantom,
                eta,
                steps: outcome.steps,
                batch_size: options.batch_size,
                seed,
                heldout_accuracy: accuracy,
                accuracy_by_kind: by_kind,
                train_accuracy,
                train_seconds: outcome.seconds,
                eval_seconds,
            });
            if main_model.is_none() {
                main_model = Some(chat);
            }
        }
    }

    // 4. Export the full-method model and answer one held-out question with it.
    let chat = main_model.ok_or_else(|| TrainError::Training("no variant trained".into()))?;
    let model_dir = out.join("model");
    export(&chat.model, &tokenizer_path, &model_dir)?;
    let sample = eval_samples
        .first()
        .ok_or_else(|| TrainError::Config("the held-out set is empty".into()))?;
    let (answer, _) = chat.answer(
        &[Turn::question(sample.question.clone())],
        std::slice::from_ref(&sample.image),
        &GenerationConfig::greedy(16, Vec::new()),
        |_| std::ops::ControlFlow::Continue(()),
    )?;
    let image_path = data_dir.join("images").join("heldout_00000.png");
    let report = DemoReport {
        device: format!("{device:?}"),
        train_triples: train_samples.len(),
        heldout_triples: eval_samples.len(),
        model_dir: model_dir.clone(),
        sample_question: sample.question.clone(),
        sample_answer: answer.trim().to_string(),
        sample_expected: sample.chosen.clone(),
        sample_correct: sample.is_correct(&answer),
        summary: summarize(&reports),
        variants: reports,
    };
    write_report(&out.join("report.json"), &report)?;
    print_summary(&report, &image_path);
    Ok(report)
}

/// Every text the model will see: questions and answers inside the chat template.
pub fn tokenizer_corpus(samples: &[ShapeSample]) -> Vec<String> {
    samples
        .iter()
        .map(|s| {
            format!(
                "<|im_start|>user\n{}<|im_end|><|im_start|>assistant\n{}<|im_end|> {}",
                s.question, s.chosen, s.rejected
            )
        })
        .collect()
}

/// The vision tower's class and position embeddings drawn from N(0, 1), as InternViT
/// initialises them (`torch.randn`): the model's constructor leaves them at zero for a
/// checkpoint to fill, and at zero every patch starts out alike wherever it lies.
fn vision_embedding_init(model: &mut PhantomModel) {
    let embeddings = &mut model.vision_model.embeddings;
    for param in [
        &mut embeddings.class_embedding,
        &mut embeddings.position_embedding,
    ] {
        let shape = param.shape();
        let device = param.device();
        *param = Param::from_tensor(Tensor::random(
            shape,
            Distribution::Normal(0.0, 1.0),
            &device,
        ));
    }
}

/// Token embeddings drawn from N(0, 0.02²), as Hugging Face initialises Qwen2: with the tied
/// head, unit-variance embeddings would start the logits far too sharp.
fn small_embedding_init(model: &mut PhantomModel) {
    let weight = &model.language_model.model.embed_tokens.weight;
    let shape = weight.shape();
    let device = weight.device();
    model.language_model.model.embed_tokens.weight = Param::from_tensor(Tensor::random(
        shape,
        Distribution::Normal(0.0, 0.02),
        &device,
    ));
}

/// The held-out triples of a run with `options`' seed, size and question kinds (their
/// pictures are drawn apart from the training ones).
fn held_out(options: &DemoOptions) -> Vec<ShapeSample> {
    shapes::generate_kinds(
        options.eval_size,
        options.seed ^ 0xE7A1,
        model::IMAGE_SIZE as u32,
        &options.kinds,
    )
}

/// Held-out accuracy, overall and by question kind, of an exported demo model (`dir`: its
/// `config.json`, weights and `tokenizer.json`) loaded with `load` (quantized, say) on the
/// held-out triples a run with `options` draws.
pub fn evaluate_folder(
    options: &DemoOptions,
    device: &Device,
    dir: &Path,
    load: phantom_model::LoadOptions,
) -> Result<(f64, Vec<(String, f64)>)> {
    let model = phantom_model::load_model(dir, device, load)?;
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
    let chat = Chat::new(model, tokenizer)?;
    evaluate(&chat, &held_out(options))
}

/// Greedy answers to every held-out question; a question counts as right when the answer
/// names the expected word and no competing one.
fn evaluate(chat: &Chat, samples: &[ShapeSample]) -> Result<(f64, Vec<(String, f64)>)> {
    let config = GenerationConfig::greedy(16, Vec::new());
    let mut right = 0usize;
    let mut by_kind: Vec<(QuestionKind, usize, usize)> =
        QuestionKind::ALL.iter().map(|&k| (k, 0, 0)).collect();
    for sample in samples {
        let (answer, _) = chat.answer(
            &[Turn::question(sample.question.clone())],
            std::slice::from_ref(&sample.image),
            &config,
            |_| std::ops::ControlFlow::Continue(()),
        )?;
        let ok = sample.is_correct(&answer);
        right += usize::from(ok);
        if let Some(entry) = by_kind.iter_mut().find(|(k, _, _)| *k == sample.kind) {
            entry.1 += usize::from(ok);
            entry.2 += 1;
        }
    }
    let accuracy = right as f64 / samples.len().max(1) as f64;
    let by_kind = by_kind
        .into_iter()
        .filter(|(_, _, n)| *n > 0)
        .map(|(k, r, n)| (k.name().to_string(), r as f64 / n as f64))
        .collect();
    Ok((accuracy, by_kind))
}

fn write_report(path: &Path, report: &DemoReport) -> Result<()> {
    let text = serde_json::to_string_pretty(report)
        .map_err(|e| TrainError::Config(format!("serialising the report: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

fn print_summary(report: &DemoReport, image: &Path) {
    println!();
    println!(
        "{:<14} {:>9} {:>8} {:>5} {:>6} {:>10} {:>8}",
        "variant", "objective", "phantom", "seed", "steps", "accuracy", "train s"
    );
    for v in &report.variants {
        println!(
            "{:<14} {:>9} {:>8} {:>5} {:>6} {:>9.1}% {:>8.0}",
            v.name,
            v.objective.name(),
            if v.phantom { "on" } else { "off" },
            v.seed,
            v.steps,
            v.heldout_accuracy * 100.0,
            v.train_seconds
        );
    }
    let summary = summarize(&report.variants);
    if summary.iter().any(|s| s.runs > 1) {
        println!();
        println!(
            "{:<14} {:>5} {:>16}   per kind (mean)",
            "variant", "runs", "held-out"
        );
        for s in &summary {
            let kinds: Vec<String> = s
                .by_kind
                .iter()
                .map(|(k, m)| format!("{k} {:.0}%", m * 100.0))
                .collect();
            println!(
                "{:<14} {:>5} {:>7.1}% ± {:>4.1}   {}",
                s.name,
                s.runs,
                s.mean * 100.0,
                s.std * 100.0,
                kinds.join(", ")
            );
        }
        for line in reading(&summary) {
            println!("{line}");
        }
    }
    println!();
    println!("model: {}", report.model_dir.display());
    println!("image: {}", image.display());
    println!("Q: {}", report.sample_question);
    println!(
        "A: {} ({})",
        report.sample_answer,
        if report.sample_correct {
            "right"
        } else {
            "wrong"
        }
    );
    println!("(expected: {})", report.sample_expected);
}

/// A variant's held-out accuracy over its runs.
#[derive(Clone, Debug, Serialize)]
pub struct VariantSummary {
    /// Variant name.
    pub name: String,
    /// Runs (seeds).
    pub runs: usize,
    /// Mean held-out accuracy.
    pub mean: f64,
    /// Sample standard deviation over the runs (0 for one run).
    pub std: f64,
    /// Mean accuracy per question kind.
    pub by_kind: Vec<(String, f64)>,
}

/// Mean and standard deviation of each variant's runs, in the order the variants ran.
pub fn summarize(variants: &[VariantReport]) -> Vec<VariantSummary> {
    let mut names: Vec<&str> = Vec::new();
    for v in variants {
        if !names.contains(&v.name.as_str()) {
            names.push(&v.name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let runs: Vec<&VariantReport> = variants.iter().filter(|v| v.name == name).collect();
            let n = runs.len() as f64;
            let mean = runs.iter().map(|v| v.heldout_accuracy).sum::<f64>() / n;
            let var = if runs.len() > 1 {
                runs.iter()
                    .map(|v| (v.heldout_accuracy - mean).powi(2))
                    .sum::<f64>()
                    / (n - 1.0)
            } else {
                0.0
            };
            let mut by_kind: Vec<(String, f64)> = Vec::new();
            for (kind, _) in &runs[0].accuracy_by_kind {
                let m = runs
                    .iter()
                    .filter_map(|v| v.accuracy_by_kind.iter().find(|(k, _)| k == kind))
                    .map(|(_, a)| *a)
                    .sum::<f64>()
                    / n;
                by_kind.push((kind.clone(), m));
            }
            VariantSummary {
                name: name.to_string(),
                runs: runs.len(),
                mean,
                std: var.sqrt(),
                by_kind,
            }
        })
        .collect()
}

/// What the ablation says: each comparison's difference of means against the spread of the
/// runs (a difference within one standard deviation of either side is not a finding).
pub fn reading(summary: &[VariantSummary]) -> Vec<String> {
    let find = |name: &str| summary.iter().find(|s| s.name == name);
    let mut lines = Vec::new();
    for (what, a, b) in [
        ("PO vs SFT (phantom on)", "po+phantom", "sft+phantom"),
        ("phantom on vs off (PO)", "po+phantom", "po-plain"),
    ] {
        let (Some(a), Some(b)) = (find(a), find(b)) else {
            continue;
        };
        let diff = a.mean - b.mean;
        let spread = a.std.max(b.std);
        let verdict = if a.runs < 2 || b.runs < 2 {
            "one run each: no spread to judge it against"
        } else if diff.abs() <= spread {
            "within the spread of the seeds: no measurable difference"
        } else if diff > 0.0 {
            "larger than the spread of the seeds: the first is better here"
        } else {
            "larger than the spread of the seeds: the second is better here"
        };
        lines.push(format!(
            "{what}: {:+.1} points ({:.1}% vs {:.1}%, largest std {:.1}) — {verdict}",
            diff * 100.0,
            a.mean * 100.0,
            b.mean * 100.0,
            spread * 100.0
        ));
    }
    lines
}
