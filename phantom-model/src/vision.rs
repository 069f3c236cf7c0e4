//! InternViT, the vision tower: patch embedding → bidirectional transformer layers with
//! per-channel layer scales. No final norm; the CLS token is dropped by the projector.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::activation::gelu;
use crate::config::{VisionConfig, VisionNorm};
use crate::linear::{Linear, LinearConfig, linear};

/// The norm of a vision layer, as the config chooses it.
#[derive(Module, Debug)]
pub enum VisionLayerNorm {
    /// `nn.LayerNorm`.
    LayerNorm(LayerNorm),
    /// RMSNorm.
    RmsNorm(RmsNorm),
}

impl VisionLayerNorm {
    fn new(config: &VisionConfig, device: &Device) -> Self {
        match config.norm {
            VisionNorm::LayerNorm => Self::LayerNorm(
                LayerNormConfig::new(config.hidden_size)
                    .with_epsilon(config.layer_norm_eps)
                    .init(device),
            ),
            VisionNorm::RmsNorm => Self::RmsNorm(
                RmsNormConfig::new(config.hidden_size)
                    .with_epsilon(config.layer_norm_eps)
                    .init(device),
            ),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Self::LayerNorm(norm) => norm.forward(x),
            Self::RmsNorm(norm) => norm.forward(x),
        }
    }
}

/// Patch and position embeddings.
#[derive(Module, Debug)]
pub struct VisionEmbeddings {
    /// Learned CLS token `[1, 1, C]`.
    pub class_embedding: Param<Tensor<3>>,
    /// `Conv2d(3 → C, kernel = stride = patch)`.
    pub patch_embedding: Conv2d,
    /// Learned positions `[1, 1 + grid², C]`.
    pub position_embedding: Param<Tensor<3>>,
}

/// Multi-head self-attention of the tower (fused qkv, no mask).
#[derive(Module, Debug)]
pub struct VisionAttention {
    /// `[3][heads][head_dim]` fused projection.
    pub qkv: Linear,
    /// Output projection.
    pub proj: Linear,
    /// Heads.
    pub num_heads: usize,
}

/// Two-layer GELU MLP.
#[derive(Module, Debug)]
pub struct VisionMlp {
    /// `C → intermediate`.
    pub fc1: Linear,
    /// `intermediate → C`.
    pub fc2: Linear,
}

/// One encoder layer: `x += ls1 ⊙ attn(norm1(x))`, `x += ls2 ⊙ mlp(norm2(x))`.
#[derive(Module, Debug)]
pub struct VisionLayer {
    /// Attention.
    pub attn: VisionAttention,
    /// MLP.
    pub mlp: VisionMlp,
    /// Norm before attention.
    pub norm1: VisionLayerNorm,
    /// Norm before the MLP.
    pub norm2: VisionLayerNorm,
    /// Layer scale of the attention branch `[C]`.
    pub ls1: Param<Tensor<1>>,
    /// Layer scale of the MLP branch `[C]`.
    pub ls2: Param<Tensor<1>>,
}

/// The encoder stack.
#[derive(Module, Debug)]
pub struct VisionEncoder {
    /// Layers.
    pub layers: Vec<VisionLayer>,
}

/// InternViT (`vision_model` in the checkpoints).
#[derive(Module, Debug)]
pub struct VisionModel {
    /// Embeddings.
    pub embeddings: VisionEmbeddings,
    /// Encoder.
    pub encoder: VisionEncoder,
}

impl VisionModel {
    /// A randomly initialised tower shaped by `config`.
    pub fn new(config: &VisionConfig, device: &Device) -> Self {
        let c = config.hidden_size;
        let grid = config.grid();
        let lin = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let layers = (0..config.num_hidden_layers)
            .map(|_| VisionLayer {
                attn: VisionAttention {
                    qkv: lin(c, 3 * c, config.qkv_bias),
                    proj: lin(c, c, true),
                    num_heads: config.num_attention_heads,
                },
                mlp: VisionMlp {
                    fc1: lin(c, config.intermediate_size, true),
                    fc2: lin(config.intermediate_size, c, true),
                },
                norm1: VisionLayerNorm::new(config, device),
                norm2: VisionLayerNorm::new(config, device),
                ls1: Param::from_tensor(Tensor::ones([c], device)),
                ls2: Param::from_tensor(Tensor::ones([c], device)),
            })
            .collect();
        Self {
            embeddings: VisionEmbeddings {
                class_embedding: Param::from_tensor(Tensor::zeros([1, 1, c], device)),
                patch_embedding: Conv2dConfig::new(
                    [config.num_channels, c],
                    [config.patch_size, config.patch_size],
                )
                .with_stride([config.patch_size, config.patch_size])
                .init(device),
                position_embedding: Param::from_tensor(Tensor::zeros(
                    [1, grid * grid + 1, c],
                    device,
                )),
            },
            encoder: VisionEncoder { layers },
        }
    }

    /// `[N, 3, 448, 448]` pixel tiles → `[N, 1 + grid², C]` hidden states (CLS first).
    pub fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let patches = self.embeddings.patch_embedding.forward(pixel_values);
        let [n, c, gh, gw] = patches.dims();
        let patches = patches.reshape([n, c, gh * gw]).swap_dims(1, 2);
        let cls = self.embeddings.class_embedding.val().expand([n, 1, c]);
        // The position table is 1 + grid² long for the configured tile size, so no resize.
        let mut x = Tensor::cat(vec![cls, patches], 1) + self.embeddings.position_embedding.val();
        for layer in &self.encoder.layers {
            let attended = layer.attn.forward(layer.norm1.forward(x.clone()));
            x = x + attended * layer.ls1.val().unsqueeze::<3>();
            let h = linear(
                &layer.mlp.fc2,
                gelu(linear(&layer.mlp.fc1, layer.norm2.forward(x.clone()))),
            );
            x = x + h * layer.ls2.val().unsqueeze::<3>();
        }
        x
    }
}

/// `softmax(q·kᵀ/√d)·v` over the `[N, heads, L, d]` heads of a tile: the CPU kernel on flex,
/// Burn's attention elsewhere (fused where the backend fuses it).
fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [_, _, l, d] = q.dims();
    #[cfg(feature = "cpu-kernels")]
    if let Some(o) = crate::kernels::attend::attend(&q, &k, &v, l, None, 1.0 / (d as f32).sqrt()) {
        return o;
    }
    let _ = (l, d);
    attention(q, k, v, None, None, AttentionModuleOptions::default())
}

impl VisionAttention {
    /// Bidirectional attention over all tokens of a tile.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, l, c] = x.dims();
        let heads = self.num_heads;
        let d = c / heads;
        let qkv = linear(&self.qkv, x)
            .reshape([n, l, 3, heads, d])
            .permute([2, 0, 3, 1, 4]);
        let q = qkv.clone().narrow(0, 0, 1).reshape([n, heads, l, d]);
        let k = qkv.clone().narrow(0, 1, 1).reshape([n, heads, l, d]);
        let v = qkv.narrow(0, 2, 1).reshape([n, heads, l, d]);
        let out = attend(q, k, v).swap_dims(1, 2).reshape([n, l, c]);
        linear(&self.proj, out)
    }
}
