//! Phantom in the browser.
//!
//! A `wasm-bindgen` surface (`api`, built for wasm32 only) over the same model, image
//! processor, tokenizer and generation loop as the native `phantom-infer` CLI. The backend is
//! chosen at run time (`backend`, wasm32 only): the browser's WebGPU when it offers an adapter,
//! otherwise Burn's flex CPU backend compiled to WebAssembly with SIMD.
//!
//! Weights arrive as downloaded safetensors buffers that stay in JavaScript memory;
//! [`checkpoint`] copies them into WebAssembly memory one slice at a time, so the weights exist
//! once there. [`memory`] refuses, with a message, a model that cannot fit WebAssembly's 4 GiB
//! or the adapter's buffer limits; [`image`] turns canvas pixels into the processor's input.

pub mod checkpoint;
pub mod error;
pub mod image;
pub mod memory;

#[cfg(target_arch = "wasm32")]
pub mod api;
#[cfg(target_arch = "wasm32")]
pub mod backend;

pub use error::{Result, WasmError};
