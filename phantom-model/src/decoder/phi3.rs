//! Phi-3 (Phantom-3.8B): fused `qkv_proj` laid out as `[Q | K | V]` and fused
//! `gate_up_proj = [gate | up]`; otherwise Qwen2's names, without biases and with an untied
//! `lm_head`. The fused layouts are split in [`Attention::project`] and [`Mlp::forward`].
//!
//! [`Attention::project`]: super::attention::Attention::project
//! [`Mlp::forward`]: super::mlp::Mlp::forward

/// `(official pattern, module path)` rewrites applied when loading.
pub const LOAD_RENAMES: &[(&str, &str)] = super::qwen2::LOAD_RENAMES;

/// `(module pattern, official path)` rewrites applied when saving.
pub const SAVE_RENAMES: &[(&str, &str)] = super::qwen2::SAVE_RENAMES;
