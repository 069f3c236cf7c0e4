//! Errors of the browser bindings.

use phantom_model::PhantomError;

/// Everything that can go wrong between the page and the model.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The model, processor, tokenizer or generation refused the input.
    #[error(transparent)]
    Model(#[from] PhantomError),
    /// A safetensors buffer is malformed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The model does not fit the memory this backend can give it.
    #[error("the model does not fit: {0}")]
    DoesNotFit(String),
    /// The backend could not start.
    #[error("backend: {0}")]
    Backend(String),
    /// Pixels or options handed over by the page are inconsistent.
    #[error("invalid input: {0}")]
    Input(String),
}

/// Result with [`WasmError`].
pub type Result<T, E = WasmError> = std::result::Result<T, E>;
