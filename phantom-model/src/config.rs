//! The official `config.json` of a Phantom checkpoint, read into typed configuration.
//!
//! Only the fields the model needs are read; everything else in the file (generation defaults,
//! `transformers` bookkeeping) is ignored. Values the model cannot honour are rejected here, at
//! load time, with a message that names the field.

use std::path::Path;

use serde::Deserialize;

use crate::error::{PhantomError, Result};

/// η used by the released code when the config does not say otherwise.
pub const DEFAULT_PHANTOM_ETA: f64 = 1e-4;

/// The decoder families of the Phantom releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backbone {
    /// Qwen2 (Phantom-0.5B).
    Qwen2,
    /// InternLM2 / InternLM2.5 (Phantom-1.8B, Phantom-7B).
    InternLm2,
    /// Phi-3-mini (Phantom-3.8B).
    Phi3,
}

impl Backbone {
    /// The backbone named by an `architectures` entry of `llm_config`.
    pub fn from_architecture(name: &str) -> Result<Self> {
        match name {
            "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            "InternLM2ForCausalLM" => Ok(Self::InternLm2),
            "Phi3ForCausalLM" => Ok(Self::Phi3),
            other => Err(PhantomError::Config(format!(
                "llm_config.architectures names `{other}`; supported: Qwen2ForCausalLM, \
                 InternLM2ForCausalLM, Phi3ForCausalLM"
            ))),
        }
    }

    /// The `architectures` string written back when saving.
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::InternLm2 => "InternLM2ForCausalLM",
            Self::Phi3 => "Phi3ForCausalLM",
        }
    }
}

/// Normalisation layer of the vision tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionNorm {
    /// `nn.LayerNorm` (the 300M tower).
    LayerNorm,
    /// RMSNorm (the 6B tower family).
    RmsNorm,
}

/// InternViT configuration (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Channels of the residual stream (C).
    pub hidden_size: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Side of the square input tile in pixels (448).
    pub image_size: usize,
    /// Side of a patch in pixels (14).
    pub patch_size: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// ε of the layer norms.
    pub layer_norm_eps: f64,
    /// Norm kind.
    pub norm: VisionNorm,
    /// Whether the fused qkv projection has a bias.
    pub qkv_bias: bool,
}

impl VisionConfig {
    /// Patches per side of a tile (32 at 448/14).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Head width of the vision attention.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// RoPE frequency scaling declared by a backbone's config.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// InternLM2 "dynamic" NTK scaling: the base grows once the sequence outgrows
    /// `max_position_embeddings`.
    Dynamic {
        /// Scaling factor.
        factor: f64,
    },
    /// Phi-3 "su"/"longrope": per-frequency factors, short below the original context, long above.
    LongRope {
        /// Factors used while the sequence fits `original_max_position_embeddings`.
        short_factor: Vec<f64>,
        /// Factors used beyond it.
        long_factor: Vec<f64>,
        /// Context length of pre-training.
        original_max_position_embeddings: usize,
    },
}

/// Decoder configuration (`llm_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    /// Which decoder family.
    pub backbone: Backbone,
    /// Residual width.
    pub hidden_size: usize,
    /// Query heads (H).
    pub num_attention_heads: usize,
    /// Key/value heads (H_kv).
    pub num_key_value_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// ε of the RMS norms.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RoPE scaling variant.
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Attention window of the backbone, when it declares an active one.
    pub sliding_window: Option<usize>,
    /// Whether the q/k/v projections carry a bias.
    pub qkv_bias: bool,
    /// Whether the output projection carries a bias.
    pub o_bias: bool,
}

impl LlmConfig {
    /// Head width d.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Longest sequence (prompt plus generated tokens) this port computes exactly: the
    /// position table, bounded by the attention window where one is active.
    pub fn max_context(&self) -> usize {
        match self.sliding_window {
            Some(w) => self.max_position_embeddings.min(w + 1),
            None => self.max_position_embeddings,
        }
    }

    /// Query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// A whole Phantom checkpoint's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PhantomConfig {
    /// Vision tower.
    pub vision: VisionConfig,
    /// Decoder.
    pub llm: LlmConfig,
    /// Pixel-shuffle ratio (0.5 in every release).
    pub downsample_ratio: f64,
    /// Id of `<IMG_CONTEXT>`, the placeholder that vision tokens replace.
    pub image_token_index: u32,
    /// End-of-sequence ids (the config may list several).
    pub eos_token_ids: Vec<u32>,
    /// Weight η of the phantom branch.
    pub phantom_eta: f64,
    /// How the linear weights are quantized, in a quantized folder
    /// ([`crate::quantize`]); `None` for float weights.
    pub quantization: Option<crate::quantize::QuantizationConfig>,
    /// The parsed file, kept so that saving writes back every field the user had.
    pub raw: serde_json::Value,
}

impl PhantomConfig {
    /// Vision tokens produced per 448×448 tile (256).
    pub fn tokens_per_tile(&self) -> usize {
        let side = (self.vision.grid() as f64 * self.downsample_ratio) as usize;
        side * side
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| PhantomError::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            PhantomError::Config(msg) => PhantomError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| PhantomError::Config(format!("not valid JSON: {e}")))?;
        let file: RawConfig = serde_json::from_value(raw.clone())
            .map_err(|e| PhantomError::Config(format!("unexpected config.json layout: {e}")))?;
        let vision = file.vision_config.validate()?;
        let llm = file.llm_config.validate()?;
        if (file.downsample_ratio - 0.5).abs() > 1e-9 {
            return Err(PhantomError::Config(format!(
                "downsample_ratio {} is not supported (only 0.5, as in every Phantom release)",
                file.downsample_ratio
            )));
        }
        let eos_token_ids = match file.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) if !ids.is_empty() => ids,
            _ => {
                return Err(PhantomError::Config(
                    "eos_token_id is missing at the top level of config.json".into(),
                ));
            }
        };
        let phantom_eta = file.phantom_eta.unwrap_or(DEFAULT_PHANTOM_ETA);
        if !phantom_eta.is_finite() {
            return Err(PhantomError::Config(format!(
                "phantom_eta must be finite, got {phantom_eta}"
            )));
        }
        if file.image_token_index as usize >= llm.vocab_size {
            return Err(PhantomError::Config(format!(
                "image_token_index {} is outside the vocabulary ({} tokens)",
                file.image_token_index, llm.vocab_size
            )));
        }
        Ok(Self {
            vision,
            llm,
            downsample_ratio: file.downsample_ratio,
            image_token_index: file.image_token_index,
            eos_token_ids,
            phantom_eta,
            quantization: file.quantization.map(|q| q.validate()).transpose()?,
            raw,
        })
    }

    /// The config as JSON, with `phantom_eta` recorded when it differs from the default.
    pub fn to_json(&self) -> serde_json::Value {
        let mut raw = self.raw.clone();
        if let Some(obj) = raw.as_object_mut()
            && (self.phantom_eta != DEFAULT_PHANTOM_ETA || obj.contains_key("phantom_eta"))
        {
            obj.insert("phantom_eta".into(), self.phantom_eta.into());
        }
        if let Some(obj) = raw.as_object_mut() {
            match &self.quantization {
                Some(q) => {
                    obj.insert(
                        "quantization".into(),
                        serde_json::to_value(q).unwrap_or_default(),
                    );
                }
                None => {
                    obj.remove("quantization");
                }
            }
        }
        raw
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RawConfig {
    vision_config: RawVision,
    llm_config: RawLlm,
    #[serde(default = "half")]
    downsample_ratio: f64,
    image_token_index: u32,
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    quantization: Option<crate::quantize::QuantizationConfig>,
    phantom_eta: Option<f64>,
}

fn half() -> f64 {
    0.5
}

#[derive(Deserialize)]
struct RawVision {
    hidden_size: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    #[serde(default = "default_image_size")]
    image_size: usize,
    #[serde(default = "default_patch_size")]
    patch_size: usize,
    #[serde(default = "default_channels")]
    num_channels: usize,
    #[serde(default = "default_ln_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_norm_type")]
    norm_type: String,
    #[serde(default = "yes")]
    qkv_bias: bool,
    #[serde(default)]
    qk_normalization: bool,
    #[serde(default = "default_gelu")]
    hidden_act: String,
}

fn default_image_size() -> usize {
    448
}
fn default_patch_size() -> usize {
    14
}
fn default_channels() -> usize {
    3
}
fn default_ln_eps() -> f64 {
    1e-6
}
fn default_norm_type() -> String {
    "layer_norm".into()
}
fn default_gelu() -> String {
    "gelu".into()
}
fn yes() -> bool {
    true
}

impl RawVision {
    fn validate(self) -> Result<VisionConfig> {
        let bad = |msg: String| Err(PhantomError::Config(format!("vision_config: {msg}")));
        let norm = match self.norm_type.as_str() {
            "layer_norm" => VisionNorm::LayerNorm,
            "rms_norm" => VisionNorm::RmsNorm,
            other => return bad(format!("norm_type `{other}` is not supported")),
        };
        if self.qk_normalization {
            return bad("qk_normalization = true is not supported".into());
        }
        if self.hidden_act != "gelu" {
            return bad(format!(
                "hidden_act `{}` is not supported (only gelu)",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if !(self.image_size / self.patch_size).is_multiple_of(2) {
            return bad("the patch grid must be even for pixel shuffle 0.5".into());
        }
        if self.num_channels != 3 {
            return bad(format!(
                "num_channels {} is not supported (RGB only)",
                self.num_channels
            ));
        }
        Ok(VisionConfig {
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            image_size: self.image_size,
            patch_size: self.patch_size,
            num_channels: self.num_channels,
            layer_norm_eps: self.layer_norm_eps,
            norm,
            qkv_bias: self.qkv_bias,
        })
    }
}

#[derive(Deserialize)]
struct RawLlm {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    num_hidden_layers: usize,
    vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    /// InternLM2's single switch for the wqkv/wo biases.
    bias: Option<bool>,
    #[serde(default = "default_silu")]
    hidden_act: String,
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}
fn default_silu() -> String {
    "silu".into()
}

impl RawLlm {
    fn validate(self) -> Result<LlmConfig> {
        let bad = |msg: String| Err(PhantomError::Config(format!("llm_config: {msg}")));
        let Some(arch) = self.architectures.first() else {
            return bad("`architectures` is missing; it selects the decoder".into());
        };
        let backbone = Backbone::from_architecture(arch)?;
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            ));
        }
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
            || kv == 0
            || !self.num_attention_heads.is_multiple_of(kv)
        {
            return bad(format!(
                "inconsistent heads: hidden {} / heads {} / kv heads {kv}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let head_dim = self.hidden_size / self.num_attention_heads;
        if !head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {head_dim} must be even for RoPE"));
        }
        let rope_scaling = parse_rope_scaling(
            backbone,
            self.rope_scaling.as_ref(),
            head_dim,
            self.original_max_position_embeddings
                .unwrap_or(self.max_position_embeddings),
        )?;
        // Qwen2 keeps `sliding_window` in its config but only uses it when
        // `use_sliding_window` is set; Phi-3 applies it once the cache outgrows it. Within the
        // window, windowed attention equals full attention, so the window bounds the context.
        let sliding_window = match backbone {
            Backbone::Qwen2 if self.use_sliding_window => self.sliding_window,
            Backbone::Phi3 => self.sliding_window,
            _ => None,
        };
        let (qkv_bias, o_bias) = match backbone {
            Backbone::Qwen2 => (true, false),
            Backbone::InternLm2 => {
                let b = self.bias.unwrap_or(true);
                (b, b)
            }
            Backbone::Phi3 => (false, false),
        };
        Ok(LlmConfig {
            backbone,
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: kv,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            sliding_window,
            qkv_bias,
            o_bias,
        })
    }
}

fn parse_rope_scaling(
    backbone: Backbone,
    value: Option<&serde_json::Value>,
    head_dim: usize,
    original_max: usize,
) -> Result<RopeScaling> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let bad = |msg: String| {
        Err(PhantomError::Config(format!(
            "llm_config.rope_scaling: {msg}"
        )))
    };
    let kind = value
        .get("type")
        .or_else(|| value.get("rope_type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    match (backbone, kind) {
        (Backbone::InternLm2, "dynamic") => {
            let factor = value.get("factor").and_then(|f| f.as_f64()).unwrap_or(1.0);
            if factor < 1.0 {
                return bad(format!("factor {factor} must be at least 1"));
            }
            Ok(RopeScaling::Dynamic { factor })
        }
        (Backbone::Phi3, "su" | "longrope") => {
            let read = |name: &str| -> Result<Vec<f64>> {
                let list = value.get(name).and_then(|v| v.as_array()).ok_or_else(|| {
                    PhantomError::Config(format!("llm_config.rope_scaling: `{name}` is missing"))
                })?;
                let out: Option<Vec<f64>> = list.iter().map(|x| x.as_f64()).collect();
                match out {
                    Some(v) if v.len() == head_dim / 2 => Ok(v),
                    _ => Err(PhantomError::Config(format!(
                        "llm_config.rope_scaling: `{name}` must hold {} numbers",
                        head_dim / 2
                    ))),
                }
            };
            Ok(RopeScaling::LongRope {
                short_factor: read("short_factor")?,
                long_factor: read("long_factor")?,
                original_max_position_embeddings: original_max,
            })
        }
        (_, other) => bad(format!(
            "type `{other}` is not supported for {}",
            backbone.architecture()
        )),
    }
}
