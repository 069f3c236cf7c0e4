//! The SwiGLU feed-forward block shared by every backbone: `down(silu(gate(x)) ⊙ up(x))`.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::linear::linear;

/// SwiGLU MLP. Qwen2 and InternLM2 store gate and up separately; Phi-3 fuses them as
/// `gate_up_proj = [gate | up]`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate projection (separate layout).
    pub gate_proj: Option<Linear>,
    /// Up projection (separate layout).
    pub up_proj: Option<Linear>,
    /// Fused `[gate | up]` projection (Phi-3).
    pub gate_up_proj: Option<Linear>,
    /// Down projection.
    pub down_proj: Linear,
}

impl Mlp {
    /// A fresh MLP; `fused` selects Phi-3's layout.
    pub fn new(hidden: usize, intermediate: usize, fused: bool, device: &Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        if fused {
            Self {
                gate_proj: None,
                up_proj: None,
                gate_up_proj: Some(lin(hidden, 2 * intermediate)),
                down_proj: lin(intermediate, hidden),
            }
        } else {
            Self {
                gate_proj: Some(lin(hidden, intermediate)),
                up_proj: Some(lin(hidden, intermediate)),
                gate_up_proj: None,
                down_proj: lin(intermediate, hidden),
            }
        }
    }

    /// `[B, T, D] → [B, T, D]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (gate, up) = match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            (Some(fused), _, _) => {
                let both = linear(fused, x);
                let i = both.dims()[2] / 2;
                (both.clone().narrow(2, 0, i), both.narrow(2, i, i))
            }
            (None, Some(gate), Some(up)) => (linear(gate, x.clone()), linear(up, x)),
            _ => unreachable!("Mlp::new always sets one complete layout"),
        };
        linear(&self.down_proj, silu(gate) * up)
    }
}
