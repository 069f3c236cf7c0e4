//! InternLM2 (Phantom-1.8B and -7B): its own names for every decoder part, and a fused `wqkv`
//! whose output rows are grouped per KV head as `[q_0 … q_{g−1}, k, v]` (split in
//! [`Attention::project`](super::attention::Attention::project)).

/// `(module path, official path)` renames, matched with a dot on each side, in order.
pub const OFFICIAL_NAMES: &[(&str, &str)] = &[
    (".self_attn.qkv.", ".attention.wqkv."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".self_attn.phantom.", ".attention."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".mlp.gate_up.gate_proj.", ".feed_forward.w1."),
    (".mlp.gate_up.up_proj.", ".feed_forward.w3."),
    (".mlp.down_proj.", ".feed_forward.w2."),
    (".embed_tokens.", ".tok_embeddings."),
    (".language_model.lm_head.", ".language_model.output."),
];
