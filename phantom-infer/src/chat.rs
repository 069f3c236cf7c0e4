//! A model with its tokenizer, template and image processor: conversations and pictures in,
//! streamed text out. The CLI, a server and the browser build on this one type.

use std::ops::ControlFlow;
use std::path::Path;

use burn::prelude::*;
use phantom_model::processor::image::{ImageProcessor, PixelValues, RgbImage, round_to_bf16};
use phantom_model::processor::prompt::{
    IMAGE_PLACEHOLDER, IMG_CONTEXT, ImageTokenIds, Template, Turn,
};
use phantom_model::processor::tokenizer::Tokenizer;
use phantom_model::{ModelInput, PhantomError, PhantomModel, Result};

use crate::blocking::block_on;
use crate::generate::{Generation, GenerationConfig, TokenEvent, generate_async};

/// Name of the tokenizer file in a model folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A Phantom model ready to chat.
pub struct Chat {
    /// The model.
    pub model: PhantomModel,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The backbone's prompt format.
    pub template: Template,
    /// Tiling and normalisation of pictures.
    pub processor: ImageProcessor,
    /// Round pixels to bf16 before the vision tower, as the released pipeline does.
    pub bf16_pixels: bool,
}

/// A prepared request: ids and pixels.
pub struct Prepared {
    /// One unpadded row.
    pub input: ModelInput,
    /// Tiles of every image, in order.
    pub pixels: Option<PixelValues>,
}

impl Chat {
    /// Pairs `model` with the `tokenizer.json` of `dir`.
    pub fn new(model: PhantomModel, tokenizer: Tokenizer) -> Result<Self> {
        let template = Template::from_architecture(model.config.llm.backbone.architecture())?;
        let processor = ImageProcessor {
            tile_size: model.config.vision.image_size as u32,
            ..ImageProcessor::default()
        };
        Ok(Self {
            model,
            tokenizer,
            template,
            processor,
            bf16_pixels: true,
        })
    }

    /// Loads `dir/tokenizer.json` for `model`.
    pub fn from_dir(model: PhantomModel, dir: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(dir.join(TOKENIZER_FILE))?;
        Self::new(model, tokenizer)
    }

    /// Turns a conversation and its images into model inputs. Images attach to the first
    /// question as `<image>` placeholders unless it already places them.
    pub fn prepare(&self, turns: &[Turn], images: &[RgbImage]) -> Result<Prepared> {
        let mut turns = turns.to_vec();
        if let Some(first) = turns.first_mut() {
            let placed = first.user.matches(IMAGE_PLACEHOLDER).count();
            if placed == 0 && !images.is_empty() {
                first.user = format!("{}{}", IMAGE_PLACEHOLDER.repeat(images.len()), first.user);
            }
        }
        if !images.is_empty() {
            // A tokenizer from another checkpoint would place vision tokens where the model
            // never looks; say so before any pixel is processed.
            let context = ImageTokenIds::resolve(&self.tokenizer)?.context;
            let expected = self.model.config.image_token_index;
            if context != expected {
                return Err(PhantomError::Input(format!(
                    "the tokenizer's {IMG_CONTEXT} is id {context} but config.json's \
                     image_token_index is {expected}: the tokenizer does not belong to this model"
                )));
            }
        }
        let mut tiles_per_image = Vec::with_capacity(images.len());
        let mut pixels: Option<PixelValues> = None;
        for image in images {
            let p = self.processor.preprocess(image);
            tiles_per_image.push(p.num_tiles);
            pixels = Some(match pixels {
                None => p,
                Some(mut all) => {
                    all.data.extend(p.data);
                    all.num_tiles += p.num_tiles;
                    all
                }
            });
        }
        if let Some(p) = pixels.as_mut().filter(|_| self.bf16_pixels) {
            round_to_bf16(&mut p.data);
        }
        let ids = self.template.encode_for(
            &self.tokenizer,
            &turns,
            &tiles_per_image,
            self.model.config.tokens_per_tile(),
        )?;
        Ok(Prepared {
            input: ModelInput::unpadded(vec![ids]),
            pixels,
        })
    }

    /// Pixel tiles as a device tensor.
    pub fn pixel_tensor(&self, pixels: &PixelValues) -> Tensor<4> {
        Tensor::from_data(
            TensorData::new(pixels.data.clone(), pixels.shape()),
            &self.model.device(),
        )
    }

    /// Stop tokens: the config's eos ids and the template's end token.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stops = self.model.config.eos_token_ids.clone();
        if let Ok(end) = self.template.end_token_id(&self.tokenizer)
            && !stops.contains(&end)
        {
            stops.push(end);
        }
        stops
    }

    /// Answers the last question of `turns`, calling `on_text` with each new piece of text as
    /// soon as it is complete (never a split UTF-8 character). Returns the answer's text and the
    /// generation record.
    pub fn answer(
        &self,
        turns: &[Turn],
        images: &[RgbImage],
        config: &GenerationConfig,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(String, Generation)> {
        block_on(self.answer_async(turns, images, config, on_text))
    }

    /// [`Chat::answer`] for callers that must not block (browsers).
    pub async fn answer_async(
        &self,
        turns: &[Turn],
        images: &[RgbImage],
        config: &GenerationConfig,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(String, Generation)> {
        let prepared = self.prepare(turns, images)?;
        let pixels = prepared.pixels.as_ref().map(|p| self.pixel_tensor(p));
        let stops = self.stop_tokens();
        let mut config = config.clone();
        if config.stop_token_ids.is_empty() {
            config.stop_token_ids = stops.clone();
        }
        let mut decoder = self
            .tokenizer
            .incremental_decoder()
            .skip_special_tokens(true);
        let mut text = String::new();
        let mut failure = None;
        let generation = generate_async(
            &self.model,
            &prepared.input,
            pixels,
            &config,
            |TokenEvent { token, .. }| {
                if stops.contains(&token) {
                    return ControlFlow::Continue(());
                }
                match decoder.step(token) {
                    Ok(Some(piece)) => {
                        text.push_str(&piece);
                        on_text(&piece)
                    }
                    Ok(None) => ControlFlow::Continue(()),
                    Err(e) => {
                        failure = Some(e);
                        ControlFlow::Break(())
                    }
                }
            },
        )
        .await?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        let rest = decoder.finish()?;
        if !rest.is_empty() {
            text.push_str(&rest);
            let _ = on_text(&rest);
        }
        Ok((text, generation))
    }
}
