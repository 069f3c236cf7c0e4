//! The small Phantom the demo trains from scratch: the real architecture (InternViT, pixel
//! shuffle, projector, Qwen2 decoder with phantom attention) at toy width.

use phantom_model::PhantomConfig;
use phantom_model::processor::tokenizer::Tokenizer;
use serde_json::json;

use crate::error::Result;

/// Side of the demo's images and of the vision tower's tile: an 8×8 grid of 14-pixel
/// patches, 16 vision tokens after the pixel shuffle.
pub const IMAGE_SIZE: usize = 112;

/// `config.json` of the demo model for `tokenizer`, with phantom weight `eta`.
///
/// Trained from scratch, the phantom branch needs a weight near 1 to matter at all (the
/// released models use 1e-4 on top of a pretrained LLM); η = 0 turns it off.
pub fn config(tokenizer: &Tokenizer, eta: f64) -> Result<PhantomConfig> {
    let image_token = tokenizer.require_special("<IMG_CONTEXT>")?;
    let eos = tokenizer.require_special("<|im_end|>")?;
    let json = json!({
        "architectures": ["PhantomForCausalLM"],
        "model_type": "phantom",
        "downsample_ratio": 0.5,
        "image_token_index": image_token,
        "eos_token_id": eos,
        "phantom_eta": eta,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 14,
            "num_channels": 3,
            "layer_norm_eps": 1e-6,
            "norm_type": "layer_norm",
            "qkv_bias": true,
            "qk_normalization": false,
            "hidden_act": "gelu",
            "initializer_factor": 1.0
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "vocab_size": tokenizer.vocab_size(),
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": true,
            "hidden_act": "silu",
            "use_sliding_window": false,
            "eos_token_id": eos
        }
    });
    Ok(PhantomConfig::from_json(&json.to_string())?)
}
