//! A running batch of sequences: prefill once, then one token per row per step, with the KV
//! cache (and the phantom vectors) carried between calls.

use std::time::Duration;

use burn::prelude::*;
use phantom_model::{KvCache, ModelInput, PhantomError, PhantomModel, Result};
use web_time::Instant;

use crate::blocking::block_on;

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

impl Timings {
    /// Prompt tokens per second of the prefill (0 when nothing was timed).
    pub fn prefill_tokens_per_s(&self) -> f64 {
        per_second(self.prompt_tokens, self.prefill)
    }

    /// Decoded tokens per second (0 when nothing was timed).
    pub fn decode_tokens_per_s(&self) -> f64 {
        per_second(self.decode_tokens, self.decode)
    }

    /// The timings as the JSON object that `phantom-infer chat --json` and the browser report.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tiles": self.tiles,
            "vision_ms": self.vision.as_secs_f64() * 1e3,
            "prompt_tokens": self.prompt_tokens,
            "prefill_ms": self.prefill.as_secs_f64() * 1e3,
            "prefill_tokens_per_s": self.prefill_tokens_per_s(),
            "decode_tokens": self.decode_tokens,
            "decode_ms": self.decode.as_secs_f64() * 1e3,
            "decode_tokens_per_s": self.decode_tokens_per_s(),
        })
    }
}

fn per_second(n: usize, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// A batch being generated: the model, its cache, and the timings so far.
///
/// A session can be extended by whole runs of tokens, not only single decode steps: a chat
/// continues its conversation by feeding the new turn to the cache it already holds, and
/// [`Session::truncate`] drops cached tokens that a new prompt does not share.
pub struct Session<'m> {
    model: &'m PhantomModel,
    cache: KvCache,
    /// Phase timings.
    pub timings: Timings,
}

impl<'m> Session<'m> {
    /// An empty session of `batch` rows; [`Session::extend`] runs its prompt.
    pub fn new(model: &'m PhantomModel, batch: usize) -> Self {
        Self {
            model,
            cache: model.new_cache(batch),
            timings: Timings::default(),
        }
    }

    /// Sizes the cache for `positions` tokens per row in all (prompt and answer), so that it
    /// never grows during a generation of known length. Only a session that has not run yet
    /// takes it.
    pub fn reserve(mut self, positions: usize) -> Self {
        self.cache.reserve(positions);
        self
    }

    /// Runs the prompt (`input`, with optional pixel tiles) through the model and returns the
    /// next-token logits of every row, `[B, V]`.
    pub fn prefill(
        model: &'m PhantomModel,
        input: &ModelInput,
        pixel_values: Option<Tensor<4>>,
    ) -> Result<(Self, Tensor<2>)> {
        block_on(Self::prefill_async(model, input, pixel_values))
    }

    /// [`Session::prefill`] for callers that must not block (browsers).
    pub async fn prefill_async(
        model: &'m PhantomModel,
        input: &ModelInput,
        pixel_values: Option<Tensor<4>>,
    ) -> Result<(Self, Tensor<2>)> {
        let mut session = Self::new(model, input.dims().0);
        let logits = session.extend_async(input, pixel_values).await?;
        Ok((session, logits))
    }

    /// Like [`Session::prefill`], with the vision tokens (`[N, 256, D]`) already computed.
    pub fn prefill_vision_tokens(
        model: &'m PhantomModel,
        input: &ModelInput,
        vision: Option<Tensor<3>>,
    ) -> Result<(Self, Tensor<2>)> {
        let mut session = Self::new(model, input.dims().0);
        let logits = block_on(session.extend_vision_tokens_async(input, vision))?;
        Ok((session, logits))
    }

    /// Feeds `input` (every row the same number of new tokens, padding only on the left of a
    /// first prompt) and returns the next-token logits `[B, V]`. On an empty session this is
    /// the prefill; later it continues every row from its cache.
    pub fn extend(
        &mut self,
        input: &ModelInput,
        pixel_values: Option<Tensor<4>>,
    ) -> Result<Tensor<2>> {
        block_on(self.extend_async(input, pixel_values))
    }

    /// [`Session::extend`] for callers that must not block (browsers).
    pub async fn extend_async(
        &mut self,
        input: &ModelInput,
        pixel_values: Option<Tensor<4>>,
    ) -> Result<Tensor<2>> {
        let start = Instant::now();
        let tiles = pixel_values.as_ref().map_or(0, |p| p.dims()[0]);
        let vision = pixel_values
            .map(|p| self.model.encode_images(p))
            .transpose()?;
        if let Some(v) = &vision {
            settle(v).await;
        }
        self.timings.vision += start.elapsed();
        self.timings.tiles += tiles;
        self.extend_vision_tokens_async(input, vision).await
    }

    /// [`Session::extend`] with the vision tokens (`[N, 256, D]`) already computed.
    pub async fn extend_vision_tokens_async(
        &mut self,
        input: &ModelInput,
        vision: Option<Tensor<3>>,
    ) -> Result<Tensor<2>> {
        let (b, t) = input.dims();
        if b != self.cache.batch_size() {
            return Err(PhantomError::Input(format!(
                "{b} rows fed to a session of {} rows",
                self.cache.batch_size()
            )));
        }
        let limit = self.model.config.llm.max_context();
        if self.cache.len() + t > limit {
            return Err(PhantomError::Input(format!(
                "{} cached plus {t} new tokens exceed the model's context of {limit}",
                self.cache.len()
            )));
        }
        if !self.cache.is_empty() && input.attention_mask.iter().flatten().any(|&m| !m) {
            return Err(PhantomError::Input(
                "only a session's first prompt may be padded".into(),
            ));
        }
        let start = Instant::now();
        let embeds = self.model.embed(input, vision)?;
        let hidden =
            self.model
                .forward_embeds(embeds, &input.attention_mask, &mut self.cache, None)?;
        let logits = last_logits(self.model, hidden);
        settle(&logits).await;
        self.timings.prefill += start.elapsed();
        self.timings.prompt_tokens += input
            .attention_mask
            .iter()
            .flatten()
            .filter(|&&m| m)
            .count();
        Ok(logits)
    }

    /// Feeds one token per row and returns the next-token logits `[B, V]`.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor<2>> {
        block_on(self.step_async(tokens))
    }

    /// [`Session::step`] for callers that must not block (browsers).
    pub async fn step_async(&mut self, tokens: &[u32]) -> Result<Tensor<2>> {
        let start = Instant::now();
        let input = ModelInput::unpadded(tokens.iter().map(|&t| vec![t]).collect());
        let embeds = self.model.embed(&input, None)?;
        let hidden =
            self.model
                .forward_embeds(embeds, &input.attention_mask, &mut self.cache, None)?;
        let logits = last_logits(self.model, hidden);
        settle(&logits).await;
        self.timings.decode += start.elapsed();
        self.timings.decode_tokens += tokens.len();
        Ok(logits)
    }

    /// Keeps and reorders rows (beam search).
    pub fn select_rows(&mut self, rows: &[usize]) {
        self.cache.select_rows(rows);
    }

    /// Adds the rows of `other` (another session of the same model) after this session's rows:
    /// each keeps its own cache and phantom vectors, the shorter ones left-padded, so that they
    /// all decode together from now on.
    pub fn join(&mut self, other: Session<'m>) -> Result<()> {
        if self.cache.batch_size() == 0 {
            self.cache = other.cache;
            return Ok(());
        }
        self.cache = KvCache::concat(&[&self.cache, &other.cache])?;
        Ok(())
    }

    /// Drops leading positions every row holds as padding, when there are at least `min`.
    pub fn trim_padding(&mut self, min: usize) {
        self.cache.trim_common_padding(min);
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.cache.batch_size()
    }

    /// Forgets every cached token from position `len` on (padding included), keeping the
    /// phantom vectors: the session continues as if only the first `len` positions had been
    /// fed. At least one real token must remain in every row.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len)
    }

    /// Tokens cached per row so far.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Starts the timings afresh (a new answer in a continuing conversation).
    pub fn reset_timings(&mut self) {
        self.timings = Timings::default();
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

/// Waits for the device work queued up to `t` so that timings are honest on asynchronous
/// backends. Errors are left to the readback that follows, which reports them.
async fn settle<const D: usize>(t: &Tensor<D>) {
    #[cfg(not(target_family = "wasm"))]
    {
        let _ = t.device().sync();
    }
    // A browser cannot block on the GPU: reading one value back waits for everything queued
    // before it, without copying the whole tensor.
    #[cfg(target_family = "wasm")]
    {
        let one = t.clone().flatten::<1>(0, D - 1).narrow(0, 0, 1);
        let _ = one.into_data_async().await;
    }
}
