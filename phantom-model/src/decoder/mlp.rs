//! The SwiGLU feed-forward block shared by every backbone: `down(silu(gate(x)) ⊙ up(x))`.

use burn::prelude::*;

use crate::activation::silu_mul;
use crate::linear::{Linear, LinearConfig, linear};

/// Separate gate and up projections (Qwen2, InternLM2).
#[derive(Module, Debug)]
pub struct SplitGateUp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
}

/// How a backbone lays out the gate and up projections.
#[derive(Module, Debug)]
pub enum GateUpProjection {
    /// Two projections.
    Split(SplitGateUp),
    /// One projection whose rows are `[gate | up]` (Phi-3 `gate_up_proj`).
    Fused(Linear),
}

impl GateUpProjection {
    /// Every linear layer of the projection.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Self::Split(split) => vec![&mut split.gate_proj, &mut split.up_proj],
            Self::Fused(fused) => vec![fused],
        }
    }
}

/// SwiGLU MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate and up projections.
    pub gate_up: GateUpProjection,
    /// Down projection.
    pub down_proj: Linear,
}

impl Mlp {
    /// A fresh MLP; `fused` selects Phi-3's layout.
    pub fn new(hidden: usize, intermediate: usize, fused: bool, device: &Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let gate_up = if fused {
            GateUpProjection::Fused(lin(hidden, 2 * intermediate))
        } else {
            GateUpProjection::Split(SplitGateUp {
                gate_proj: lin(hidden, intermediate),
                up_proj: lin(hidden, intermediate),
            })
        };
        Self {
            gate_up,
            down_proj: lin(intermediate, hidden),
        }
    }

    /// `[B, T, D] → [B, T, D]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (gate, up) = match &self.gate_up {
            GateUpProjection::Fused(fused) => {
                let both = linear(fused, x);
                let i = both.dims()[2] / 2;
                (both.clone().narrow(2, 0, i), both.narrow(2, i, i))
            }
            GateUpProjection::Split(split) => (
                linear(&split.gate_proj, x.clone()),
                linear(&split.up_proj, x),
            ),
        };
        linear(&self.down_proj, silu_mul(gate, up))
    }
}
