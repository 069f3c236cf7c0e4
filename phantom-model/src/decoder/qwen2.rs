//! Qwen2 (Phantom-0.5B): the decoder modules already carry the official names
//! (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`, …); only the
//! grouping modules (`qkv`, `gate_up`, `phantom`) sit between them and the layer here.

/// `(module path, official path)` renames, matched with a dot on each side, in order.
pub const OFFICIAL_NAMES: &[(&str, &str)] = &[
    (".self_attn.qkv.", ".self_attn."),
    (".self_attn.phantom.", ".self_attn."),
    (".mlp.gate_up.", ".mlp."),
];
