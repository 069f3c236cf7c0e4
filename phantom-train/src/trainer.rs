//! One training run on Burn's learner: settings, optimizer and schedule, dashboard, atomic
//! checkpoints with resume, and export of the result in the official layout.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::optim::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::prelude::Device;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::{ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining};
use phantom_model::{PhantomModel, save_model};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{AtomicFileCheckpointer, latest_complete};
use crate::error::{Result, TrainError};
use crate::loader::{TripleLoader, TripleSource};
use crate::loss::PreferenceLoss;
use crate::metrics::{JsonlMetricLogger, StatMetric};
use crate::renderer::PlainRenderer;
use crate::stage::{LoraSettings, Stage, count_trainable, prepare, with_autodiff};
use crate::step::{PoModel, StepSettings};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dashboard {
    /// Burn's dashboard when stdout is a terminal, progress lines otherwise.
    Auto,
    /// Progress lines.
    Plain,
    /// Nothing but errors.
    Quiet,
}

/// Settings of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Run folder: checkpoints, metrics, the exported model.
    pub out_dir: PathBuf,
    /// Which weights train.
    pub stage: Stage,
    /// Also train the vision tower in stage 2.
    pub train_vision: bool,
    /// Low-rank adapters for stage 2.
    pub lora: Option<LoraSettings>,
    /// Loss.
    pub loss: PreferenceLoss,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Triples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (their gradients are averaged).
    pub accumulation: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: Option<f64>,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Optimizer steps between checkpoints.
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk.
    pub keep_checkpoints: usize,
    /// Continue from the latest complete checkpoint in `out_dir`.
    pub resume: bool,
    /// Progress display.
    pub dashboard: Dashboard,
    /// Optimizer steps between progress lines.
    pub log_every: usize,
    /// Name shown on the dashboard.
    pub label: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs/phantom"),
            stage: Stage::One,
            train_vision: false,
            lora: None,
            loss: PreferenceLoss::default(),
            lr: 1e-5,
            min_lr: 1e-6,
            warmup_steps: 0,
            steps: 100,
            batch_size: 4,
            accumulation: 1,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 42,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            resume: false,
            dashboard: Dashboard::Auto,
            log_every: 10,
            label: "phantom".into(),
        }
    }
}

impl TrainConfig {
    /// Checks the settings before anything runs.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainError::Config(m.to_string()));
        if self.steps == 0 {
            return bad("steps must be at least 1");
        }
        if self.batch_size == 0 || self.accumulation == 0 {
            return bad("batch size and accumulation must be at least 1");
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint interval must be at least 1 step");
        }
        if !(self.lr > 0.0 && self.lr <= 1.0 && (0.0..=self.lr).contains(&self.min_lr)) {
            return bad("learning rates must satisfy 0 <= min_lr <= lr <= 1 and lr > 0");
        }
        if self.warmup_steps >= self.steps {
            return bad("warmup must be shorter than the run");
        }
        if self.max_grad_norm.is_some_and(|n| n <= 0.0) {
            return bad("the gradient clip must be positive");
        }
        Ok(())
    }

    /// `(epochs, steps per epoch)`: Burn's epoch is one checkpoint interval (the last one
    /// may be shorter).
    pub fn epochs(&self) -> (usize, usize) {
        let per = self.checkpoint_every.min(self.steps);
        (self.steps.div_ceil(per), per)
    }

    /// Folder of the checkpoints.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.out_dir.join("checkpoint")
    }

    /// Folder of the exported model.
    pub fn model_dir(&self) -> PathBuf {
        self.out_dir.join("model")
    }
}

/// What a run produced.
pub struct TrainOutcome {
    /// The trained model (adapters folded in), on the training device.
    pub model: PhantomModel,
    /// Optimizer steps in the schedule.
    pub steps: usize,
    /// Wall time of the learner.
    pub seconds: f64,
    /// Whether the user stopped the run early (it can be resumed).
    pub interrupted: bool,
}

/// Warmup (linear from lr/100) then cosine to `min_lr`, stepped once per optimizer step.
fn schedule(config: &TrainConfig, steps: usize) -> Result<ModuleLrScheduler> {
    let cosine = CosineAnnealingLrSchedulerConfig::new(config.lr, steps - config.warmup_steps)
        .with_min_lr(config.min_lr);
    let result = if config.warmup_steps == 0 {
        cosine.init()
    } else {
        SequentialLrSchedulerConfig::new(
            vec![
                LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(
                    config.lr / 100.0,
                    config.lr,
                    config.warmup_steps,
                )),
                LrSchedulerConfig::Cosine(cosine),
            ],
            vec![config.warmup_steps],
        )
        .init()
    };
    result.map_err(|e| TrainError::Config(format!("learning-rate schedule: {e}")))
}

/// Trains `model` on `train` (and reports held-out metrics on `valid` after every checkpoint
/// interval). Several `devices` train data-parallel through Burn's multi-device strategy.
pub fn train(
    model: PhantomModel,
    train: Arc<TripleSource>,
    valid: Arc<TripleSource>,
    config: &TrainConfig,
    devices: &[Device],
) -> Result<TrainOutcome> {
    config.validate()?;
    let (epochs, steps_per_epoch) = config.epochs();
    let steps = config.steps;
    let checkpoint_dir = config.checkpoint_dir();
    let resume_from = if config.resume {
        let k = latest_complete(&checkpoint_dir).ok_or_else(|| {
            TrainError::Checkpoint(format!(
                "--resume: no complete checkpoint in {}",
                checkpoint_dir.display()
            ))
        })?;
        Some(k)
    } else {
        if latest_complete(&checkpoint_dir).is_some() {
            return Err(TrainError::Checkpoint(format!(
                "{} already holds checkpoints; pass --resume to continue that run or choose \
                 another output folder",
                checkpoint_dir.display()
            )));
        }
        None
    };
    std::fs::create_dir_all(&config.out_dir).map_err(|e| TrainError::io(&config.out_dir, e))?;
    write_settings(config)?;

    let device = devices
        .first()
        .cloned()
        .ok_or_else(|| TrainError::Config("no training device".into()))?;
    device.seed(config.seed);
    // Gradients exist only on the autodiff graph; which parameters take them is then set by
    // the stage.
    let model = prepare(
        with_autodiff(model),
        config.stage,
        config.train_vision,
        config.lora,
    )?;
    let (trainable, total) = count_trainable(&model);
    if trainable == 0 {
        return Err(TrainError::Config(
            "no parameter is trainable in this stage".into(),
        ));
    }
    if config.dashboard != Dashboard::Quiet {
        eprintln!(
            "{}: stage {}, objective {}, {trainable} of {total} parameters trainable, {steps} \
             steps of {}×{} triples",
            config.label,
            config.stage,
            config.loss.objective,
            config.batch_size,
            config.accumulation
        );
    }

    let settings = StepSettings::new(config.loss, config.accumulation, config.max_grad_norm);
    let po = PoModel::new(model, settings.clone());
    // ε = 1e-8 as in PyTorch: with Burn's default 1e-5 the small gradients that reach the
    // vision tower through the projector are damped several-fold.
    let optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_epsilon(1e-8)
        .init();
    let learner = Learner::new(po, optim, schedule(config, steps)?);

    let first_epoch = resume_from.map_or(1, |k| k + 1);
    let train_loader = TripleLoader::training(
        train,
        config.batch_size,
        config.accumulation,
        steps_per_epoch,
        steps,
        config.seed,
        first_epoch,
    );
    let valid_loader = TripleLoader::validation(valid, config.batch_size);

    let checkpointer = |name: &str| {
        AtomicFileCheckpointer::new(&checkpoint_dir, name)
            .map_err(|e| TrainError::io(&checkpoint_dir, e))
    };
    let metrics_path = config.out_dir.join("metrics.jsonl");
    let logger =
        JsonlMetricLogger::new(&metrics_path).map_err(|e| TrainError::io(&metrics_path, e))?;
    let mut training = SupervisedTraining::new(
        &config.out_dir,
        Arc::new(train_loader),
        Arc::new(valid_loader),
    )
    .num_epochs(epochs)
    .with_custom_checkpointers(
        checkpointer("model")?,
        checkpointer("optim")?,
        checkpointer("scheduler")?,
    )
    .with_checkpointing_strategy(KeepLastNCheckpoints::new(config.keep_checkpoints.max(1)))
    .with_metric_logger(logger)
    .with_application_logger(None)
    .label(&config.label);
    if config.accumulation > 1 {
        training = training.grads_accumulation(config.accumulation);
    }
    for metric in StatMetric::all() {
        training = training.metric_train_numeric(metric);
    }
    for metric in StatMetric::validation() {
        training = training.metric_valid_numeric(metric);
    }
    if let Some(k) = resume_from {
        training = training.checkpoint(k);
    }
    let tui = config.dashboard == Dashboard::Auto && std::io::stdout().is_terminal();
    if !tui {
        let every = if config.dashboard == Dashboard::Quiet {
            usize::MAX
        } else {
            config.log_every
        };
        training = training.renderer(Box::new(PlainRenderer::new(
            every,
            steps_per_epoch,
            steps,
            config.accumulation,
        )));
    }
    if devices.len() > 1 {
        training = training.with_training_strategy(
            ExecutionStrategy::multi(
                devices.iter().map(|d| d.clone().autodiff()).collect(),
                MultiDeviceOptim::OptimMainDevice,
            )
            .into(),
        );
    }
    if let Ok(mut shared) = settings.shared.lock() {
        shared.interrupter = Some(training.interrupter());
    }

    if resume_from.is_some_and(|k| k >= epochs) {
        return Err(TrainError::Checkpoint(format!(
            "the run in {} is already complete ({steps} steps); nothing to resume",
            config.out_dir.display()
        )));
    }

    let start = Instant::now();
    let result = training.launch(learner);
    let seconds = start.elapsed().as_secs_f64();
    let interrupted = result.interrupted.is_some();
    let model = result.model;
    // Dropping the renderer closes the dashboard before anything else prints.
    drop(result.renderer);
    if let Some(failure) = settings.failure() {
        return Err(TrainError::NonFinite(failure));
    }
    if let Some(error) = result.error {
        return Err(TrainError::Training(error.to_string()));
    }
    Ok(TrainOutcome {
        model: model.model.materialize(),
        steps,
        seconds,
        interrupted,
    })
}

/// Writes the run's settings next to its checkpoints (a resumed run appends nothing new).
fn write_settings(config: &TrainConfig) -> Result<()> {
    let path = config.out_dir.join("train_config.json");
    let text = serde_json::to_string_pretty(config)
        .map_err(|e| TrainError::Config(format!("serialising settings: {e}")))?;
    let tmp = config.out_dir.join(".train_config.json.tmp");
    std::fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, e))
}

/// Exports a model folder in the official layout: `config.json`, `model.safetensors` and the
/// tokenizer, so `phantom-infer` and the official code load it.
pub fn export(model: &PhantomModel, tokenizer: &Path, dir: &Path) -> Result<()> {
    save_model(model, dir)?;
    let target = dir.join("tokenizer.json");
    if tokenizer != target {
        let tmp = dir.join(".tokenizer.json.tmp");
        std::fs::copy(tokenizer, &tmp).map_err(|e| TrainError::io(tokenizer, e))?;
        std::fs::rename(&tmp, &target).map_err(|e| TrainError::io(&target, e))?;
    }
    Ok(())
}
