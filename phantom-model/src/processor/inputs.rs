//! One path from a conversation and its pictures to model inputs, shared by the chat CLI, the
//! server, the web page and training: pictures are tiled and normalised as the released
//! pipeline does (and rounded to bf16, as its `generate()` does), `<image>` placeholders go in
//! front of the first question unless it places them, and the backbone's template renders
//! the turns.

use crate::config::PhantomConfig;
use crate::error::{PhantomError, Result};
use crate::processor::image::{ImageProcessor, PixelValues, RgbImage, round_to_bf16};
use crate::processor::prompt::{IMAGE_PLACEHOLDER, IMG_CONTEXT, ImageTokenIds, Template, Turn};
use crate::processor::tokenizer::Tokenizer;

/// A model's tokenizer, template and image processor.
#[derive(Clone, Debug)]
pub struct InputProcessor {
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The backbone's prompt format.
    pub template: Template,
    /// Tiling and normalisation of pictures (tiles the vision tower's size).
    pub images: ImageProcessor,
    /// Round pixels to bf16 before the vision tower, as the released pipeline does.
    pub bf16_pixels: bool,
    /// Vision tokens per tile.
    pub tokens_per_tile: usize,
    /// The config's `image_token_index`, which the tokenizer's `<IMG_CONTEXT>` must be.
    pub image_token_index: u32,
}

/// Pictures as the vision tower reads them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pictures {
    /// Every tile of every picture, in order; `None` without pictures.
    pub pixels: Option<PixelValues>,
    /// Tiles of each picture.
    pub tiles_per_image: Vec<usize>,
}

impl InputProcessor {
    /// The processor of a model with `config`, with `tokenizer`.
    pub fn new(config: &PhantomConfig, tokenizer: Tokenizer) -> Result<Self> {
        Ok(Self {
            tokenizer,
            template: Template::from_architecture(config.llm.backbone.architecture())?,
            images: ImageProcessor {
                tile_size: config.vision.image_size as u32,
                ..ImageProcessor::default()
            },
            bf16_pixels: true,
            tokens_per_tile: config.tokens_per_tile(),
            image_token_index: config.image_token_index,
        })
    }

    /// Tiles, normalises (and rounds) `images`.
    pub fn pictures(&self, images: &[RgbImage]) -> Pictures {
        self.pictures_with(&self.images, images)
    }

    /// [`InputProcessor::pictures`] with another tiling (a request's own tile budget, say).
    pub fn pictures_with(&self, processor: &ImageProcessor, images: &[RgbImage]) -> Pictures {
        let tiles: Vec<PixelValues> = images.iter().map(|i| processor.preprocess(i)).collect();
        let mut pictures = Pictures {
            tiles_per_image: tiles.iter().map(|p| p.num_tiles).collect(),
            pixels: PixelValues::concat(&tiles),
        };
        if let Some(p) = pictures.pixels.as_mut().filter(|_| self.bf16_pixels) {
            round_to_bf16(&mut p.data);
        }
        pictures
    }

    /// The token ids of `turns` about `pictures`: the pictures attach to the first question as
    /// `<image>` placeholders unless it already places them.
    ///
    /// # Errors
    ///
    /// When the tokenizer's `<IMG_CONTEXT>` is not the config's `image_token_index` (a
    /// tokenizer of another model would place vision tokens where the model never looks), or
    /// the template cannot render the turns.
    pub fn encode(&self, turns: &[Turn], pictures: &Pictures) -> Result<Vec<u32>> {
        self.encode_with_system(None, turns, pictures)
    }

    /// [`InputProcessor::encode`] after a system message (in the backbone's chat format).
    /// Pictures attach to the first question unless the questions place `<image>` themselves.
    pub fn encode_with_system(
        &self,
        system: Option<&str>,
        turns: &[Turn],
        pictures: &Pictures,
    ) -> Result<Vec<u32>> {
        let mut turns = turns.to_vec();
        let n = pictures.tiles_per_image.len();
        let placed: usize = turns
            .iter()
            .map(|t| t.user.matches(IMAGE_PLACEHOLDER).count())
            .sum();
        if let Some(first) = turns.first_mut()
            && placed == 0
            && n > 0
        {
            first.user = format!("{}{}", IMAGE_PLACEHOLDER.repeat(n), first.user);
        }
        if n > 0 {
            let context = ImageTokenIds::resolve(&self.tokenizer)?.context;
            if context != self.image_token_index {
                return Err(PhantomError::Input(format!(
                    "the tokenizer's {IMG_CONTEXT} is id {context} but config.json's \
                     image_token_index is {}: the tokenizer does not belong to this model",
                    self.image_token_index
                )));
            }
        }
        let mut ids = match system {
            Some(text) => {
                let t = self.template;
                let rendered = format!("{}{text}{}", t.system_start(), t.end_token());
                self.tokenizer.encode(&rendered)?
            }
            None => Vec::new(),
        };
        ids.extend(self.template.encode_for(
            &self.tokenizer,
            &turns,
            &pictures.tiles_per_image,
            self.tokens_per_tile,
        )?);
        Ok(ids)
    }

    /// The id that ends an answer in this template.
    pub fn end_token_id(&self) -> Result<u32> {
        Ok(self.template.end_token_id(&self.tokenizer)?)
    }
}
