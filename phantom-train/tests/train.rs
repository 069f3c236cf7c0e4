//! Training end to end on the demo's small Phantom: freezing, resume, NaN handling, bad records,
//! export, and the demo itself.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::AdamWConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::prelude::*;
use burn::train::TrainStep;
use phantom_model::processor::tokenizer::Tokenizer;
use phantom_model::{LoadOptions, PhantomModel, load_model};
use phantom_train::batch::{PreferenceBatch, TripleEncoder};
use phantom_train::data::{FieldNames, Triple, read_triples};
use phantom_train::demo::{self, DemoOptions, shapes};
use phantom_train::loader::TripleSource;
use phantom_train::stage::{LoraSettings, Stage, count_trainable, prepare, with_autodiff};
use phantom_train::step::{PoModel, StepSettings};
use phantom_train::trainer::{Dashboard, TrainConfig, train};
use phantom_train::{PreferenceLoss, TrainError};

struct Setup {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    tokenizer: Tokenizer,
    triples: Vec<Triple>,
    device: Device,
}

fn setup(samples: usize) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let data = shapes::generate(samples, 11, demo::model::IMAGE_SIZE as u32);
    let file = shapes::write_jsonl(&root.join("data"), &data, "train").expect("write data");
    let corpus = demo::tokenizer_corpus(&data);
    let trained = demo::tokenizer::train_tokenizer(&corpus, 400).expect("tokenizer");
    let tokenizer_path = root.join("tokenizer.json");
    demo::tokenizer::save(&trained, &tokenizer_path).expect("save tokenizer");
    let tokenizer = Tokenizer::from_file(&tokenizer_path).expect("load tokenizer");
    let triples = read_triples(&file, &FieldNames::default(), None, false)
        .expect("read triples")
        .triples;
    let device = phantom_model::device::device(Some("flex")).expect("the flex backend");
    Setup {
        _dir: dir,
        root,
        tokenizer,
        triples,
        device,
    }
}

fn model(s: &Setup) -> PhantomModel {
    s.device.seed(3);
    let config = demo::model::config(&s.tokenizer, 1.0).expect("demo config");
    PhantomModel::new(config, &s.device)
}

fn source(s: &Setup, model: &PhantomModel, triples: Vec<Triple>) -> Arc<TripleSource> {
    Arc::new(TripleSource {
        triples,
        encoder: TripleEncoder::new(model, s.tokenizer.clone(), 1).expect("encoder"),
    })
}

/// Every float parameter by path.
fn params(model: &impl Module) -> HashMap<String, Vec<f32>> {
    collect(model, None)
}

/// Every float parameter (or, with `grads`, its gradient: zeros where the loss does not reach
/// it) by path.
fn collect(
    model: &impl Module,
    grads: Option<&burn::tensor::Gradients>,
) -> HashMap<String, Vec<f32>> {
    struct Collect<'g> {
        grads: Option<&'g burn::tensor::Gradients>,
        path: Vec<String>,
        out: HashMap<String, Vec<f32>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let tensor = match self.grads {
                Some(grads) => value
                    .grad(grads)
                    .unwrap_or_else(|| value.inner().zeros_like()),
                None => value,
            };
            let values = tensor
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32");
            let key = self
                .path
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(".");
            self.out.insert(key, values);
        }
    }
    let mut c = Collect {
        grads,
        path: Vec::new(),
        out: HashMap::new(),
    };
    model.visit(&mut c);
    c.out
}

fn config(dir: &Path, steps: usize, every: usize) -> TrainConfig {
    TrainConfig {
        out_dir: dir.to_path_buf(),
        stage: Stage::All,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 1,
        steps,
        batch_size: 2,
        checkpoint_every: every,
        keep_checkpoints: 10,
        dashboard: Dashboard::Quiet,
        seed: 5,
        ..TrainConfig::default()
    }
}

#[test]
fn stage_one_moves_only_the_projector_and_phantom_modules() {
    let s = setup(8);
    let base = model(&s);
    let src = source(&s, &base, s.triples.clone());
    let batch = PreferenceBatch {
        items: (0..2).map(|i| src.item(i).expect("item")).collect(),
    };
    let before = params(&base);
    let prepared = prepare(with_autodiff(base), Stage::One, false, None).expect("stage 1");
    let po = PoModel::new(
        prepared,
        StepSettings::new(PreferenceLoss::default(), 1, Some(1.0)),
    );
    let out = TrainStep::step(&po, batch);
    assert!(out.item.loss.is_finite());
    let mut optim = AdamWConfig::new().init();
    let stepped = po.optimize(&mut optim, ModuleLearningRate::from(1e-2), out.grads);
    let after = params(&stepped.model.valid());
    let trainable = |path: &str| path.starts_with("vision_proj.") || path.contains(".phantom.");
    let (mut moved, mut frozen) = (0, 0);
    for (path, old) in &before {
        let new = after
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing after the step"));
        if trainable(path) {
            // Every projector / phantom weight gets a gradient.
            assert_ne!(old, new, "{path} is trainable in stage 1 but did not move");
            moved += 1;
        } else {
            assert_eq!(old, new, "{path} is frozen in stage 1 but changed");
            frozen += 1;
        }
    }
    assert!(moved >= 4 && frozen >= 10, "{moved} moved, {frozen} frozen");
}

/// Final-epoch training losses from `metrics.jsonl`, in order.
fn losses(dir: &Path, epoch: usize) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["split"] == "train" && v["epoch"] == epoch && v["kind"] == "item")
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

#[test]
fn a_resumed_run_matches_an_uninterrupted_one() {
    let s = setup(12);
    let steps = 4;
    // Uninterrupted.
    let dir_a = s.root.join("a");
    let base = model(&s);
    let a = train(
        base.clone(),
        source(&s, &base, s.triples.clone()),
        source(&s, &base, s.triples[..2].to_vec()),
        &config(&dir_a, steps, 2),
        std::slice::from_ref(&s.device),
    )
    .expect("run a");
    // Same run, "crashed" after its first checkpoint: the second one is removed, then resumed.
    let dir_b = s.root.join("b");
    train(
        base.clone(),
        source(&s, &base, s.triples.clone()),
        source(&s, &base, s.triples[..2].to_vec()),
        &config(&dir_b, steps, 2),
        std::slice::from_ref(&s.device),
    )
    .expect("run b");
    for kind in ["model", "optim", "scheduler"] {
        std::fs::remove_file(dir_b.join("checkpoint").join(format!("{kind}-2.bpk")))
            .expect("remove checkpoint 2");
    }
    let before_resume = losses(&dir_b, 2).len();
    let mut resume = config(&dir_b, steps, 2);
    resume.resume = true;
    let b = train(
        base.clone(),
        source(&s, &base, s.triples.clone()),
        source(&s, &base, s.triples[..2].to_vec()),
        &resume,
        std::slice::from_ref(&s.device),
    )
    .expect("resumed run");

    let want = losses(&dir_a, 2);
    let got = losses(&dir_b, 2)[before_resume..].to_vec();
    assert_eq!(want.len(), 2);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "resumed losses {got:?} vs {want:?}");
    }
    let (pa, pb) = (params(&a.model), params(&b.model));
    for (path, va) in &pa {
        let vb = &pb[path];
        let diff = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, |m, d| {
                if m.is_nan() || d.is_nan() {
                    f32::NAN
                } else {
                    m.max(d)
                }
            });
        assert!(diff < 1e-5, "{path} differs by {diff} after resume");
    }

    // A fresh run into a folder with checkpoints is refused rather than mixed in.
    let err = train(
        base.clone(),
        source(&s, &base, s.triples.clone()),
        source(&s, &base, s.triples[..2].to_vec()),
        &config(&dir_a, steps, 2),
        std::slice::from_ref(&s.device),
    )
    .err()
    .expect("refused");
    assert!(matches!(err, TrainError::Checkpoint(_)), "{err}");
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let s = setup(8);
    let mut base = model(&s);
    let w = &base.vision_proj.fc1.weight;
    let nan = Tensor::<2>::full(w.shape(), f32::NAN, &s.device);
    base.vision_proj.fc1.weight = Param::from_tensor(nan);
    let dir = s.root.join("nan");
    let err = train(
        base.clone(),
        source(&s, &base, s.triples.clone()),
        source(&s, &base, s.triples[..2].to_vec()),
        &config(&dir, 2, 1),
        std::slice::from_ref(&s.device),
    )
    .err()
    .expect("a NaN run must fail");
    assert!(matches!(err, TrainError::NonFinite(_)), "{err}");
    assert!(err.to_string().contains("NaN"), "{err}");
    assert_eq!(
        phantom_train::checkpoint::latest_complete(&dir.join("checkpoint")),
        None,
        "no checkpoint may be written from a NaN model"
    );
}

#[test]
fn records_that_cannot_be_trained_on_are_named() {
    let s = setup(4);
    let base = model(&s);
    let mut triples = s.triples.clone();
    let corrupt = s.root.join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really").expect("write");
    triples[1].image = Some(corrupt);
    triples[2].question = "word ".repeat(2000);
    let src = source(&s, &base, triples);
    let bad = src.check();
    let indices: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, vec![1, 2], "{bad:?}");
    assert!(bad[0].1.contains("corrupt.png"), "{}", bad[0].1);
    assert!(bad[1].1.contains("context"), "{}", bad[1].1);
    assert!(src.item(1).is_err());
}

#[test]
fn the_demo_learns_colours_from_the_pictures_and_exports() {
    // A short colour-only run (chance: 1 in 5) must answer most unseen pictures right: the
    // answer can only come from the image.
    let dir = tempfile::tempdir().expect("tempdir");
    let device = phantom_model::device::device(Some("flex")).expect("the flex backend");
    let options = DemoOptions {
        out_dir: dir.path().to_path_buf(),
        steps: 300,
        train_size: 600,
        eval_size: 100,
        kinds: vec![shapes::QuestionKind::Colour],
        dashboard: Dashboard::Quiet,
        ..DemoOptions::default()
    };
    let report = demo::run(&options, &device).expect("demo");
    assert_eq!(report.variants.len(), 1);
    let v = &report.variants[0];
    assert_eq!(v.steps, 300);
    assert!(
        v.heldout_accuracy >= 0.8,
        "held-out colour accuracy {} is below 0.8 (chance: 0.2)",
        v.heldout_accuracy
    );
    assert_eq!(v.accuracy_by_kind.len(), 1, "{:?}", v.accuracy_by_kind);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("report.json")).expect("report.json"),
    )
    .expect("valid JSON");
    assert_eq!(json["variants"][0]["objective"], "po");
    assert_eq!(json["variants"][0]["phantom"], true);
    // The exported folder loads as any Phantom checkpoint.
    let model_dir = dir.path().join("model");
    let loaded = load_model(&model_dir, &device, LoadOptions::default()).expect("load export");
    assert_eq!(loaded.config.phantom_eta, 1.0);
    Tokenizer::from_file(model_dir.join("tokenizer.json")).expect("tokenizer in the export");
}

#[test]
fn stage_two_lora_trains_adapters_and_exports_plain_weights() {
    let s = setup(4);
    let base = model(&s);
    let full = prepare(with_autodiff(base.clone()), Stage::Two, false, None).expect("stage 2");
    let lora = prepare(
        with_autodiff(base.clone()),
        Stage::Two,
        false,
        Some(LoraSettings {
            rank: 2,
            alpha: 4.0,
        }),
    )
    .expect("stage 2 with LoRA");
    let (full_trainable, total) = count_trainable(&full);
    let (lora_trainable, _) = count_trainable(&lora);
    let (stage1, _) =
        count_trainable(&prepare(with_autodiff(base), Stage::One, false, None).expect("stage 1"));
    assert!(
        stage1 < lora_trainable && lora_trainable < full_trainable && full_trainable < total,
        "stage 1 {stage1}, LoRA {lora_trainable}, stage 2 {full_trainable}, total {total}"
    );

    // A few steps move the adapters (B starts at zero) and nothing else.
    let src = source(&s, &lora, s.triples.clone());
    let batch = PreferenceBatch {
        items: (0..2).map(|i| src.item(i).expect("item")).collect(),
    };
    let before = params(&lora.valid());
    let mut po = PoModel::new(
        lora,
        StepSettings::new(PreferenceLoss::default(), 1, Some(1.0)),
    );
    let mut optim = AdamWConfig::new().init();
    for _ in 0..3 {
        let out = TrainStep::step(&po, batch.clone());
        assert!(out.item.loss.is_finite());
        po = po.optimize(&mut optim, ModuleLearningRate::from(1e-2), out.grads);
    }
    let lora = po.model;

    // Burn visits an adapted weight as its frozen base at `path`, then the factors at
    // `path.lora.a` ([d_in, r]) and `path.lora.b` ([r, d_out]); the weight is base + scale·A·B
    // laid out in the base's shape.
    let (rank, scale) = (2usize, 4.0f32 / 2.0);
    let trained = params(&lora);
    let mut adapted: HashMap<String, (Vec<f32>, Vec<f32>, bool)> = HashMap::new();
    for (path, a) in &trained {
        let Some(base_path) = path.strip_suffix(".lora.a") else {
            continue;
        };
        let b = &trained[&format!("{base_path}.lora.b")];
        let (d_in, d_out) = (a.len() / rank, b.len() / rank);
        let mut delta = vec![0f32; d_in * d_out];
        for i in 0..d_in {
            for j in 0..d_out {
                let dot: f32 = (0..rank).map(|k| a[i * rank + k] * b[k * d_out + j]).sum();
                delta[i * d_out + j] = scale * dot;
            }
        }
        let moved = b.iter().any(|v| *v != 0.0);
        adapted.insert(
            base_path.to_string(),
            (trained[base_path].clone(), delta, moved),
        );
    }
    assert!(adapted.len() >= 4, "{} adapted weights", adapted.len());
    assert!(
        adapted.values().all(|(_, _, moved)| *moved),
        "an adapter did not move"
    );

    // Folding the adapters gives W + scale·A·B, saved and reloaded in the official layout.
    let folded = lora.valid().materialize();
    let dir = s.root.join("lora-export");
    phantom_model::save_model(&folded, &dir).expect("save");
    let loaded =
        params(&load_model(&dir, &s.device, LoadOptions::default()).expect("the export loads"));
    let after = params(&folded);
    for (path, (base, delta, _)) in &adapted {
        let got = &loaded[path];
        assert_eq!(
            got, &after[path],
            "{path}: the export differs from the folded model"
        );
        let mut largest = 0f32;
        for ((g, b), d) in got.iter().zip(base).zip(delta) {
            largest = largest.max((g - (b + d)).abs());
        }
        assert!(
            largest <= 1e-6,
            "{path}: folded weight is off W + scale·A·B by {largest}"
        );
        assert!(
            delta.iter().any(|d| d.abs() > 1e-6),
            "{path}: the delta is zero"
        );
    }
    // Besides the adapters, only the projector and phantom modules train (as in stage 1).
    let trainable = |path: &str| path.starts_with("vision_proj.") || path.contains(".phantom.");
    for (path, old) in &before {
        if !adapted.contains_key(path)
            && !path.contains("lora")
            && !trainable(path)
            && let Some(new) = after.get(path)
        {
            assert_eq!(old, new, "{path} changed");
        }
    }
}

#[test]
fn the_shared_prompt_gives_the_loss_and_gradients_of_separate_rows() {
    use phantom_train::batch::{answer_logps, answer_logps_unshared};
    let s = setup(6);
    let base = model(&s);
    let src = source(&s, &base, s.triples.clone());
    let items: Vec<_> = (0..4).map(|i| src.item(i).expect("item")).collect();
    // Prompts of different lengths, so that the batch is left-padded.
    let lengths: Vec<usize> = items.iter().map(|i| i.prompt.len()).collect();
    assert!(lengths.iter().any(|&l| l != lengths[0]), "{lengths:?}");
    assert!(items.iter().all(|i| i.pixels.is_some()));
    let batch = PreferenceBatch { items };
    let model = prepare(with_autodiff(base), Stage::All, true, None).expect("every weight");
    for loss in [
        PreferenceLoss::default(),
        PreferenceLoss {
            objective: phantom_train::loss::Objective::Sft,
            ..PreferenceLoss::default()
        },
    ] {
        let with_rejected = loss.objective.uses_rejected();
        let run = |shared: bool| {
            let logps = if shared {
                answer_logps(&model, &batch, with_rejected)
            } else {
                answer_logps_unshared(&model, &batch, with_rejected)
            }
            .expect("log-probabilities");
            let terms = loss.compute(&logps);
            let value = terms.loss.clone().into_scalar::<f64>();
            let grads = terms.loss.backward();
            (value, collect(&model, Some(&grads)))
        };
        let (shared, shared_grads) = run(true);
        let (separate, separate_grads) = run(false);
        assert!(shared.is_finite() && separate.is_finite());
        assert!(
            (shared - separate).abs() <= 1e-5 * separate.abs().max(1.0),
            "{}: loss {shared} vs {separate}",
            loss.objective
        );
        assert_eq!(shared_grads.len(), separate_grads.len());
        // Within 1e-5 of the largest gradient of the model (summation order differs).
        let largest = separate_grads
            .values()
            .flatten()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(largest > 0.0 && largest.is_finite());
        let mut reached = 0;
        for (name, want) in &separate_grads {
            let got = &shared_grads[name];
            reached += usize::from(want.iter().any(|v| *v != 0.0));
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 1e-5 * largest && g.is_finite(),
                    "{}: {name}: {g} vs {w} (largest gradient {largest})",
                    loss.objective
                );
            }
        }
        // The vision tower, projector, decoder and phantom weights all got gradients.
        assert!(
            reached > separate_grads.len() / 2,
            "{reached} of {}",
            separate_grads.len()
        );
    }
}

#[test]
fn the_train_command_holds_out_a_split_and_runs_stage_two_with_sft() {
    let s = setup(100);
    let base = model(&s);
    let model_dir = s.root.join("start");
    phantom_train::trainer::export(&base, &s.root.join("tokenizer.json"), &model_dir)
        .expect("a model folder");
    let run = s.root.join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_phantom-train"))
        .arg("train")
        .arg("--model")
        .arg(&model_dir)
        .arg("--data")
        .arg(s.root.join("data/train.jsonl"))
        .arg("--out")
        .arg(&run)
        .args([
            "--stage",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "2",
        ])
        .args(["--checkpoint-every", "2", "--plain", "--device", "flex"])
        .output()
        .expect("phantom-train runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // 2% of 100 triples, left out of training.
    assert!(
        stderr.contains("no --valid: 2 of the 100 triples are held out"),
        "{stderr}"
    );
    // Stage 2 trains the LLM with plain SFT unless told otherwise.
    assert!(stderr.contains("stage 2, objective sft"), "{stderr}");
    load_model(run.join("model"), &s.device, LoadOptions::default()).expect("the export loads");

    // Two devices for the demo are refused, not silently reduced to one.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_phantom-train"))
        .args([
            "demo", "--device", "flex", "--device", "flex", "--steps", "2",
        ])
        .arg("--out")
        .arg(s.root.join("demo"))
        .output()
        .expect("phantom-train runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the demo trains on one device"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_demo_model_keeps_its_held_out_accuracy_when_quantized() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/demo_model");
    let accuracy = |extra: &[&str]| -> f64 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_phantom-train"))
            .args(["demo", "--device", "flex", "--evaluate"])
            .arg(&model)
            .args(extra)
            .output()
            .expect("phantom-train runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let re = regex::Regex::new(r"held-out accuracy ([0-9.]+)%").unwrap();
        re.captures(&stdout)
            .and_then(|c| c[1].parse().ok())
            .unwrap_or_else(|| panic!("no accuracy in {stdout}"))
    };
    // The exported model's own figure (the demo printed it when it trained the model).
    let float = accuracy(&[]);
    assert_eq!(float, 98.0);
    let q8 = accuracy(&["--quantize", "q8"]);
    let q4 = accuracy(&["--quantize", "q4"]);
    assert!((q8 - float).abs() <= 1.0, "q8 {q8}% against {float}%");
    assert!((q4 - float).abs() <= 3.0, "q4 {q4}% against {float}%");
}
