//! The shapes of the released Phantom family, as `config.json` documents, for building
//! randomly initialised models of the real sizes (benchmarks, synthetic checkpoints, tests).
//!
//! Layer counts and widths are those of the backbones (spec §2.6). Token ids that only the
//! released tokenizers fix (`image_token_index`, eos) are plausible stand-ins: a synthetic
//! checkpoint built from a preset is for measuring and plumbing, not for chatting.

use serde_json::{Value, json};

use crate::config::PhantomConfig;
use crate::error::{PhantomError, Result};

/// The sizes of the family.
pub const SIZES: [&str; 4] = ["0.5b", "1.8b", "3.8b", "7b"];

fn vision() -> Value {
    json!({
        "architectures": ["InternVisionModel"],
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "image_size": 448,
        "patch_size": 14,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
        "norm_type": "layer_norm",
        "qkv_bias": true,
        "qk_normalization": false,
        "hidden_act": "gelu",
        "use_flash_attn": false
    })
}

/// `config.json` of a Phantom model of `size` (`0.5b`, `1.8b`, `3.8b`, `7b`), or `None`.
pub fn config_json(size: &str) -> Option<Value> {
    let (llm, image_token, eos) = match size.to_ascii_lowercase().as_str() {
        "0.5b" => (
            json!({
                "architectures": ["Qwen2ForCausalLM"],
                "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
                "intermediate_size": 4864, "num_hidden_layers": 24, "vocab_size": 151936,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                "tie_word_embeddings": true, "hidden_act": "silu", "use_sliding_window": false
            }),
            151648,
            151645,
        ),
        "1.8b" => (
            json!({
                "architectures": ["InternLM2ForCausalLM"],
                "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8,
                "intermediate_size": 8192, "num_hidden_layers": 24, "vocab_size": 92553,
                "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                "rope_scaling": {"type": "dynamic", "factor": 2.0},
                "tie_word_embeddings": false, "bias": false, "hidden_act": "silu"
            }),
            92546,
            92542,
        ),
        "3.8b" => (
            json!({
                "architectures": ["Phi3ForCausalLM"],
                "hidden_size": 3072, "num_attention_heads": 32, "num_key_value_heads": 32,
                "intermediate_size": 8192, "num_hidden_layers": 32, "vocab_size": 32064,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                "original_max_position_embeddings": 4096, "sliding_window": 4096,
                "tie_word_embeddings": false, "hidden_act": "silu"
            }),
            32013,
            32007,
        ),
        "7b" => (
            json!({
                "architectures": ["InternLM2ForCausalLM"],
                "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                "intermediate_size": 14336, "num_hidden_layers": 32, "vocab_size": 92553,
                "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                "rope_scaling": {"type": "dynamic", "factor": 2.0},
                "tie_word_embeddings": false, "bias": false, "hidden_act": "silu"
            }),
            92546,
            92542,
        ),
        _ => return None,
    };
    Some(json!({
        "architectures": ["PhantomForCausalLM"],
        "model_type": "phantom",
        "vision_config": vision(),
        "llm_config": llm,
        "downsample_ratio": 0.5,
        "image_token_index": image_token,
        "eos_token_id": eos,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 6,
        "use_thumbnail": true,
        "force_image_size": 448,
        "torch_dtype": "bfloat16"
    }))
}

/// The validated configuration of a Phantom model of `size`.
pub fn config(size: &str) -> Result<PhantomConfig> {
    let json = config_json(size).ok_or_else(|| {
        PhantomError::Config(format!(
            "unknown model size `{size}`; expected one of {SIZES:?}"
        ))
    })?;
    PhantomConfig::from_json(&json.to_string())
}
