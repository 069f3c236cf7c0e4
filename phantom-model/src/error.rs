//! Errors of the model library.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while configuring, loading or running a Phantom model.
#[derive(Debug, thiserror::Error)]
pub enum PhantomError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is malformed or asks for something this port does not support.
    #[error("config: {0}")]
    Config(String),
    /// The checkpoint's tensors do not fit the model the config describes.
    #[error("checkpoint does not match the model:\n{0}")]
    Weights(String),
    /// The inputs handed to the model are inconsistent (shapes, ids, image count).
    #[error("invalid input: {0}")]
    Input(String),
    /// The requested backend is not compiled in or not available on this machine.
    #[error("device: {0}")]
    Device(String),
    /// An image could not be read or is unsuitable.
    #[error(transparent)]
    Image(#[from] crate::processor::image::ImageError),
    /// The tokenizer could not be loaded or lacks a token.
    #[error(transparent)]
    Tokenizer(#[from] crate::processor::tokenizer::TokenizerError),
    /// The conversation cannot be rendered into a prompt.
    #[error(transparent)]
    Prompt(#[from] crate::processor::prompt::PromptError),
}

impl PhantomError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// Result with [`PhantomError`].
pub type Result<T, E = PhantomError> = std::result::Result<T, E>;
