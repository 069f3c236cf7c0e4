//! The generation loop shared by the CLI, a server and the browser: greedy, sampling
//! (temperature, top-k, top-p, repetition penalty, seed) and beam search, with stop rules and a
//! per-token streaming callback.

use std::ops::ControlFlow;

use burn::prelude::*;
use phantom_model::{ModelInput, PhantomError, PhantomModel, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::blocking::block_on;
use crate::session::{Session, Timings};

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Most new tokens per row.
    pub max_new_tokens: usize,
    /// 0 means greedy; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 disables).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 disables).
    pub top_p: f32,
    /// Penalty > 1 discourages tokens already in the prompt or output (1 disables).
    pub repetition_penalty: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Beams per prompt (1 disables beam search).
    pub num_beams: usize,
    /// Tokens that end a row (the config's eos and the template's end token).
    pub stop_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            num_beams: 1,
            stop_token_ids: Vec::new(),
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of at most `max_new_tokens`, stopping at `stop_token_ids`.
    pub fn greedy(max_new_tokens: usize, stop_token_ids: Vec<u32>) -> Self {
        Self {
            max_new_tokens,
            stop_token_ids,
            ..Self::default()
        }
    }

    /// Rejects settings that make no sense.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PhantomError::Input(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if self.num_beams == 0 {
            return bad("num_beams must be at least 1".into());
        }
        if self.num_beams > 1 && self.temperature > 0.0 {
            return bad(
                "beam search is deterministic: use temperature 0 with num_beams > 1".into(),
            );
        }
        Ok(())
    }
}

/// A token as it is produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenEvent {
    /// Prompt row.
    pub row: usize,
    /// The token.
    pub token: u32,
}

/// What a generation produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// New tokens per prompt row (the stop token included when one was produced).
    pub sequences: Vec<Vec<u32>>,
    /// Phase timings.
    pub timings: Timings,
}

/// Generates continuations of every row of `input`.
///
/// `on_token` sees each new token as soon as it is chosen (for beam search, the tokens of the
/// best hypothesis once the search ends) and may stop the whole generation early by returning
/// `ControlFlow::Break`.
pub fn generate(
    model: &PhantomModel,
    input: &ModelInput,
    pixel_values: Option<Tensor<4>>,
    config: &GenerationConfig,
    on_token: impl FnMut(TokenEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    block_on(generate_async(model, input, pixel_values, config, on_token))
}

/// [`generate`] for callers that must not block (browsers): every readback of the device is
/// awaited, so WebGPU can deliver results between tokens.
pub async fn generate_async(
    model: &PhantomModel,
    input: &ModelInput,
    pixel_values: Option<Tensor<4>>,
    config: &GenerationConfig,
    mut on_token: impl FnMut(TokenEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    config.validate()?;
    let (_, t) = input.dims();
    let limit = model.config.llm.max_context();
    if t + config.max_new_tokens > limit {
        return Err(PhantomError::Input(format!(
            "prompt of {t} tokens plus {} new tokens exceeds the model's context of {limit}",
            config.max_new_tokens
        )));
    }
    if config.num_beams > 1 {
        let result = beam_search(model, input, pixel_values, config).await?;
        'rows: for (row, seq) in result.sequences.iter().enumerate() {
            for &token in seq {
                if on_token(TokenEvent { row, token }).is_break() {
                    break 'rows;
                }
            }
        }
        return Ok(result);
    }
    sample_loop(model, input, pixel_values, config, &mut on_token).await
}

async fn sample_loop(
    model: &PhantomModel,
    input: &ModelInput,
    pixel_values: Option<Tensor<4>>,
    config: &GenerationConfig,
    on_token: &mut impl FnMut(TokenEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    let (b, _) = input.dims();
    let mut sequences = vec![Vec::new(); b];
    if config.max_new_tokens == 0 {
        input.validate(model.config.llm.vocab_size)?;
        return Ok(Generation {
            sequences,
            timings: Timings::default(),
        });
    }
    let (mut session, mut logits) = Session::prefill_async(model, input, pixel_values).await?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut history: Vec<Vec<u32>> = input
        .input_ids
        .iter()
        .zip(&input.attention_mask)
        .map(|(ids, mask)| {
            ids.iter()
                .zip(mask)
                .filter(|(_, m)| **m)
                .map(|(i, _)| *i)
                .collect()
        })
        .collect();
    let mut done = vec![false; b];
    // A finished row keeps being fed a stop token (its output is ignored), as batches must
    // advance together.
    let filler = config.stop_token_ids.first().copied().unwrap_or(0);
    for step in 0..config.max_new_tokens {
        let next = choose(logits, &history, config, &mut rng).await?;
        let mut stop = false;
        for row in 0..b {
            if done[row] {
                continue;
            }
            let token = next[row];
            sequences[row].push(token);
            history[row].push(token);
            if config.stop_token_ids.contains(&token) {
                done[row] = true;
            }
            if on_token(TokenEvent { row, token }).is_break() {
                stop = true;
            }
        }
        if stop || done.iter().all(|&d| d) || step + 1 == config.max_new_tokens {
            break;
        }
        let feed: Vec<u32> = (0..b)
            .map(|row| if done[row] { filler } else { next[row] })
            .collect();
        logits = session.step_async(&feed).await?;
    }
    Ok(Generation {
        sequences,
        timings: session.timings,
    })
}

/// Picks one token per row from next-token logits `[B, V]`.
async fn choose(
    logits: Tensor<2>,
    history: &[Vec<u32>],
    config: &GenerationConfig,
    rng: &mut StdRng,
) -> Result<Vec<u32>> {
    let [b, v] = logits.dims();
    if config.temperature == 0.0 && config.repetition_penalty == 1.0 {
        // Greedy needs only the argmax; keep the logits on the device.
        let ids = read_back(logits.argmax(1)).await?.convert::<i64>();
        let ids = ids
            .try_to_vec::<i64>()
            .map_err(|e| PhantomError::Input(format!("{e:?}")))?;
        return Ok(ids.into_iter().map(|i| i as u32).collect());
    }
    let host = read_back(logits)
        .await?
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| PhantomError::Input(format!("{e:?}")))?;
    Ok(host
        .chunks(v)
        .take(b)
        .zip(history)
        .map(|(row, seen)| sample_row(row.to_vec(), seen, config, rng))
        .collect())
}

/// Applies the repetition penalty, temperature, top-k and top-p to one row, then samples
/// (or takes the argmax when the temperature is 0).
pub fn sample_row(
    mut scores: Vec<f32>,
    seen: &[u32],
    config: &GenerationConfig,
    rng: &mut impl Rng,
) -> u32 {
    if config.repetition_penalty != 1.0 {
        let p = config.repetition_penalty;
        let mut seen: Vec<u32> = seen.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &id in &seen {
            if let Some(s) = scores.get_mut(id as usize) {
                *s = if *s < 0.0 { *s * p } else { *s / p };
            }
        }
    }
    if config.temperature == 0.0 {
        return argmax(&scores);
    }
    for s in &mut scores {
        *s /= config.temperature;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    if config.top_k > 0 {
        order.truncate(config.top_k);
    }
    let max = scores[order[0]];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((scores[i] - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if config.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= config.top_p as f64 {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut draw: f64 = rng.random();
    for (k, p) in probs.iter().enumerate() {
        draw -= p;
        if draw <= 0.0 {
            return order[k] as u32;
        }
    }
    order[probs.len() - 1] as u32
}

/// Index of the largest score; the first one on ties, as `torch.argmax`.
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// One beam hypothesis.
#[derive(Clone, Debug)]
struct Hypothesis {
    tokens: Vec<u32>,
    score: f64,
}

/// Beam search with length-normalised scores (sum of log-probabilities ÷ new tokens), as the
/// paper's evaluation uses with 3 beams. Each prompt row keeps `num_beams` live hypotheses;
/// a row is finished once it holds `num_beams` completed ones and no live beam can beat them.
async fn beam_search(
    model: &PhantomModel,
    input: &ModelInput,
    pixel_values: Option<Tensor<4>>,
    config: &GenerationConfig,
) -> Result<Generation> {
    let (b, _) = input.dims();
    let k = config.num_beams;
    let (mut session, logits) = Session::prefill_async(model, input, pixel_values).await?;
    // Expand each prompt row into k beams sharing its cache.
    let rows: Vec<usize> = (0..b).flat_map(|r| std::iter::repeat_n(r, k)).collect();
    session.select_rows(&rows);
    let mut logprobs = host_log_softmax(logits).await?;
    // Only the first beam of a row is live at the start, so identical beams are not kept.
    let mut beams: Vec<Vec<Hypothesis>> = (0..b)
        .map(|_| {
            vec![Hypothesis {
                tokens: Vec::new(),
                score: 0.0,
            }]
        })
        .collect();
    logprobs = (0..b).flat_map(|r| vec![logprobs[r].clone(); k]).collect();
    let mut finished: Vec<Vec<Hypothesis>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let normalised = |h: &Hypothesis| h.score / h.tokens.len().max(1) as f64;

    for step in 0..config.max_new_tokens {
        let mut next_rows = Vec::with_capacity(b * k);
        let mut next_tokens = Vec::with_capacity(b * k);
        for row in 0..b {
            if done[row] {
                // Keep the slots filled so the batch stays rectangular.
                next_rows.extend(std::iter::repeat_n(row * k, k));
                next_tokens.extend(std::iter::repeat_n(
                    config.stop_token_ids.first().copied().unwrap_or(0),
                    k,
                ));
                continue;
            }
            let mut candidates: Vec<(f64, usize, u32)> = Vec::new();
            for (slot, hyp) in beams[row].iter().enumerate() {
                // After every reorder, slot s of a row sits at cache row row·k + s.
                let lp = &logprobs[row * k + slot];
                let mut best: Vec<(usize, f32)> = lp.iter().copied().enumerate().collect();
                best.select_nth_unstable_by(2 * k - 1, |a, b| b.1.total_cmp(&a.1));
                best.truncate(2 * k);
                for (token, l) in best {
                    candidates.push((hyp.score + l as f64, slot, token as u32));
                }
            }
            candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut live = Vec::new();
            let mut live_rows = Vec::new();
            for (score, slot, token) in candidates {
                let mut tokens = beams[row][slot].tokens.clone();
                tokens.push(token);
                let hyp = Hypothesis { tokens, score };
                if config.stop_token_ids.contains(&token) {
                    finished[row].push(hyp);
                } else {
                    live_rows.push(row * k + slot);
                    live.push(hyp);
                }
                if live.len() == k {
                    break;
                }
            }
            finished[row].sort_by(|a, b| normalised(b).total_cmp(&normalised(a)));
            finished[row].truncate(k);
            let best_live = live.first().map(normalised).unwrap_or(f64::NEG_INFINITY);
            if finished[row].len() == k
                && finished[row]
                    .last()
                    .is_some_and(|h| normalised(h) >= best_live)
            {
                done[row] = true;
            }
            next_tokens.extend(live.iter().map(|h| *h.tokens.last().unwrap_or(&0)));
            next_rows.extend(live_rows.iter().copied());
            // Pad to k slots with copies of the best live beam.
            while next_rows.len() % k != 0 {
                next_rows.push(*live_rows.first().unwrap_or(&(row * k)));
                next_tokens.push(*live.first().and_then(|h| h.tokens.last()).unwrap_or(&0));
            }
            beams[row] = live;
        }
        if done.iter().all(|&d| d) || step + 1 == config.max_new_tokens {
            break;
        }
        session.select_rows(&next_rows);
        logprobs = host_log_softmax(session.step_async(&next_tokens).await?).await?;
    }
    let sequences = (0..b)
        .map(|row| {
            let mut pool = finished[row].clone();
            pool.extend(beams[row].iter().cloned());
            pool.sort_by(|a, b| normalised(b).total_cmp(&normalised(a)));
            pool.into_iter()
                .next()
                .map(|h| h.tokens)
                .unwrap_or_default()
        })
        .collect();
    Ok(Generation {
        sequences,
        timings: session.timings,
    })
}

async fn host_log_softmax(logits: Tensor<2>) -> Result<Vec<Vec<f32>>> {
    let [_, v] = logits.dims();
    let lp = read_back(burn::tensor::activation::log_softmax(logits, 1))
        .await?
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| PhantomError::Input(format!("{e:?}")))?;
    Ok(lp.chunks(v).map(<[f32]>::to_vec).collect())
}

/// Copies a tensor to the host without blocking the thread (the only way a browser's GPU can
/// answer).
async fn read_back<const D: usize, K>(tensor: Tensor<D, K>) -> Result<TensorData>
where
    K: burn::tensor::kind::Basic,
{
    tensor
        .into_data_async()
        .await
        .map_err(|e| PhantomError::Device(format!("reading a result back from the device: {e}")))
}
