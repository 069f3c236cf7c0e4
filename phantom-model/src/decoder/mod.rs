//! The language model: token embeddings → decoder layers with phantom attention → final norm
//! → `lm_head`. One implementation serves every backbone; the per-backbone files only describe
//! how the official checkpoints name and lay out the weights.

pub mod attention;
pub mod internlm2;
pub mod mlp;
pub mod phi3;
pub mod qwen2;
pub mod rope;

use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;

use crate::cache::KvCache;
use crate::config::LlmConfig;
use crate::linear::{Embedding, Linear, LinearConfig};
use attention::{Attention, AttentionMask, AttentionTrace, StepContext};
use mlp::Mlp;
use rope::Rope;

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Phantom self-attention.
    pub self_attn: Attention,
    /// SwiGLU MLP.
    pub mlp: Mlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(config: &LlmConfig, eta: f64, device: &Device) -> Self {
        let norm = || {
            RmsNormConfig::new(config.hidden_size)
                .with_epsilon(config.rms_norm_eps)
                .init(device)
        };
        Self {
            self_attn: Attention::new(config, eta, device),
            mlp: Mlp::new(
                config.hidden_size,
                config.intermediate_size,
                config.backbone == crate::config::Backbone::Phi3,
                device,
            ),
            input_layernorm: norm(),
            post_attention_layernorm: norm(),
        }
    }
}

/// Embeddings, layers and final norm (`language_model.model` in the checkpoints).
#[derive(Module, Debug)]
pub struct DecoderModel {
    /// Token embeddings `[V, D]`.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final RMSNorm.
    pub norm: RmsNorm,
}

/// The decoder LLM with its head (`language_model` in the checkpoints).
#[derive(Module, Debug)]
pub struct CausalLm {
    /// Embeddings, layers, final norm.
    pub model: DecoderModel,
    /// Output head; `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
}

/// Per-layer traces of one forward.
pub type DecoderTrace = Vec<AttentionTrace>;

impl CausalLm {
    /// A randomly initialised decoder shaped by `config`.
    pub fn new(config: &LlmConfig, eta: f64, device: &Device) -> Self {
        let model = DecoderModel {
            embed_tokens: Embedding::new(config.vocab_size, config.hidden_size, device),
            layers: (0..config.num_hidden_layers)
                .map(|_| DecoderLayer::new(config, eta, device))
                .collect(),
            norm: RmsNormConfig::new(config.hidden_size)
                .with_epsilon(config.rms_norm_eps)
                .init(device),
        };
        let lm_head = (!config.tie_word_embeddings).then(|| {
            LinearConfig::new(config.hidden_size, config.vocab_size)
                .with_bias(false)
                .init(device)
        });
        Self { model, lm_head }
    }

    /// Token embeddings of `ids` (`[B, T]` → `[B, T, D]`), in the dtype the decoder computes
    /// in (the table may be stored in half precision, see [`crate::LoadOptions::weights`]).
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let embeds = self.model.embed_tokens.forward(ids);
        let dtype = self.model.norm.gamma.val().dtype();
        if embeds.dtype() == dtype {
            embeds
        } else {
            embeds.cast(dtype)
        }
    }

    /// Runs the layers over `T` new positions per row and returns the final-norm hidden states
    /// `[B, T, D]`, extending `cache`.
    ///
    /// `new_mask[b][i]` says whether new token `i` of row `b` is real (left padding is false).
    /// On the first call the phantom token of each row is its first real token.
    pub fn forward(
        &self,
        embeds: Tensor<3>,
        new_mask: &[Vec<bool>],
        rope: &Rope,
        cache: &mut KvCache,
        mut trace: Option<&mut DecoderTrace>,
    ) -> Tensor<3> {
        let device = embeds.device();
        let [b, t, _] = embeds.dims();
        let past = cache.len();
        let s = past + t;

        // Positions: each real token continues its row's count; pads sit at 1 (any value
        // works, they are masked), as the reference's cumsum(mask) − 1 convention gives.
        let mut positions = Vec::with_capacity(b);
        let mut phantom_positions = Vec::with_capacity(b);
        for (row, mask) in new_mask.iter().enumerate() {
            let mut next = cache.next_position[row];
            let mut pos = Vec::with_capacity(t);
            for &real in mask {
                if real {
                    pos.push(next);
                    next += 1;
                } else {
                    pos.push(1);
                }
            }
            cache.next_position[row] = next;
            phantom_positions.push(mask.iter().position(|&m| m).unwrap_or(0));
            positions.push(pos);
            cache.key_mask[row].extend_from_slice(mask);
        }

        // Query i (absolute index past+i) sees key j iff j ≤ past+i and key j is real. A pad
        // query also sees itself: a row of scores with every key hidden is a softmax of NaN in
        // half precision (the fill value is -inf there), and the NaN would reach the real
        // tokens through the pad's value vector in the next layer. A decode step without
        // padding sees every key: then there is no mask to build or apply.
        let hidden = (t > 1 || cache.has_padding()).then(|| {
            let mut hidden = Vec::with_capacity(b * t * s);
            for keys in &cache.key_mask {
                for i in 0..t {
                    let query = past + i;
                    hidden.extend(
                        keys.iter()
                            .enumerate()
                            .map(|(j, &real)| j != query && (!real || j > query)),
                    );
                }
            }
            Tensor::<5, Bool>::from_data(TensorData::new(hidden, [b, 1, 1, t, s]), &device)
        });
        let mask = AttentionMask { hidden };
        let tables = rope.tables(&positions, s, &device);
        let step = StepContext {
            rope: &tables,
            mask: &mask,
            phantom_positions: &phantom_positions,
            reserve: cache.reserve,
        };

        if let Some(trace) = trace.as_deref_mut() {
            trace.clear();
        }
        let mut x = embeds;
        for (index, layer) in self.model.layers.iter().enumerate() {
            let layer_trace = trace.as_deref_mut().map(|tr| {
                tr.push(AttentionTrace::default());
                tr.last_mut().expect("just pushed")
            });
            let attended = layer.self_attn.forward(
                layer.input_layernorm.forward(x.clone()),
                &step,
                &mut cache.layers[index],
                layer_trace,
            );
            x = x + attended;
            x = x.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(x));
        }
        self.model.norm.forward(x)
    }

    /// Logits `[B, T, V]` of final-norm hidden states.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => crate::linear::linear(head, hidden),
            None => {
                let [b, t, d] = hidden.dims();
                let table = &self.model.embed_tokens;
                let [v, _] = table.shape();
                crate::linear::tied_head(table, hidden.reshape([b * t, d])).reshape([b, t, v])
            }
        }
    }
}
