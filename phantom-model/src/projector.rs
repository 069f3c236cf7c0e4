//! From vision features to LLM tokens: drop CLS, pixel shuffle 0.5, `vision_proj`.

use burn::nn::{LayerNorm, LayerNormConfig};
use burn::prelude::*;

use crate::activation::gelu;
use crate::linear::{Linear, LinearConfig, linear};

/// `vision_proj`: LayerNorm(4C, ε 1e-5) → Linear(4C → D) → GELU → Linear(D → D).
/// Checkpoint keys `vision_proj.0`, `.1`, `.3`.
#[derive(Module, Debug)]
pub struct VisionProjector {
    /// `vision_proj.0`.
    pub norm: LayerNorm,
    /// `vision_proj.1`.
    pub fc1: Linear,
    /// `vision_proj.3`.
    pub fc2: Linear,
}

impl VisionProjector {
    /// A fresh projector from `4C` shuffled vision channels to the LLM width `D`.
    pub fn new(vision_hidden: usize, llm_hidden: usize, device: &Device) -> Self {
        let wide = vision_hidden * 4;
        Self {
            norm: LayerNormConfig::new(wide).with_epsilon(1e-5).init(device),
            fc1: LinearConfig::new(wide, llm_hidden).init(device),
            fc2: LinearConfig::new(llm_hidden, llm_hidden).init(device),
        }
    }

    /// `[N, 1 + grid², C]` tower output → `[N, (grid/2)², D]` vision tokens.
    pub fn forward(&self, vit: Tensor<3>) -> Tensor<3> {
        let shuffled = pixel_shuffle(vit);
        linear(
            &self.fc2,
            gelu(linear(&self.fc1, self.norm.forward(shuffled))),
        )
    }
}

/// Drops CLS and merges each 2×2 block of patches into one token: token (i, j) is
/// `x[2i,2j] ‖ x[2i,2j+1] ‖ x[2i+1,2j] ‖ x[2i+1,2j+1]`, `[N, 1 + G², C] → [N, (G/2)², 4C]`.
pub fn pixel_shuffle(vit: Tensor<3>) -> Tensor<3> {
    let [n, l, c] = vit.dims();
    let grid = ((l - 1) as f64).sqrt() as usize;
    let half = grid / 2;
    vit.narrow(1, 1, l - 1)
        // [n, i, a, j, b, c] with row 2i+a, column 2j+b.
        .reshape([n, half, 2, half, 2, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([n, half * half, 4 * c])
}
