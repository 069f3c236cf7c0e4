//! From preference triples to model inputs: the chosen and rejected sequences of a triple share
//! the prompt (image + question) and differ in the answer.
//!
//! A sequence is `prompt ++ answer ++ <end>`, where the prompt ends with the assistant tag of
//! the backbone's template, exactly as `phantom-infer` builds it at inference. Rows are
//! left-padded (the model takes each row's phantom token at its first real position), and only
//! answer tokens (with the end token) are scored.

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use phantom_model::processor::image::{ImageProcessor, PixelValues, RgbImage};
use phantom_model::processor::inputs::{InputProcessor, Pictures};
use phantom_model::processor::prompt::Turn;
use phantom_model::processor::tokenizer::Tokenizer;
use phantom_model::{ModelInput, PhantomModel};

use crate::error::{Result, TrainError};
use crate::loss::AnswerLogps;

/// One tokenized triple, ready to batch.
#[derive(Clone, Debug)]
pub struct PreferenceItem {
    /// Prompt ids, ending with the assistant tag.
    pub prompt: Vec<u32>,
    /// Ids of the correct answer followed by the end token.
    pub chosen: Vec<u32>,
    /// Ids of the rejected answer followed by the end token.
    pub rejected: Vec<u32>,
    /// The image's tiles, if the triple has one.
    pub pixels: Option<PixelValues>,
}

/// A batch of triples, kept on the host; tensors are built on the model's device by the step.
#[derive(Clone, Debug, Default)]
pub struct PreferenceBatch {
    /// The triples.
    pub items: Vec<PreferenceItem>,
}

impl PreferenceBatch {
    /// Real tokens the model processes for this batch: each prompt once, then the answers.
    pub fn tokens(&self, with_rejected: bool) -> usize {
        self.items
            .iter()
            .map(|it| {
                let rows = it.prompt.len() + it.chosen.len();
                if with_rejected {
                    rows + it.rejected.len()
                } else {
                    rows
                }
            })
            .sum()
    }
}

/// Tokenizes triples the way `phantom-infer` prompts the model.
#[derive(Clone, Debug)]
pub struct TripleEncoder {
    /// The model's tokenizer, template and image processor: the path every caller shares,
    /// so the model trains on exactly the prompts and pixels it will see.
    pub inputs: InputProcessor,
    /// Id that ends an answer.
    pub end_id: u32,
    /// Longest sequence the model accepts.
    pub max_len: usize,
}

impl TripleEncoder {
    /// An encoder for `model`'s template, image size and context.
    pub fn new(model: &PhantomModel, tokenizer: Tokenizer, max_tiles: usize) -> Result<Self> {
        let mut inputs = InputProcessor::new(&model.config, tokenizer)?;
        inputs.images.max_tiles = ImageProcessor::new(max_tiles)?.max_tiles;
        let end_id = inputs.end_token_id()?;
        Ok(Self {
            inputs,
            end_id,
            max_len: model.config.llm.max_context(),
        })
    }

    /// The prompt of a question about `n_images` images (each of `tiles[i]` tiles); images go
    /// in front of the question unless it places `<image>` itself, as at inference.
    pub fn prompt(&self, question: &str, tiles: &[usize]) -> Result<Vec<u32>> {
        let pictures = Pictures {
            pixels: None,
            tiles_per_image: tiles.to_vec(),
        };
        Ok(self.inputs.encode(&[Turn::question(question)], &pictures)?)
    }

    /// Answer ids with the end token.
    pub fn answer(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.inputs.tokenizer.encode(text)?;
        ids.push(self.end_id);
        Ok(ids)
    }

    /// Tokenizes a triple whose image (if any) is already decoded.
    pub fn encode(
        &self,
        question: &str,
        chosen: &str,
        rejected: &str,
        image: Option<&RgbImage>,
    ) -> Result<PreferenceItem> {
        let pictures = self
            .inputs
            .pictures(image.map_or(&[], std::slice::from_ref));
        let item = PreferenceItem {
            prompt: self.inputs.encode(&[Turn::question(question)], &pictures)?,
            chosen: self.answer(chosen)?,
            rejected: self.answer(rejected)?,
            pixels: pictures.pixels,
        };
        let longest = item.prompt.len() + item.chosen.len().max(item.rejected.len());
        if longest > self.max_len {
            return Err(TrainError::Record(format!(
                "the sequence has {longest} tokens, more than the model's context of {}",
                self.max_len
            )));
        }
        Ok(item)
    }
}

/// Runs `model` over a batch and returns the log-probability of every answer token: chosen
/// answers first, then (when `with_rejected`) the rejected ones.
///
/// Each triple's prompt (its image tokens and phantom vectors included) runs once: the prompts
/// fill a KV cache, whose rows are then repeated for the rejected answers, and both answers
/// continue from it, with gradients flowing back through the shared prompt. The first answer
/// token is predicted by the prompt's last hidden state, the others by the answer's own.
pub fn answer_logps(
    model: &PhantomModel,
    batch: &PreferenceBatch,
    with_rejected: bool,
) -> Result<AnswerLogps> {
    let device = model.device();
    let b = batch.items.len();
    if b == 0 {
        return Err(TrainError::Record("an empty batch".into()));
    }
    let prompt = ModelInput::left_padded(batch.items.iter().map(|i| i.prompt.clone()).collect(), 0);
    let tp = prompt.dims().1;
    let answers: Vec<&Vec<u32>> = batch
        .items
        .iter()
        .map(|i| &i.chosen)
        .chain(
            batch
                .items
                .iter()
                .filter(|_| with_rejected)
                .map(|i| &i.rejected),
        )
        .collect();
    let r = answers.len();
    let ta = answers.iter().map(|a| a.len()).max().unwrap_or(0);
    if ta == 0 {
        return Err(TrainError::Record("an answer without tokens".into()));
    }

    let vision = encode_tiles(model, batch, false)?;
    let embeds = model.embed(&prompt, vision)?;
    let mut cache = model.new_cache(b);
    cache.reserve(tp + ta);
    let prompt_hidden = model.forward_embeds(embeds, &prompt.attention_mask, &mut cache, None)?;
    let d = prompt_hidden.dims()[2];
    // Row `row` of the answers continues prompt `row % b`.
    let owners: Vec<usize> = (0..r).map(|row| row % b).collect();
    if r > b {
        cache.select_rows(&owners);
    }
    // Answers are right-padded: the padding comes after every scored token, so causality
    // keeps it out of them.
    let rows: Vec<Vec<u32>> = answers
        .iter()
        .map(|a| {
            let mut row = a.to_vec();
            row.resize(ta, 0);
            row
        })
        .collect();
    let continuation = ModelInput::unpadded(rows);
    let embeds = model.embed(&continuation, None)?;
    let answer_hidden =
        model.forward_embeds(embeds, &continuation.attention_mask, &mut cache, None)?;

    // Predictors: [prompt's last state ‖ answer states], `r × (1 + ta)` rows of width d.
    let owners_t = Tensor::<1, Int>::from_data(
        TensorData::new(owners.iter().map(|&o| o as i64).collect::<Vec<_>>(), [r]),
        &device,
    );
    let last = prompt_hidden.narrow(1, tp - 1, 1).select(0, owners_t);
    let states = Tensor::cat(vec![last, answer_hidden], 1).reshape([r * (1 + ta), d]);
    let mut sources = Vec::new();
    let mut targets = Vec::new();
    let mut segments: Vec<Range<usize>> = Vec::with_capacity(r);
    for (row, answer) in answers.iter().enumerate() {
        let start = sources.len();
        for (j, &token) in answer.iter().enumerate() {
            sources.push((row * (1 + ta) + j) as i64);
            targets.push(token as i64);
        }
        segments.push(start..sources.len());
    }
    Ok(AnswerLogps {
        token_logp: token_logps(model, states, sources, targets)?,
        segments,
    })
}

/// [`answer_logps`] computed without sharing: every answer runs with its own copy of the
/// prompt, as one left-padded batch. The reference the shared computation is tested against.
pub fn answer_logps_unshared(
    model: &PhantomModel,
    batch: &PreferenceBatch,
    with_rejected: bool,
) -> Result<AnswerLogps> {
    let mut rows = Vec::new();
    let mut answers = Vec::new();
    let sides: &[bool] = if with_rejected {
        &[true, false]
    } else {
        &[true]
    };
    for &chosen in sides {
        for item in &batch.items {
            let answer = if chosen { &item.chosen } else { &item.rejected };
            let mut row = item.prompt.clone();
            row.extend_from_slice(answer);
            answers.push((item.prompt.len(), answer.len()));
            rows.push(row);
        }
    }
    if rows.is_empty() {
        return Err(TrainError::Record("an empty batch".into()));
    }
    let input = ModelInput::left_padded(rows, 0);
    let (r, t) = input.dims();
    let vision = encode_tiles(model, batch, with_rejected)?;
    let embeds = model.embed(&input, vision)?;
    let mut cache = model.new_cache(r);
    let hidden = model.forward_embeds(embeds, &input.attention_mask, &mut cache, None)?;
    let d = hidden.dims()[2];

    // Token at position p is predicted by the hidden state at p − 1.
    let mut sources = Vec::new();
    let mut targets = Vec::new();
    let mut segments: Vec<Range<usize>> = Vec::with_capacity(r);
    for (row, &(prompt_len, answer_len)) in answers.iter().enumerate() {
        let pad = t - prompt_len - answer_len;
        let start = sources.len();
        for p in pad + prompt_len..pad + prompt_len + answer_len {
            sources.push((row * t + p - 1) as i64);
            targets.push(input.input_ids[row][p] as i64);
        }
        segments.push(start..sources.len());
    }
    Ok(AnswerLogps {
        token_logp: token_logps(model, hidden.reshape([r * t, d]), sources, targets)?,
        segments,
    })
}

/// The vision tokens of the batch's pictures, encoded once (repeated for the rejected rows
/// when `twice`).
fn encode_tiles(
    model: &PhantomModel,
    batch: &PreferenceBatch,
    twice: bool,
) -> Result<Option<Tensor<3>>> {
    let Some(tiles) = PixelValues::concat(batch.items.iter().filter_map(|i| i.pixels.as_ref()))
    else {
        return Ok(None);
    };
    let v = model.encode_images(tiles.to_tensor(&model.device()))?;
    Ok(Some(if twice {
        Tensor::cat(vec![v.clone(), v], 0)
    } else {
        v
    }))
}

/// `log p(target)` of each `(source, target)` pair: the hidden state at row `source` of
/// `states` (`[rows, D]`) through the LM head.
fn token_logps(
    model: &PhantomModel,
    states: Tensor<2>,
    sources: Vec<i64>,
    targets: Vec<i64>,
) -> Result<Tensor<1>> {
    let device = model.device();
    let d = states.dims()[1];
    let n = sources.len();
    let sources = Tensor::<1, Int>::from_data(TensorData::new(sources, [n]), &device);
    let picked = states.select(0, sources);
    let logits = model.language_model.logits(picked.reshape([1, n, d]));
    let v = logits.dims()[2];
    let logp = log_softmax(logits.reshape([n, v]), 1);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    Ok(logp.gather(1, targets).reshape([n]))
}
