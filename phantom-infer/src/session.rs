//! A running batch of sequences: prefill once, then one token per row per step, with the KV
//! cache (and the phantom vectors) carried between calls.

use std::time::{Duration, Instant};

use burn::prelude::*;
use phantom_model::{KvCache, ModelInput, PhantomError, PhantomModel, Result};

/// Wall-clock time spent in each phase.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Vision tower and projector.
    pub vision: Duration,
    /// The prompt's forward pass.
    pub prefill: Duration,
    /// All decode steps.
    pub decode: Duration,
    /// Real prompt tokens over all rows.
    pub prompt_tokens: usize,
    /// Tiles encoded.
    pub tiles: usize,
    /// Tokens produced by decode steps over all rows.
    pub decode_tokens: usize,
}

/// A batch being generated: the model, its cache, and the timings so far.
pub struct Session<'m> {
    model: &'m PhantomModel,
    cache: KvCache,
    /// Phase timings.
    pub timings: Timings,
}

impl<'m> Session<'m> {
    /// Runs the prompt (`input`, with optional pixel tiles) through the model and returns the
    /// next-token logits of every row, `[B, V]`.
    pub fn prefill(
        model: &'m PhantomModel,
        input: &ModelInput,
        pixel_values: Option<Tensor<4>>,
    ) -> Result<(Self, Tensor<2>)> {
        let start = Instant::now();
        let tiles = pixel_values.as_ref().map_or(0, |p| p.dims()[0]);
        let vision = pixel_values.map(|p| model.encode_images(p)).transpose()?;
        if let Some(v) = &vision {
            sync(v);
        }
        let vision_time = start.elapsed();
        let (mut session, logits) = Self::prefill_vision_tokens(model, input, vision)?;
        session.timings.vision = vision_time;
        session.timings.tiles = tiles;
        Ok((session, logits))
    }

    /// Like [`Session::prefill`], with the vision tokens (`[N, 256, D]`) already computed.
    pub fn prefill_vision_tokens(
        model: &'m PhantomModel,
        input: &ModelInput,
        vision: Option<Tensor<3>>,
    ) -> Result<(Self, Tensor<2>)> {
        let (b, t) = input.dims();
        let limit = model.config.llm.max_context();
        if t > limit {
            return Err(PhantomError::Input(format!(
                "the prompt has {t} tokens, more than the model's context of {limit}"
            )));
        }
        let mut timings = Timings {
            prompt_tokens: input
                .attention_mask
                .iter()
                .flatten()
                .filter(|&&m| m)
                .count(),
            ..Timings::default()
        };
        let start = Instant::now();
        let embeds = model.embed(input, vision)?;
        let mut cache = model.new_cache(b);
        let hidden = model.forward_embeds(embeds, &input.attention_mask, &mut cache, None)?;
        let logits = last_logits(model, hidden);
        sync(&logits);
        timings.prefill = start.elapsed();
        Ok((
            Self {
                model,
                cache,
                timings,
            },
            logits,
        ))
    }

    /// Feeds one token per row and returns the next-token logits `[B, V]`.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor<2>> {
        let start = Instant::now();
        let input = ModelInput::unpadded(tokens.iter().map(|&t| vec![t]).collect());
        let embeds = self.model.embed(&input, None)?;
        let hidden =
            self.model
                .forward_embeds(embeds, &input.attention_mask, &mut self.cache, None)?;
        let logits = last_logits(self.model, hidden);
        sync(&logits);
        self.timings.decode += start.elapsed();
        self.timings.decode_tokens += tokens.len();
        Ok(logits)
    }

    /// Keeps and reorders rows (beam search).
    pub fn select_rows(&mut self, rows: &[usize]) {
        self.cache.select_rows(rows);
    }

    /// Tokens cached per row so far.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The model.
    pub fn model(&self) -> &'m PhantomModel {
        self.model
    }
}

fn last_logits(model: &PhantomModel, hidden: Tensor<3>) -> Tensor<2> {
    let [b, t, _] = hidden.dims();
    let logits = model.language_model.logits(hidden.narrow(1, t - 1, 1));
    let v = logits.dims()[2];
    logits.reshape([b, v])
}

/// Waits for queued device work so that timings are honest on asynchronous backends.
fn sync<const D: usize>(t: &Tensor<D>) {
    let _ = t.device().sync();
}
