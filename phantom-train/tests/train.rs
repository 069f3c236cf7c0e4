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
    #[derive(Default)]
    struct Collect {
        path: Vec<String>,
        out: HashMap<String, Vec<f32>>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param
                .val()
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
    let mut c = Collect::default();
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
fn the_demo_trains_exports_and_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device = phantom_model::device::device(Some("flex")).expect("the flex backend");
    let options = DemoOptions {
        out_dir: dir.path().to_path_buf(),
        steps: 3,
        batch_size: 2,
        train_size: 16,
        eval_size: 4,
        dashboard: Dashboard::Quiet,
        ..DemoOptions::default()
    };
    let report = demo::run(&options, &device).expect("demo");
    assert_eq!(report.variants.len(), 1);
    let v = &report.variants[0];
    assert!((0.0..=1.0).contains(&v.heldout_accuracy));
    assert_eq!(v.steps, 3);
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
    // Folding the adapters gives a model in the official layout again.
    let dir = s.root.join("lora-export");
    phantom_model::save_model(&lora.materialize(), &dir).expect("save");
    load_model(&dir, &s.device, LoadOptions::default()).expect("the export loads");
}
