//! Generation with Phantom models and the tools people use them through.
//!
//! [`session`] runs a batch through prefill and cached decode steps; [`generate`] is the one
//! generation loop (greedy, sampling, beams, stop rules, streaming) that the CLI, a server and
//! the browser share; [`chat`] adds the tokenizer, template and image processor around it;
//! [`io`] reads and writes the token-level safetensors files of the CLI.
//!
//! Each step that reads the device back is an `async` function (`*_async`), so that a browser's
//! WebGPU can run it; the plain functions wrap them with [`blocking::block_on`] for native
//! callers.

pub mod batch;
pub mod blocking;
pub mod chat;
pub mod generate;
pub mod io;
pub mod session;

pub use chat::Chat;
pub use generate::{Generation, GenerationConfig, TokenEvent, generate, generate_async};
pub use session::{Session, Timings};
