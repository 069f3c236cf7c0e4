//! Continuous batching: independent requests decode together in one batch. A request joins
//! between decode steps (its prompt prefilled alone, then its cache rows, phantom vectors
//! included, appended to the batch's) and leaves as soon as it is done or its client is gone;
//! every row keeps its own sampling settings, seed and history. The vision tower runs once per
//! distinct picture: its tokens are kept by content hash, up to a memory budget.
//!
//! The [`Engine`] is driven by one thread (the server's engine thread): it never blocks and
//! owns no channel, so any transport can feed it.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;

use burn::prelude::*;
use phantom_model::processor::image::PixelValues;
use phantom_model::{ModelInput, PhantomError, PhantomModel, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::blocking::block_on;
use crate::generate::{GenerationConfig, Seen, TokenEvent, argmax, continue_async, sample_row};
use crate::session::Session;

/// Why a request stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced (or the client's stop sequence met).
    Stop,
    /// `max_new_tokens` were produced.
    Length,
    /// The client went away.
    Cancelled,
}

/// What a request hears from the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// A new token of the answer (stop tokens are not sent).
    Token(u32),
    /// The answer is complete.
    Finished {
        /// Why it stopped.
        reason: FinishReason,
        /// Tokens of the prompt.
        prompt_tokens: usize,
        /// Tokens produced, the stop token included.
        completion_tokens: usize,
    },
    /// The request could not be served.
    Failed(String),
}

/// Receives a request's events; returning `Break` cancels the request.
pub type Sink = Box<dyn FnMut(JobEvent) -> ControlFlow<()> + Send>;

/// One request: a prompt (one row of ids), its pictures, and how to answer.
pub struct Job {
    /// The prompt's ids.
    pub input: Vec<u32>,
    /// Tiles of the prompt's pictures, in order.
    pub pixels: Option<PixelValues>,
    /// Sampling, length and stop tokens.
    pub config: GenerationConfig,
    /// Where the events go.
    pub sink: Sink,
}

/// A request decoding in the batch.
struct Row {
    sink: Sink,
    config: GenerationConfig,
    rng: StdRng,
    seen: Seen,
    prompt_tokens: usize,
    produced: usize,
    /// The token chosen last, to be fed at the next step.
    next: u32,
}

impl Row {
    /// Records the chosen `token`; `Some` when the row is done.
    fn accept(&mut self, token: u32) -> Option<FinishReason> {
        self.produced += 1;
        self.seen.insert(token);
        self.next = token;
        if self.config.stop_token_ids.contains(&token) {
            return Some(FinishReason::Stop);
        }
        if (self.sink)(JobEvent::Token(token)).is_break() {
            return Some(FinishReason::Cancelled);
        }
        (self.produced >= self.config.max_new_tokens).then_some(FinishReason::Length)
    }

    fn finish(mut self, reason: FinishReason) {
        let _ = (self.sink)(JobEvent::Finished {
            reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.produced,
        });
    }
}

/// Vision tokens by content hash of the pixels, least recently used first out.
struct VisionCache {
    budget: usize,
    used: usize,
    entries: HashMap<u64, (Tensor<3>, usize)>,
    order: VecDeque<u64>,
}

impl VisionCache {
    /// The vision tokens of `pixels`, and whether they came from the cache.
    fn get_or_encode(
        &mut self,
        model: &PhantomModel,
        pixels: &PixelValues,
    ) -> Result<(Tensor<3>, bool)> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        pixels.num_tiles.hash(&mut hasher);
        for v in &pixels.data {
            v.to_bits().hash(&mut hasher);
        }
        let key = hasher.finish();
        if let Some((tokens, _)) = self.entries.get(&key) {
            let tokens = tokens.clone();
            self.order.retain(|k| *k != key);
            self.order.push_back(key);
            return Ok((tokens, true));
        }
        let tokens = model.encode_images(pixels.to_tensor(&model.device()))?;
        let bytes = tokens.shape().num_elements() * tokens.dtype().size();
        if bytes <= self.budget {
            while self.used + bytes > self.budget {
                let Some(old) = self.order.pop_front() else {
                    break;
                };
                if let Some((_, size)) = self.entries.remove(&old) {
                    self.used -= size;
                }
            }
            self.entries.insert(key, (tokens.clone(), bytes));
            self.order.push_back(key);
            self.used += bytes;
        }
        Ok((tokens, false))
    }
}

/// Counters a server reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Rows decoding now.
    pub batch_size: usize,
    /// Decode steps run.
    pub steps: u64,
    /// Pictures encoded by the vision tower (not served from the cache).
    pub vision_runs: u64,
    /// Pictures served from the cache.
    pub vision_hits: u64,
}

/// The batch of requests decoding together, and the vision cache.
pub struct Engine<'m> {
    model: &'m PhantomModel,
    batch: Session<'m>,
    rows: Vec<Row>,
    vision: VisionCache,
    stats: EngineStats,
}

impl<'m> Engine<'m> {
    /// An idle engine for `model`, keeping up to `vision_cache_bytes` of vision tokens.
    pub fn new(model: &'m PhantomModel, vision_cache_bytes: usize) -> Self {
        Self {
            model,
            batch: Session::new(model, 0),
            rows: Vec::new(),
            vision: VisionCache {
                budget: vision_cache_bytes,
                used: 0,
                entries: HashMap::new(),
                order: VecDeque::new(),
            },
            stats: EngineStats::default(),
        }
    }

    /// Rows decoding now.
    pub fn batch_size(&self) -> usize {
        self.rows.len()
    }

    /// Whether no request is decoding.
    pub fn is_idle(&self) -> bool {
        self.rows.is_empty()
    }

    /// Counters so far.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            batch_size: self.rows.len(),
            ..self.stats
        }
    }

    /// Takes a request: prefills its prompt, sends its first token, and adds it to the batch
    /// (a beam search runs to its end at once). Errors go to the request's sink.
    pub fn admit(&mut self, job: Job) {
        self.admit_all(vec![job]);
    }

    /// Takes requests that arrived together: their prompts are prefilled as one left-padded
    /// batch (one pass through the decoder for all of them), each sends its first token, and
    /// the rows join the batch. Beam searches run on their own, to the end. Errors go to the
    /// failing request's sink; the others go on.
    pub fn admit_all(&mut self, jobs: Vec<Job>) {
        let mut ready = Vec::with_capacity(jobs.len());
        for mut job in jobs {
            match self.check(&job) {
                Ok(vision) if job.config.num_beams > 1 => {
                    if let Err(e) = self.beam_search(job.input, vision, job.config, &mut job.sink) {
                        let _ = (job.sink)(JobEvent::Failed(e.to_string()));
                    }
                }
                Ok(vision) => ready.push((job, vision)),
                Err(e) => {
                    let _ = (job.sink)(JobEvent::Failed(e.to_string()));
                }
            }
        }
        if ready.is_empty() {
            return;
        }
        if let Err(e) = self.prefill_together(&mut ready) {
            for (mut job, _) in ready {
                let _ = (job.sink)(JobEvent::Failed(e.to_string()));
            }
        }
    }

    /// Checks a request against the model and gets its vision tokens (from the cache when the
    /// picture was seen).
    fn check(&mut self, job: &Job) -> Result<Option<Tensor<3>>> {
        job.config.validate()?;
        let limit = self.model.config.llm.max_context();
        let prompt_tokens = job.input.len();
        if prompt_tokens == 0 {
            return Err(PhantomError::Input("the prompt is empty".into()));
        }
        if prompt_tokens + job.config.max_new_tokens > limit {
            return Err(PhantomError::Input(format!(
                "the prompt has {prompt_tokens} tokens; with {} new ones it exceeds the model's \
                 context of {limit}",
                job.config.max_new_tokens
            )));
        }
        let Some(pixels) = &job.pixels else {
            return Ok(None);
        };
        let (tokens, hit) = self.vision.get_or_encode(self.model, pixels)?;
        if hit {
            self.stats.vision_hits += 1;
        } else {
            self.stats.vision_runs += 1;
        }
        Ok(Some(tokens))
    }

    /// Prefills `ready` as one left-padded batch and lets the rows that go on join the batch.
    fn prefill_together(&mut self, ready: &mut Vec<(Job, Option<Tensor<3>>)>) -> Result<()> {
        let longest = ready
            .iter()
            .map(|(j, _)| j.input.len() + j.config.max_new_tokens)
            .max()
            .unwrap_or(0);
        let prompt =
            ModelInput::left_padded(ready.iter().map(|(j, _)| j.input.clone()).collect(), 0);
        let vision: Vec<Tensor<3>> = ready.iter_mut().filter_map(|(_, v)| v.take()).collect();
        let vision = (!vision.is_empty()).then(|| Tensor::cat(vision, 0));
        let mut session = Session::new(self.model, ready.len()).reserve(longest);
        let logits = block_on(session.extend_vision_tokens_async(&prompt, vision))?;

        let mut rows: Vec<Row> = std::mem::take(ready)
            .into_iter()
            .map(|(job, _)| Row {
                rng: StdRng::seed_from_u64(job.config.seed),
                seen: Seen::new(&job.input),
                prompt_tokens: job.input.len(),
                config: job.config,
                sink: job.sink,
                produced: 0,
                next: 0,
            })
            .collect();
        let first = {
            let mut views: Vec<RowView<'_>> = rows
                .iter_mut()
                .map(|r| (&r.config, &r.seen, &mut r.rng))
                .collect();
            choose(&mut views, logits)?
        };
        let mut keep = Vec::with_capacity(rows.len());
        for (i, (mut row, token)) in rows.into_iter().zip(first).enumerate() {
            match row.accept(token) {
                Some(reason) => row.finish(reason),
                None => {
                    keep.push(i);
                    self.rows.push(row);
                }
            }
        }
        if keep.is_empty() {
            return Ok(());
        }
        if keep.len() < session.batch_size() {
            session.select_rows(&keep);
        }
        self.batch.join(session)
    }

    /// A beam search for one request, run to its end.
    fn beam_search(
        &mut self,
        input: Vec<u32>,
        vision: Option<Tensor<3>>,
        config: GenerationConfig,
        sink: &mut Sink,
    ) -> Result<()> {
        let prompt_tokens = input.len();
        let prompt = ModelInput::unpadded(vec![input.clone()]);
        let mut session =
            Session::new(self.model, 1).reserve(prompt_tokens + config.max_new_tokens);
        let logits = block_on(session.extend_vision_tokens_async(&prompt, vision))?;
        let mut produced = 0;
        let mut cancelled = false;
        let stops = config.stop_token_ids.clone();
        let mut on_token = |event: TokenEvent| {
            produced += 1;
            if stops.contains(&event.token) || cancelled {
                return ControlFlow::Continue(());
            }
            let flow = sink(JobEvent::Token(event.token));
            cancelled = flow.is_break();
            flow
        };
        let generation = block_on(continue_async(
            &mut session,
            logits,
            vec![input],
            &config,
            &mut on_token,
        ))?;
        let last = generation.sequences[0].last().copied();
        let reason = match last {
            _ if cancelled => FinishReason::Cancelled,
            Some(t) if config.stop_token_ids.contains(&t) => FinishReason::Stop,
            _ => FinishReason::Length,
        };
        let _ = sink(JobEvent::Finished {
            reason,
            prompt_tokens,
            completion_tokens: generation.sequences[0].len(),
        });
        Ok(())
    }

    /// One decode step for every row: feeds each its last token, sends each its next one, and
    /// lets the finished rows go.
    pub fn step(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        let feed: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
        let chosen = self.batch.step(&feed).and_then(|logits| {
            let mut views: Vec<RowView<'_>> = self
                .rows
                .iter_mut()
                .map(|r| (&r.config, &r.seen, &mut r.rng))
                .collect();
            choose(&mut views, logits)
        });
        self.stats.steps += 1;
        let tokens = match chosen {
            Ok(tokens) => tokens,
            Err(e) => {
                // The batch cannot continue: every request hears why.
                for mut row in std::mem::take(&mut self.rows) {
                    let _ = (row.sink)(JobEvent::Failed(e.to_string()));
                }
                self.batch = Session::new(self.model, 0);
                return;
            }
        };
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut finished = Vec::new();
        for (i, (mut row, token)) in std::mem::take(&mut self.rows)
            .into_iter()
            .zip(tokens)
            .enumerate()
        {
            match row.accept(token) {
                Some(reason) => finished.push((row, reason)),
                None => {
                    keep.push(i);
                    self.rows.push(row);
                }
            }
        }
        for (row, reason) in finished {
            row.finish(reason);
        }
        if keep.len() < feed.len() {
            if keep.is_empty() {
                self.batch = Session::new(self.model, 0);
            } else {
                self.batch.select_rows(&keep);
                self.batch.trim_padding(64);
            }
        }
    }
}

/// What choosing a row's token reads: its settings, its history, its sampler.
type RowView<'a> = (&'a GenerationConfig, &'a Seen, &'a mut StdRng);

fn is_greedy(config: &GenerationConfig) -> bool {
    config.temperature == 0.0 && config.repetition_penalty == 1.0
}

/// One token per row from next-token logits `[B, V]`: on the device when every row is greedy,
/// from the host copy otherwise.
fn choose(rows: &mut [RowView<'_>], logits: Tensor<2>) -> Result<Vec<u32>> {
    let failed = |e: burn::tensor::DataError| PhantomError::Device(format!("{e:?}"));
    if rows.iter().all(|(config, _, _)| is_greedy(config)) {
        let ids = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .map_err(failed)?;
        return Ok(ids.into_iter().map(|i| i as u32).collect());
    }
    let [_, v] = logits.dims();
    let host = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(failed)?;
    Ok(host
        .chunks(v)
        .zip(rows.iter_mut())
        .map(|(scores, (config, seen, rng))| {
            if is_greedy(config) {
                argmax(scores)
            } else {
                sample_row(scores.to_vec(), seen.tokens(), config, *rng)
            }
        })
        .collect())
}
