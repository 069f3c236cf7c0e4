//! InternLM2 (Phantom-1.8B and -7B): its own names for every decoder part, and a fused `wqkv`
//! whose output rows are grouped per KV head as `[q_0 … q_{g−1}, k, v]` (split in
//! [`Attention::project`](super::attention::Attention::project)).

/// `(official pattern, module path)` rewrites applied when loading.
pub const LOAD_RENAMES: &[(&str, &str)] = &[
    (
        r"\.attention\.(xattn_\w+_phantom|gating_phantom_\d)\.",
        ".self_attn.phantom.${1}.",
    ),
    (r"\.attention\.wqkv\.", ".self_attn.qkv_proj."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.tok_embeddings\.", ".embed_tokens."),
    (r"^language_model\.output\.", "language_model.lm_head."),
];

/// `(module pattern, official path)` rewrites applied when saving.
pub const SAVE_RENAMES: &[(&str, &str)] = &[
    (r"\.self_attn\.phantom\.", ".attention."),
    (r"\.self_attn\.qkv_proj\.", ".attention.wqkv."),
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
    (r"\.embed_tokens\.", ".tok_embeddings."),
    (r"^language_model\.lm_head\.", "language_model.output."),
];
