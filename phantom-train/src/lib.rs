//! Phantom Optimization for Phantom vision-language models on Burn.
//!
//! data (preference triples) → [`batch`] (chosen/rejected sequences sharing a prompt) →
//! [`loss`] (SFT + reference-free preference term) → [`step`] (Burn `TrainStep`) →
//! [`trainer`] (Burn's learner: schedule, dashboard, atomic checkpoints, resume, export).
//! [`demo`] trains a small Phantom from scratch on generated pictures of shapes.

pub mod batch;
pub mod checkpoint;
pub mod data;
pub mod demo;
pub mod error;
pub mod loader;
pub mod loss;
pub mod metrics;
pub mod renderer;
pub mod stage;
pub mod step;
pub mod trainer;

pub use error::{Result, TrainError};
pub use loss::{Objective, PreferenceLoss};
pub use stage::Stage;
pub use trainer::{Dashboard, TrainConfig, TrainOutcome, train};
