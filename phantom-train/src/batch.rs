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
    /// Real tokens the model processes for this batch (prompt and answers).
    pub fn tokens(&self, with_rejected: bool) -> usize {
        self.items
            .iter()
            .map(|it| {
                let rows = it.prompt.len() + it.chosen.len();
                if with_rejected {
                    rows + it.prompt.len() + it.rejected.len()
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
/// answers first, then (when `with_rejected`) the rejected ones. The image of each triple is
/// encoded once and shared by its two rows.
pub fn answer_logps(
    model: &PhantomModel,
    batch: &PreferenceBatch,
    with_rejected: bool,
) -> Result<AnswerLogps> {
    let device = model.device();
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

    let tiles: Vec<&PixelValues> = batch
        .items
        .iter()
        .filter_map(|i| i.pixels.as_ref())
        .collect();
    let vision = if tiles.is_empty() {
        None
    } else {
        let side = tiles[0].tile_size;
        let n: usize = tiles.iter().map(|p| p.num_tiles).sum();
        let data: Vec<f32> = tiles.iter().flat_map(|p| p.data.iter().copied()).collect();
        let pixels = Tensor::<4>::from_data(TensorData::new(data, [n, 3, side, side]), &device);
        let v = model.encode_images(pixels)?;
        Some(if with_rejected {
            Tensor::cat(vec![v.clone(), v], 0)
        } else {
            v
        })
    };
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
    let n = sources.len();
    let sources = Tensor::<1, Int>::from_data(TensorData::new(sources, [n]), &device);
    let picked = hidden.reshape([r * t, d]).select(0, sources);
    let logits = model.language_model.logits(picked.reshape([1, n, d]));
    let v = logits.dims()[2];
    let logp = log_softmax(logits.reshape([n, v]), 1);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let token_logp = logp.gather(1, targets).reshape([n]);
    Ok(AnswerLogps {
        token_logp,
        segments,
    })
}
