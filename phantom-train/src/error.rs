//! Errors of training.

use std::path::{Path, PathBuf};

use phantom_model::PhantomError;
use phantom_model::processor::image::ImageError;
use phantom_model::processor::prompt::PromptError;
use phantom_model::processor::tokenizer::TokenizerError;

/// Everything that can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model, its weights or its inputs.
    #[error(transparent)]
    Model(#[from] PhantomError),
    /// Reading the training data.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A record that cannot be turned into a training example.
    #[error("bad record: {0}")]
    Record(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Settings that cannot work together.
    #[error("invalid settings: {0}")]
    Config(String),
    /// A checkpoint to resume from is missing or unreadable.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The loss or a gradient became NaN or infinite.
    #[error("{0}")]
    NonFinite(String),
    /// The training loop stopped on an error.
    #[error("training failed: {0}")]
    Training(String),
}

impl TrainError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

impl From<ImageError> for TrainError {
    fn from(e: ImageError) -> Self {
        Self::Model(e.into())
    }
}

impl From<TokenizerError> for TrainError {
    fn from(e: TokenizerError) -> Self {
        Self::Model(e.into())
    }
}

impl From<PromptError> for TrainError {
    fn from(e: PromptError) -> Self {
        Self::Model(e.into())
    }
}

/// Result with [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
