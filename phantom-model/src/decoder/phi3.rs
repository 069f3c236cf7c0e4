//! Phi-3 (Phantom-3.8B): fused `qkv_proj` laid out as `[Q | K | V]` and fused
//! `gate_up_proj = [gate | up]`; otherwise Qwen2's names, without biases and with an untied
//! `lm_head`. The fused layouts are split in [`Attention::project`] and [`Mlp::forward`].
//!
//! [`Attention::project`]: super::attention::Attention::project
//! [`Mlp::forward`]: super::mlp::Mlp::forward

/// `(module path, official path)` renames, matched with a dot on each side, in order.
pub const OFFICIAL_NAMES: &[(&str, &str)] = &[
    (".self_attn.qkv.", ".self_attn.qkv_proj."),
    (".self_attn.phantom.", ".self_attn."),
    (".mlp.gate_up.", ".mlp.gate_up_proj."),
];
