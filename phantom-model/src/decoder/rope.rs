//! Rotary position embedding (rotate-half convention), with the scaling variants the Phantom
//! backbones declare.

use burn::prelude::*;

use crate::config::{LlmConfig, RopeScaling};

/// cos/sin tables for the positions of one forward call, each `[B, T, 1, d]`.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// cos(pos·inv_freq), duplicated over both halves.
    pub cos: Tensor<4>,
    /// sin(pos·inv_freq), duplicated over both halves.
    pub sin: Tensor<4>,
}

/// RoPE of one backbone.
#[derive(Clone, Debug)]
pub struct Rope {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    max_position_embeddings: usize,
}

impl Rope {
    /// RoPE as `config` declares it.
    pub fn new(config: &LlmConfig) -> Self {
        Self {
            head_dim: config.head_dim(),
            theta: config.rope_theta,
            scaling: config.rope_scaling.clone(),
            max_position_embeddings: config.max_position_embeddings,
        }
    }

    /// Inverse frequencies (f32, as the reference computes them) and the factor applied to
    /// cos/sin, for a call whose cache will hold `kv_len` keys and whose largest position is
    /// `max_position`.
    fn frequencies(&self, kv_len: usize, max_position: i64) -> (Vec<f32>, f32) {
        let d = self.head_dim;
        let half = d / 2;
        let base_inv = |theta: f64| -> Vec<f32> {
            (0..half)
                .map(|i| {
                    // 1/θ^(2i/d) with the exponent and power in f32, as torch does.
                    let exponent = (2 * i) as f32 / d as f32;
                    1.0 / (theta as f32).powf(exponent)
                })
                .collect()
        };
        match &self.scaling {
            RopeScaling::None => (base_inv(self.theta), 1.0),
            RopeScaling::Dynamic { factor } => {
                let max = self.max_position_embeddings;
                if kv_len > max {
                    // NTK-aware: grow the base with the sequence.
                    let ratio = factor * kv_len as f64 / max as f64 - (factor - 1.0);
                    let theta = self.theta * ratio.powf(d as f64 / (d as f64 - 2.0));
                    (base_inv(theta), 1.0)
                } else {
                    (base_inv(self.theta), 1.0)
                }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
            } => {
                let orig = *original_max_position_embeddings;
                let factors = if max_position + 1 > orig as i64 {
                    long_factor
                } else {
                    short_factor
                };
                let inv = base_inv(self.theta)
                    .into_iter()
                    .zip(factors)
                    .map(|(f, ext)| (f as f64 / ext) as f32)
                    .collect();
                let scale = self.max_position_embeddings as f64 / orig as f64;
                let mscale = if scale <= 1.0 {
                    1.0
                } else {
                    (1.0 + scale.ln() / (orig as f64).ln()).sqrt()
                };
                (inv, mscale as f32)
            }
        }
    }

    /// Tables for `positions` (`B` rows of `T` positions each). `kv_len` is the length the
    /// cache will have after this call.
    pub fn tables(&self, positions: &[Vec<i64>], kv_len: usize, device: &Device) -> RopeTables {
        let b = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        let max_position = positions.iter().flatten().copied().max().unwrap_or(0);
        let (inv_freq, mscale) = self.frequencies(kv_len, max_position);
        let d = self.head_dim;
        let mut cos = Vec::with_capacity(b * t * d);
        let mut sin = Vec::with_capacity(b * t * d);
        for &p in positions.iter().flatten() {
            for _ in 0..2 {
                for &f in &inv_freq {
                    let angle = p as f32 * f;
                    cos.push(angle.cos() * mscale);
                    sin.push(angle.sin() * mscale);
                }
            }
        }
        let make = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, t, 1, d]), device);
        RopeTables {
            cos: make(cos),
            sin: make(sin),
        }
    }
}

/// Rotates `x` (`[B, T, heads, d]`) by the tables.
pub fn apply_rope(x: Tensor<4>, tables: &RopeTables) -> Tensor<4> {
    let d = x.dims()[3];
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * tables.cos.clone() + rotated * tables.sin.clone()
}
