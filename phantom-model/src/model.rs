//! `PhantomModel`: vision tower → projector → splice into the token embeddings → decoder.

use burn::prelude::*;

use crate::cache::KvCache;
use crate::config::PhantomConfig;
use crate::decoder::rope::Rope;
use crate::decoder::{CausalLm, DecoderTrace};
use crate::error::{PhantomError, Result};
use crate::packed::PackedWeights;
use crate::projector::VisionProjector;
use crate::vision::VisionModel;

/// A Phantom vision-language model. Field names follow the official checkpoints.
#[derive(Module, Debug)]
pub struct PhantomModel {
    /// InternViT.
    pub vision_model: VisionModel,
    /// Pixel-shuffle projector.
    pub vision_proj: VisionProjector,
    /// The decoder LLM with phantom attention.
    pub language_model: CausalLm,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: PhantomConfig,
    /// The quantized weights held packed for the CPU kernels, by the id of the parameter each
    /// stands in for ([`crate::packed`]); empty elsewhere.
    #[module(skip)]
    pub(crate) packed: PackedWeights,
}

/// One batch of model inputs, held on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInput {
    /// Token ids, `B` rows of equal length `T` (left-padded).
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for real tokens, 0 for left padding; same shape as `input_ids`.
    pub attention_mask: Vec<Vec<bool>>,
}

impl ModelInput {
    /// A batch without padding.
    pub fn unpadded(input_ids: Vec<Vec<u32>>) -> Self {
        let attention_mask = input_ids.iter().map(|row| vec![true; row.len()]).collect();
        Self {
            input_ids,
            attention_mask,
        }
    }

    /// Left-pads rows of different lengths with `pad_id`.
    pub fn left_padded(rows: Vec<Vec<u32>>, pad_id: u32) -> Self {
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut input_ids = Vec::with_capacity(rows.len());
        let mut attention_mask = Vec::with_capacity(rows.len());
        for row in rows {
            let pad = t - row.len();
            attention_mask.push((0..t).map(|i| i >= pad).collect());
            let mut ids = vec![pad_id; pad];
            ids.extend(row);
            input_ids.push(ids);
        }
        Self {
            input_ids,
            attention_mask,
        }
    }

    /// `(B, T)`.
    pub fn dims(&self) -> (usize, usize) {
        (
            self.input_ids.len(),
            self.input_ids.first().map_or(0, Vec::len),
        )
    }

    /// Checks shapes and ids: rectangular, mask matching, ids inside the vocabulary, at least
    /// one real token per row, and padding only on the left.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let (b, t) = self.dims();
        if b == 0 || t == 0 {
            return Err(PhantomError::Input("the batch is empty".into()));
        }
        if self.attention_mask.len() != b {
            return Err(PhantomError::Input(format!(
                "attention_mask has {} rows, input_ids has {b}",
                self.attention_mask.len()
            )));
        }
        for (row, (ids, mask)) in self.input_ids.iter().zip(&self.attention_mask).enumerate() {
            if ids.len() != t || mask.len() != t {
                return Err(PhantomError::Input(format!(
                    "row {row} has {} ids and {} mask entries, expected {t}",
                    ids.len(),
                    mask.len()
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                return Err(PhantomError::Input(format!(
                    "row {row}: token id {bad} is outside the vocabulary ({vocab_size})"
                )));
            }
            let Some(first) = mask.iter().position(|&m| m) else {
                return Err(PhantomError::Input(format!("row {row} has no real token")));
            };
            if mask[first..].iter().any(|&m| !m) {
                return Err(PhantomError::Input(format!(
                    "row {row}: padding must be on the left (a 0 follows a 1 in attention_mask)"
                )));
            }
        }
        Ok(())
    }
}

impl PhantomModel {
    /// A randomly initialised model shaped by `config` (for training from scratch and tests).
    pub fn new(config: PhantomConfig, device: &Device) -> Self {
        let mut model = Self::unprepared(config, device);
        crate::linear::prepare(&mut model);
        model
    }

    /// The model before [`crate::linear::prepare`], its parameters not drawn yet: what
    /// [`crate::WeightLoader`] fills.
    pub(crate) fn unprepared(config: PhantomConfig, device: &Device) -> Self {
        Self {
            vision_model: VisionModel::new(&config.vision, device),
            vision_proj: VisionProjector::new(
                config.vision.hidden_size,
                config.llm.hidden_size,
                device,
            ),
            language_model: CausalLm::new(&config.llm, config.phantom_eta, device),
            config,
            packed: PackedWeights::new(),
        }
    }

    /// The RoPE of the decoder.
    pub fn rope(&self) -> Rope {
        Rope::new(&self.config.llm)
    }

    /// An empty KV cache for `batch` rows.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.config.llm.num_hidden_layers, batch)
    }

    /// Sets η of every phantom layer (η = 0 gives the plain backbone).
    pub fn set_phantom_eta(&mut self, eta: f64) {
        self.config.phantom_eta = eta;
        for layer in &mut self.language_model.model.layers {
            layer.self_attn.phantom.eta = eta;
        }
    }

    /// Vision tokens of pixel tiles: `[N, 3, 448, 448]` → `[N, 256, D]`.
    pub fn encode_images(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>> {
        let [_, c, h, w] = pixel_values.dims();
        let side = self.config.vision.image_size;
        if c != 3 || h != side || w != side {
            return Err(PhantomError::Input(format!(
                "pixel_values must be [N, 3, {side}, {side}], got [{}, {c}, {h}, {w}]",
                pixel_values.dims()[0]
            )));
        }
        Ok(self
            .vision_proj
            .forward(self.vision_model.forward(pixel_values)))
    }

    /// Token embeddings with the `<IMG_CONTEXT>` rows replaced, in (row, position) order, by
    /// the vision tokens flattened tile by tile.
    pub fn embed(&self, input: &ModelInput, vision: Option<Tensor<3>>) -> Result<Tensor<3>> {
        input.validate(self.config.llm.vocab_size)?;
        let (b, t) = input.dims();
        let device = self.device();
        let flat: Vec<i64> = input
            .input_ids
            .iter()
            .flatten()
            .map(|&id| id as i64)
            .collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, t]), &device);
        let embeds = self.language_model.embed(ids);
        let image_id = self.config.image_token_index;
        let slots: Vec<usize> = input
            .input_ids
            .iter()
            .flatten()
            .enumerate()
            .filter(|&(_, &id)| id == image_id)
            .map(|(i, _)| i)
            .collect();
        let vision_rows = vision.as_ref().map_or(0, |v| v.dims()[0] * v.dims()[1]);
        if slots.len() != vision_rows {
            let tiles = vision.as_ref().map_or(0, |v| v.dims()[0]);
            return Err(PhantomError::Input(format!(
                "the prompt holds {} image tokens (id {image_id}) but {tiles} tile(s) give \
                 {vision_rows} vision tokens ({} per tile)",
                slots.len(),
                self.config.tokens_per_tile()
            )));
        }
        let Some(vision) = vision else {
            return Ok(embeds);
        };
        // One gather over [text rows ‖ vision rows]: differentiable, and a single copy.
        let d = embeds.dims()[2];
        let mut index: Vec<i64> = (0..(b * t) as i64).collect();
        for (k, &slot) in slots.iter().enumerate() {
            index[slot] = (b * t + k) as i64;
        }
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [b * t]), &device);
        let rows = Tensor::cat(
            vec![embeds.reshape([b * t, d]), vision.reshape([vision_rows, d])],
            0,
        );
        Ok(rows.select(0, index).reshape([b, t, d]))
    }

    /// Runs the decoder over the new tokens of `input` (whose images are already in `embeds`),
    /// extending `cache`; returns the final-norm hidden states `[B, T, D]`.
    pub fn forward_embeds(
        &self,
        embeds: Tensor<3>,
        attention_mask: &[Vec<bool>],
        cache: &mut KvCache,
        trace: Option<&mut DecoderTrace>,
    ) -> Result<Tensor<3>> {
        let [b, t, _] = embeds.dims();
        if cache.batch_size() != b || attention_mask.len() != b {
            return Err(PhantomError::Input(format!(
                "batch of {b} rows does not fit a cache of {} rows",
                cache.batch_size()
            )));
        }
        let total = cache.len() + t;
        let limit = self.config.llm.max_context();
        if total > limit {
            return Err(PhantomError::Input(format!(
                "sequence of {total} tokens exceeds the model's context of {limit}"
            )));
        }
        let rope = self.rope();
        #[cfg(feature = "cpu-kernels")]
        let on_flex = crate::kernels::is_flex(&embeds.device());
        let forward = move || {
            self.language_model
                .forward(embeds, attention_mask, &rope, cache, trace)
        };
        #[cfg(feature = "cpu-kernels")]
        if on_flex {
            return Ok(crate::kernels::on_workers(forward));
        }
        Ok(forward())
    }

    /// Full forward from ids (and optional pixel tiles) to logits `[B, T, V]`, no cache kept.
    pub fn forward(
        &self,
        input: &ModelInput,
        pixel_values: Option<Tensor<4>>,
    ) -> Result<Tensor<3>> {
        let vision = pixel_values.map(|p| self.encode_images(p)).transpose()?;
        let embeds = self.embed(input, vision)?;
        let mut cache = self.new_cache(input.dims().0);
        let hidden = self.forward_embeds(embeds, &input.attention_mask, &mut cache, None)?;
        Ok(self.language_model.logits(hidden))
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.language_model.model.embed_tokens.weight.lazy_device()
    }
}
