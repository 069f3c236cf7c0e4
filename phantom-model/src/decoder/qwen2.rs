//! Qwen2 (Phantom-0.5B): the decoder modules already carry the official names
//! (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`, …); only the
//! phantom modules sit one level deeper here than in the checkpoints.

/// `(official pattern, module path)` rewrites applied when loading.
pub const LOAD_RENAMES: &[(&str, &str)] = &[(
    r"\.self_attn\.(xattn_\w+_phantom|gating_phantom_\d)\.",
    ".self_attn.phantom.${1}.",
)];

/// `(module pattern, official path)` rewrites applied when saving.
pub const SAVE_RENAMES: &[(&str, &str)] = &[(r"\.self_attn\.phantom\.", ".self_attn.")];
