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
    let (b, t) = input.dims();
    let limit = model.config.llm.max_context();
    if t + config.max_new_tokens > limit {
        return Err(PhantomError::Input(format!(
            "prompt of {t} tokens plus {} new tokens exceeds the model's context of {limit}",
            config.max_new_tokens
        )));
    }
    if config.max_new_tokens == 0 {
        input.validate(model.config.llm.vocab_size)?;
        return Ok(Generation {
            sequences: vec![Vec::new(); b],
            timings: Timings::default(),
        });
    }
    let mut session = Session::new(model, b).reserve(t + config.max_new_tokens);
    let logits = session.extend_async(input, pixel_values).await?;
    let history = real_tokens(input);
    let mut generation =
        continue_async(&mut session, logits, history, config, &mut on_token).await?;
    generation.timings = session.timings;
    Ok(generation)
}

/// Each row's real (unpadded) tokens.
pub fn real_tokens(input: &ModelInput) -> Vec<Vec<u32>> {
    input
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
        .collect()
}

/// Generates from a session whose next-token logits are `logits` (`[B, V]`), after the tokens
/// `history` (per row, for the repetition penalty). The session is left holding every token
/// fed to it: the prompt and each chosen token except the last of each row. Timings are the
/// session's own (callers that reuse a session reset them per answer).
///
/// Beam search reorders and duplicates the session's rows; it ends with one row per prompt,
/// holding only what the session held before.
pub async fn continue_async(
    session: &mut Session<'_>,
    logits: Tensor<2>,
    history: Vec<Vec<u32>>,
    config: &GenerationConfig,
    on_token: &mut impl FnMut(TokenEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    config.validate()?;
    if config.num_beams > 1 {
        let result = beam_search(session, logits, config).await?;
        'rows: for (row, seq) in result.sequences.iter().enumerate() {
            for &token in seq {
                if on_token(TokenEvent { row, token }).is_break() {
                    break 'rows;
                }
            }
        }
        return Ok(result);
    }
    sample_loop(session, logits, history, config, on_token).await
}

async fn sample_loop(
    session: &mut Session<'_>,
    mut logits: Tensor<2>,
    history: Vec<Vec<u32>>,
    config: &GenerationConfig,
    on_token: &mut impl FnMut(TokenEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    let b = logits.dims()[0];
    let mut sequences = vec![Vec::new(); b];
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut seen: Vec<Seen> = history.iter().map(|row| Seen::new(row)).collect();
    let mut done = vec![false; b];
    // A finished row keeps being fed a stop token (its output is ignored), as batches must
    // advance together.
    let filler = config.stop_token_ids.first().copied().unwrap_or(0);
    for step in 0..config.max_new_tokens {
        let next = choose(logits, &seen, config, &mut rng).await?;
        let mut stop = false;
        for row in 0..b {
            if done[row] {
                continue;
            }
            let token = next[row];
            sequences[row].push(token);
            seen[row].insert(token);
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

/// The distinct tokens a row has seen, for the repetition penalty: kept sorted and updated one
/// token at a time instead of being rebuilt every step.
#[derive(Clone, Debug, Default)]
pub struct Seen(Vec<u32>);

impl Seen {
    /// The distinct tokens of `tokens`.
    pub fn new(tokens: &[u32]) -> Self {
        let mut ids = tokens.to_vec();
        ids.sort_unstable();
        ids.dedup();
        Self(ids)
    }

    /// Adds one token.
    pub fn insert(&mut self, token: u32) {
        if let Err(at) = self.0.binary_search(&token) {
            self.0.insert(at, token);
        }
    }

    /// The distinct tokens, ascending.
    pub fn tokens(&self) -> &[u32] {
        &self.0
    }
}

/// Picks one token per row from next-token logits `[B, V]`.
async fn choose(
    logits: Tensor<2>,
    seen: &[Seen],
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
        .zip(seen)
        .map(|(row, seen)| sample_row(row.to_vec(), seen.tokens(), config, rng))
        .collect())
}

/// Applies the repetition penalty, temperature, top-k and top-p to one row, then samples
/// (or takes the argmax when the temperature is 0). `seen` lists the distinct tokens the row
/// has seen.
///
/// Only what the settings need is ordered: plain temperature sampling draws from the whole
/// row without sorting it, top-k sorts its k candidates, and top-p widens a partial selection
/// until it holds the probability mass p.
pub fn sample_row(
    mut scores: Vec<f32>,
    seen: &[u32],
    config: &GenerationConfig,
    rng: &mut impl Rng,
) -> u32 {
    if config.repetition_penalty != 1.0 {
        let p = config.repetition_penalty;
        for &id in seen {
            if let Some(s) = scores.get_mut(id as usize) {
                *s = if *s < 0.0 { *s * p } else { *s / p };
            }
        }
    }
    if config.temperature == 0.0 || scores.len() < 2 {
        return argmax(&scores);
    }
    let inv_t = 1.0 / f64::from(config.temperature);
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |s: f32| ((f64::from(s) - f64::from(max)) * inv_t).exp();
    let top_k = if config.top_k > 0 {
        config.top_k.min(scores.len())
    } else {
        scores.len()
    };
    if top_k == scores.len() && config.top_p >= 1.0 {
        // The whole distribution: one pass for the total, one to draw.
        let total: f64 = scores.iter().map(|&s| weight(s)).sum();
        let mut draw = rng.random::<f64>() * total;
        let mut last = 0;
        for (i, &s) in scores.iter().enumerate() {
            let w = weight(s);
            if w > 0.0 {
                last = i;
            }
            draw -= w;
            if draw <= 0.0 {
                return i as u32;
            }
        }
        return last as u32;
    }
    // Candidates in decreasing order: the top k, or for top-p a prefix grown until it holds
    // the mass p (most rows need a few hundred tokens, not the vocabulary).
    let mut order: Vec<usize> = (0..scores.len()).collect();
    let by_score = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]);
    let total: f64 = if top_k < scores.len() {
        0.0
    } else {
        scores.iter().map(|&s| weight(s)).sum()
    };
    let mut keep = if top_k < scores.len() {
        top_k
    } else {
        64.min(scores.len())
    };
    loop {
        if keep < order.len() {
            order.select_nth_unstable_by(keep - 1, by_score);
        }
        order[..keep].sort_unstable_by(by_score);
        if top_k < scores.len() || config.top_p >= 1.0 || keep == scores.len() {
            break;
        }
        let mass: f64 = order[..keep].iter().map(|&i| weight(scores[i])).sum();
        if mass >= f64::from(config.top_p) * total {
            break;
        }
        keep = (keep * 4).min(scores.len());
    }
    order.truncate(keep);
    let mut probs: Vec<f64> = order.iter().map(|&i| weight(scores[i])).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if config.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut cut = probs.len();
        for (k, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= f64::from(config.top_p) {
                cut = k + 1;
                break;
            }
        }
        probs.truncate(cut);
        order.truncate(cut);
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
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
    session: &mut Session<'_>,
    logits: Tensor<2>,
    config: &GenerationConfig,
) -> Result<Generation> {
    let b = logits.dims()[0];
    let k = config.num_beams;
    let prompt_len = session.len();
    // Expand each prompt row into k beams sharing its cache.
    let rows: Vec<usize> = (0..b).flat_map(|r| std::iter::repeat_n(r, k)).collect();
    session.select_rows(&rows);
    let mut logprobs = top_log_probs(logits, 2 * k).await?;
    // Only the first beam of a row is live at the start, so identical beams are not kept.
    let mut beams: Vec<Vec<Hypothesis>> = (0..b)
        .map(|_| {
            vec![Hypothesis {
                tokens: Vec::new(),
                score: 0.0,
            }]
        })
        .collect();
    logprobs = (0..b)
        .flat_map(|r| std::iter::repeat_n(logprobs[r].clone(), k))
        .collect();
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
                for &(token, l) in &logprobs[row * k + slot] {
                    candidates.push((hyp.score + f64::from(l), slot, token));
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
        logprobs = top_log_probs(session.step_async(&next_tokens).await?, 2 * k).await?;
    }
    // One row per prompt again, holding what it held before the search.
    let firsts: Vec<usize> = (0..b).map(|row| row * k).collect();
    session.select_rows(&firsts);
    session.truncate(prompt_len)?;
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

/// The `n` most likely next tokens of every row with their log-probabilities, best first.
///
/// A GPU ranks them itself and sends back `n` per row; on the CPU the whole row is already in
/// host memory and a linear-time selection beats sorting it there.
async fn top_log_probs(logits: Tensor<2>, n: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let [rows, v] = logits.dims();
    let n = n.min(v);
    let lp = burn::tensor::activation::log_softmax(logits, 1);
    let on_cpu = phantom_model::device::is_cpu(&lp.device());
    let host = |t: TensorData| -> Result<Vec<f32>> {
        t.convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| PhantomError::Input(format!("{e:?}")))
    };
    if on_cpu {
        let all = host(read_back(lp).await?)?;
        return Ok(all
            .chunks(v)
            .map(|row| {
                let mut best: Vec<(u32, f32)> = row
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, l))
                    .collect();
                best.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
                best.truncate(n);
                best.sort_by(|a, b| b.1.total_cmp(&a.1));
                best
            })
            .collect());
    }
    let (values, indices) = lp.topk_with_indices(n, 1);
    let values = host(read_back(values).await?)?;
    let indices = read_back(indices)
        .await?
        .convert::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| PhantomError::Input(format!("{e:?}")))?;
    Ok((0..rows)
        .map(|r| {
            (0..n)
                .map(|i| (indices[r * n + i] as u32, values[r * n + i]))
                .collect()
        })
        .collect())
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
