//! Phantom vision-language models (Lee et al., arXiv 2409.14713) on Burn.
//!
//! The crate reads like the model: [`processor`] turns images and questions into inputs,
//! [`vision`] and [`projector`] turn tiles into tokens, [`decoder`] runs the language model
//! whose attention carries the [`phantom`] dimension, and [`model`] ties them together.
//! [`weights`] loads and saves the official checkpoints; [`device`] picks a backend at run time.

pub mod activation;
pub mod cache;
pub mod config;
pub mod decoder;
pub mod device;
pub mod error;
#[cfg(feature = "cpu-kernels")]
pub mod kernels;
pub mod linear;
pub mod model;
pub mod packed;
pub mod phantom;
pub mod presets;
pub mod processor;
pub mod projector;
pub mod quantize;
#[cfg(test)]
mod testing;
pub mod vision;
pub mod weights;

pub use cache::KvCache;
pub use config::PhantomConfig;
pub use error::{PhantomError, Result};
pub use model::{ModelInput, PhantomModel};
pub use weights::{
    LoadOptions, WeightLoader, cast_parameters, load_model, load_model_with_progress,
    quantize_parameters, save_model, save_model_as, split_into_shards,
};
