//! Decoder self-attention with the phantom dimension, shared by every backbone.
//!
//! The backbones differ only in how q, k and v come out of the projections (separate, fused
//! `[Q|K|V]`, or InternLM2's per-KV-head groups); everything after that is one code path:
//! RoPE → phantom vectors → widen to 2d → causal attention over the cache → gate → `o_proj`.

use burn::prelude::*;
use burn::tensor::activation::softmax;

use super::rope::{RopeTables, apply_rope};
use crate::cache::LayerCache;
use crate::config::{Backbone, LlmConfig};
use crate::linear::{Linear, LinearConfig, linear};
use crate::phantom::{PhantomDimension, PhantomVectors};

/// Tensors recorded inside one attention layer, for comparing a port tensor by tensor.
#[derive(Clone, Debug, Default)]
pub struct AttentionTrace {
    /// `η·Xq(q, q̂)`, `[B, T, H, d]`.
    pub xattn_query: Option<Tensor<4>>,
    /// `η·Xk(k, k̂)` of the new tokens, `[B, T, H_kv, d]`.
    pub xattn_key: Option<Tensor<4>>,
    /// `v + η·Xv(v, v̂)` of the new tokens, `[B, T, H_kv, d]`.
    pub xattn_value: Option<Tensor<4>>,
    /// Gate logit of the plain half, `[B, T, H, 1]`.
    pub gate_1: Option<Tensor<4>>,
    /// Gate logit of the phantom half, `[B, T, H, 1]`.
    pub gate_2: Option<Tensor<4>>,
    /// The phantom vectors in use.
    pub phantom: Option<PhantomVectors>,
    /// The block output after `o_proj`, `[B, T, D]`.
    pub out: Option<Tensor<3>>,
}

/// One call's view of the cache: which keys each query may see.
#[derive(Clone, Debug)]
pub struct AttentionMask {
    /// `[B, 1, 1, T, S]`, true where the key is hidden (future or padding); `None` when every
    /// query sees every key (a decode step without padding).
    pub hidden: Option<Tensor<5, Bool>>,
}

/// `softmax(q · kᵀ · scale + mask) · v` of the queries `[B, H_kv, R, 2d]` (R = g·t: the g
/// query heads of each KV head over the t new tokens) over the cache: the CPU kernel on flex,
/// Burn's batched products elsewhere.
fn attend(q: Tensor<4>, cache: &LayerCache, mask: &AttentionMask, scale: f64) -> Tensor<4> {
    #[cfg(feature = "cpu-kernels")]
    {
        let (k, v) = cache.buffers();
        let hidden = mask.hidden.as_ref();
        if let Some(o) = crate::kernels::attend::attend(&q, k, v, cache.len(), hidden, scale as f32)
        {
            return o;
        }
    }
    let [b, hkv, rows, _] = q.dims();
    let s = cache.len();
    let scores = q.matmul(cache.keys().swap_dims(2, 3)).mul_scalar(scale);
    let scores = match &mask.hidden {
        Some(hidden) => {
            let t = hidden.dims()[3];
            // The lowest value of the scores' own dtype (libtorch refuses one that overflows it).
            let lowest = match scores.dtype() {
                burn::tensor::DType::F16 => f64::from(half::f16::MIN.to_f32()),
                burn::tensor::DType::BF16 => f64::from(half::bf16::MIN.to_f32()),
                _ => f64::from(f32::MIN),
            };
            scores
                .reshape([b, hkv, rows / t, t, s])
                .mask_fill(hidden.clone(), lowest)
                .reshape([b, hkv, rows, s])
        }
        None => scores,
    };
    softmax(scores, 3).matmul(cache.values())
}

/// What every layer of one forward call shares: positions, visibility, phantom tokens.
#[derive(Clone, Copy, Debug)]
pub struct StepContext<'a> {
    /// RoPE tables of the new tokens.
    pub rope: &'a RopeTables,
    /// Which keys each new token sees.
    pub mask: &'a AttentionMask,
    /// Each row's phantom token among the new tokens; read when the cache holds no phantom
    /// vectors yet (the prefill).
    pub phantom_positions: &'a [usize],
    /// Positions a new cache is sized for.
    pub reserve: usize,
}

/// The separate query, key and value projections (Qwen2).
#[derive(Module, Debug)]
pub struct SplitQkv {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
}

/// How a backbone lays out its query, key and value projections.
// One per layer, built once at load: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum QkvProjection {
    /// Three projections (Qwen2 `q_proj`, `k_proj`, `v_proj`).
    Split(SplitQkv),
    /// One projection whose rows are `[Q | K | V]` (Phi-3 `qkv_proj`).
    Fused(Linear),
    /// One projection whose rows are grouped per KV head, `[q_0 … q_{g-1}, k, v]` for each
    /// (InternLM2 `wqkv`).
    Grouped(Linear),
}

impl QkvProjection {
    /// Every linear layer of the projection.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Self::Split(split) => vec![&mut split.q_proj, &mut split.k_proj, &mut split.v_proj],
            Self::Fused(fused) | Self::Grouped(fused) => vec![fused],
        }
    }
}

/// Phantom self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query, key and value projections.
    pub qkv: QkvProjection,
    /// Output projection.
    pub o_proj: Linear,
    /// The phantom modules.
    pub phantom: PhantomDimension,
    /// Query heads H.
    pub num_heads: usize,
    /// Key/value heads H_kv.
    pub num_kv_heads: usize,
    /// Head width d.
    pub head_dim: usize,
}

impl Attention {
    /// A fresh layer shaped by `config`.
    pub fn new(config: &LlmConfig, eta: f64, device: &Device) -> Self {
        let (h, hkv, d, hidden) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim(),
            config.hidden_size,
        );
        let lin = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let fused = || lin(hidden, (h + 2 * hkv) * d, config.qkv_bias);
        let qkv = match config.backbone {
            Backbone::Qwen2 => QkvProjection::Split(SplitQkv {
                q_proj: lin(hidden, h * d, config.qkv_bias),
                k_proj: lin(hidden, hkv * d, config.qkv_bias),
                v_proj: lin(hidden, hkv * d, config.qkv_bias),
            }),
            Backbone::Phi3 => QkvProjection::Fused(fused()),
            Backbone::InternLm2 => QkvProjection::Grouped(fused()),
        };
        Self {
            qkv,
            o_proj: lin(h * d, hidden, config.o_bias),
            phantom: PhantomDimension::new(d, eta, device),
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
        }
    }

    /// q `[B, T, H, d]`, k and v `[B, T, H_kv, d]`, before RoPE.
    pub fn project(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, t, _] = x.dims();
        let (h, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        match &self.qkv {
            QkvProjection::Split(split) => (
                linear(&split.q_proj, x.clone()).reshape([b, t, h, d]),
                linear(&split.k_proj, x.clone()).reshape([b, t, hkv, d]),
                linear(&split.v_proj, x).reshape([b, t, hkv, d]),
            ),
            QkvProjection::Grouped(fused) => {
                let g = h / hkv;
                let all = linear(fused, x).reshape([b, t, hkv, g + 2, d]);
                let q = all.clone().narrow(3, 0, g).reshape([b, t, h, d]);
                let k = all.clone().narrow(3, g, 1).reshape([b, t, hkv, d]);
                let v = all.narrow(3, g + 1, 1).reshape([b, t, hkv, d]);
                (q, k, v)
            }
            QkvProjection::Fused(fused) => {
                let all = linear(fused, x);
                let q = all.clone().narrow(2, 0, h * d).reshape([b, t, h, d]);
                let k = all
                    .clone()
                    .narrow(2, h * d, hkv * d)
                    .reshape([b, t, hkv, d]);
                let v = all
                    .narrow(2, (h + hkv) * d, hkv * d)
                    .reshape([b, t, hkv, d]);
                (q, k, v)
            }
        }
    }

    /// Attends the `T` new tokens `x` (`[B, T, D]`) over the cache plus themselves, and
    /// appends their keys and values to `cache`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        step: &StepContext<'_>,
        cache: &mut Option<LayerCache>,
        trace: Option<&mut AttentionTrace>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = self.project(x);
        let q = apply_rope(q, step.rope);
        let k = apply_rope(k, step.rope);

        let phantom = match cache {
            Some(layer) => layer.phantom.clone(),
            None => PhantomVectors::take(&q, &k, &v, step.phantom_positions),
        };

        // Widen to 2d. Keys and values are widened on their own H_kv heads: XAttention is a
        // softmax over heads, so duplicating every KV head (GQA) would leave it unchanged.
        let q_wide = self.phantom.widen_query(q.clone(), &phantom);
        let k_wide = self.phantom.widen_key(k, &phantom);
        let v_wide = self.phantom.widen_value(v, &phantom);

        // The cache keeps the widened keys and values: their phantom halves depend only on the
        // token itself and the sequence's fixed phantom vectors, so they never change.
        let k_new = k_wide.clone().swap_dims(1, 2);
        let v_new = v_wide.clone().swap_dims(1, 2);
        let layer = match cache.take() {
            Some(layer) => layer.append(k_new, v_new),
            None => LayerCache::new(k_new, v_new, phantom.clone(), step.reserve),
        };
        // GQA without copying keys: the g query heads of a KV head share its key matrix.
        let g = h / hkv;
        let q_heads = q_wide
            .clone()
            .swap_dims(1, 2)
            .reshape([b, hkv, g * t, 2 * d]);
        // The scale uses the original head width d, as the released code does.
        let scale = 1.0 / (d as f64).sqrt();
        let o = attend(q_heads, &layer, step.mask, scale)
            .reshape([b, h, t, 2 * d])
            .swap_dims(1, 2);

        let folded = self.phantom.fold(o.clone());
        let out = linear(&self.o_proj, folded.reshape([b, t, h * d]));

        if let Some(trace) = trace {
            let o1 = o.clone().narrow(3, 0, d);
            let o2 = o.narrow(3, d, d);
            let (g1, g2) = self.phantom.gate_logits(o1, o2);
            trace.xattn_query = Some(q_wide.narrow(3, d, d));
            trace.xattn_key = Some(k_wide.narrow(3, d, d));
            trace.xattn_value = Some(v_wide.narrow(3, d, d));
            trace.gate_1 = Some(g1);
            trace.gate_2 = Some(g2);
            trace.phantom = Some(phantom.clone());
            trace.out = Some(out.clone());
        }

        *cache = Some(layer);
        out
    }
}
