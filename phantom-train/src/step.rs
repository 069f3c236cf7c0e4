//! The Phantom Optimization step as a Burn `TrainStep` / `InferenceStep`.
//!
//! [`PoModel`] wraps a [`PhantomModel`] with the loss settings. Its training step scores the
//! chosen (and rejected) answers, builds the loss, and returns the gradients scaled by
//! `1 / accumulation`, so Burn's summing gradient accumulator yields their average. Its
//! optimizer step clips the gradient by its global norm before AdamW.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use burn::module::{ModuleVisitor, Param};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::train::{InferenceStep, Interrupter, ItemLazy, TrainOutput, TrainStep};
use phantom_model::PhantomModel;

use crate::batch::{PreferenceBatch, answer_logps};
use crate::loss::{LossTerms, PreferenceLoss};

/// What one step measured, on the host (the metrics read it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    /// The optimised loss.
    pub loss: f64,
    /// Cross-entropy of the chosen answers.
    pub sft_loss: f64,
    /// The preference term (`None` for SFT).
    pub pref_loss: Option<f64>,
    /// Mean `β·avglogp(y+)`.
    pub reward_chosen: f64,
    /// Mean `β·avglogp(y−)`.
    pub reward_rejected: Option<f64>,
    /// Mean chosen − rejected reward.
    pub reward_margin: Option<f64>,
    /// Share of triples whose chosen reward beats the rejected one.
    pub reward_accuracy: Option<f64>,
    /// Mean `avglogp(y+)`.
    pub logp_chosen: f64,
    /// Mean `avglogp(y−)`.
    pub logp_rejected: Option<f64>,
    /// Global gradient norm (before clipping) of the latest optimizer step.
    pub grad_norm: Option<f64>,
    /// Tokens the model processed.
    pub tokens: usize,
    /// Triples in the batch.
    pub triples: usize,
}

impl ItemLazy for StepStats {
    fn sync(self) -> Result<Self, burn::tensor::ExecutionError> {
        Ok(self)
    }
}

/// State shared by every clone of a [`PoModel`] during a run.
#[derive(Default)]
pub struct StepShared {
    /// Global norm of the last optimizer step's gradient, before clipping.
    pub last_grad_norm: Option<f64>,
    /// The first error or non-finite value met; the run stops on it.
    pub failure: Option<String>,
    /// Stops the learner when a step fails.
    pub interrupter: Option<Interrupter>,
}

/// Loss and optimisation settings carried by the model through Burn's learner.
#[derive(Clone)]
pub struct StepSettings {
    /// The loss.
    pub loss: PreferenceLoss,
    /// Micro-batches per optimizer step; the loss is divided by it.
    pub accumulation: usize,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
    /// Run-wide state.
    pub shared: Arc<Mutex<StepShared>>,
}

impl fmt::Debug for StepSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepSettings")
            .field("loss", &self.loss)
            .field("accumulation", &self.accumulation)
            .field("max_grad_norm", &self.max_grad_norm)
            .finish()
    }
}

impl StepSettings {
    /// Settings with fresh shared state.
    pub fn new(loss: PreferenceLoss, accumulation: usize, max_grad_norm: Option<f64>) -> Self {
        Self {
            loss,
            accumulation: accumulation.max(1),
            max_grad_norm,
            shared: Arc::default(),
        }
    }

    fn with_shared<T>(&self, f: impl FnOnce(&mut StepShared) -> T) -> T {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut shared)
    }

    /// Records a failure and asks the learner to stop.
    pub fn fail(&self, message: String) {
        self.with_shared(|s| {
            if s.failure.is_none() {
                s.failure = Some(message.clone());
            }
            if let Some(interrupter) = &s.interrupter {
                interrupter.stop(Some(&message));
            }
        });
    }

    /// The failure that stopped the run, if any.
    pub fn failure(&self) -> Option<String> {
        self.with_shared(|s| s.failure.clone())
    }
}

/// A Phantom model being trained with Phantom Optimization (or an ablation of it).
#[derive(Module, Debug)]
pub struct PoModel {
    /// The model; its parameter paths are those of [`PhantomModel`] under `model.`.
    pub model: PhantomModel,
    /// Loss and step settings.
    #[module(skip)]
    pub settings: StepSettings,
}

impl PoModel {
    /// Wraps `model`.
    pub fn new(model: PhantomModel, settings: StepSettings) -> Self {
        Self { model, settings }
    }

    /// Scores a batch and computes the loss.
    pub fn loss_terms(&self, batch: &PreferenceBatch) -> crate::error::Result<LossTerms> {
        let with_rejected = self.settings.loss.objective.uses_rejected();
        let logps = answer_logps(&self.model, batch, with_rejected)?;
        Ok(self.settings.loss.compute(&logps))
    }

    /// Reads the loss terms back to the host. Fails on NaN or infinite values.
    fn stats(&self, terms: &LossTerms, batch: &PreferenceBatch) -> Result<StepStats, String> {
        let beta = self.settings.loss.beta;
        let scalar = |t: &Tensor<1>| -> f64 { t.clone().into_scalar::<f64>() };
        let values = |t: &Tensor<1>| -> Vec<f64> {
            t.clone()
                .into_data()
                .convert::<f64>()
                .try_into_vec::<f64>()
                .unwrap_or_default()
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let chosen = values(&terms.logps_chosen);
        let rejected = terms.logps_rejected.as_ref().map(values);
        let stats = StepStats {
            loss: scalar(&terms.loss),
            sft_loss: scalar(&terms.sft_loss),
            pref_loss: terms.pref_loss.as_ref().map(scalar),
            reward_chosen: beta * mean(&chosen),
            reward_rejected: rejected.as_ref().map(|r| beta * mean(r)),
            reward_margin: rejected.as_ref().map(|r| beta * (mean(&chosen) - mean(r))),
            reward_accuracy: rejected.as_ref().map(|r| {
                let wins = chosen.iter().zip(r).filter(|(c, r)| c > r).count();
                wins as f64 / chosen.len().max(1) as f64
            }),
            logp_chosen: mean(&chosen),
            logp_rejected: rejected.as_ref().map(|r| mean(r)),
            grad_norm: self.settings.with_shared(|s| s.last_grad_norm),
            tokens: batch.tokens(self.settings.loss.objective.uses_rejected()),
            triples: batch.items.len(),
        };
        if !stats.loss.is_finite() {
            return Err(format!(
                "the loss became {} (sft_loss {}, pref_loss {:?}); stopping and keeping the last \
                 good checkpoint. Lower the learning rate or check the data.",
                stats.loss, stats.sft_loss, stats.pref_loss
            ));
        }
        Ok(stats)
    }

    fn failed_stats(batch: &PreferenceBatch) -> StepStats {
        StepStats {
            loss: f64::NAN,
            triples: batch.items.len(),
            ..StepStats::default()
        }
    }
}

impl TrainStep for PoModel {
    type Input = PreferenceBatch;
    type Output = StepStats;

    fn step(&self, batch: PreferenceBatch) -> TrainOutput<StepStats> {
        let terms = match self.loss_terms(&batch) {
            Ok(terms) => terms,
            Err(e) => {
                self.settings.fail(e.to_string());
                return TrainOutput {
                    grads: GradientsParams::new(),
                    item: Self::failed_stats(&batch),
                };
            }
        };
        match self.stats(&terms, &batch) {
            Ok(stats) => {
                let scale = 1.0 / self.settings.accumulation as f64;
                let grads = terms.loss.mul_scalar(scale).backward();
                TrainOutput::new(self, grads, stats)
            }
            Err(message) => {
                self.settings.fail(message);
                TrainOutput {
                    grads: GradientsParams::new(),
                    item: Self::failed_stats(&batch),
                }
            }
        }
    }

    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        mut grads: GradientsParams,
    ) -> Self {
        if grads.is_empty() {
            // A failed step: leave the weights as they are.
            return self;
        }
        let norm = global_grad_norm(&self, &grads);
        self.settings.with_shared(|s| s.last_grad_norm = Some(norm));
        if !norm.is_finite() {
            self.settings.fail(format!(
                "the gradient norm became {norm}; stopping and keeping the last good checkpoint"
            ));
            return self;
        }
        if let Some(max) = self.settings.max_grad_norm
            && norm > max
        {
            scale_grads(&self, &mut grads, max / (norm + 1e-6));
        }
        optim.step(lr, self, grads)
    }
}

impl InferenceStep for PoModel {
    type Input = PreferenceBatch;
    type Output = StepStats;

    fn step(&self, batch: PreferenceBatch) -> StepStats {
        match self
            .loss_terms(&batch)
            .map_err(|e| e.to_string())
            .and_then(|terms| self.stats(&terms, &batch))
        {
            Ok(stats) => stats,
            Err(message) => {
                self.settings.fail(message);
                Self::failed_stats(&batch)
            }
        }
    }
}

/// `sqrt(Σ‖g‖²)` over every parameter that has a gradient.
pub fn global_grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let sq = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + sq,
                    None => sq,
                });
            }
        }
    }
    let mut visitor = SumSquares { grads, total: None };
    module.visit(&mut visitor);
    visitor.total.map_or(0.0, |t| t.into_scalar::<f64>().sqrt())
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads<M: Module>(module: &M, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    module.visit(&mut Scale { grads, factor });
}
