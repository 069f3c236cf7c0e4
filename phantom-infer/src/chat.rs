//! A model with its tokenizer, template and image processor: conversations and pictures in,
//! streamed text out. The CLI, the server and the browser build on this one type.
//!
//! [`Conversation`] keeps a session across turns: its KV cache (vision tokens included) holds
//! the conversation so far, so a later question costs only its own tokens.

use std::ops::ControlFlow;
use std::path::Path;

use burn::prelude::*;
use phantom_model::processor::image::{PixelValues, RgbImage};
use phantom_model::processor::inputs::{InputProcessor, Pictures};
use phantom_model::processor::prompt::Turn;
use phantom_model::processor::tokenizer::Tokenizer;
use phantom_model::{ModelInput, PhantomModel, Result};

use crate::blocking::block_on;
use crate::generate::{Generation, GenerationConfig, TokenEvent, continue_async, generate_async};
use crate::session::Session;

/// Name of the tokenizer file in a model folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A Phantom model ready to chat.
pub struct Chat {
    /// The model.
    pub model: PhantomModel,
    /// Its tokenizer, template and image processor.
    pub inputs: InputProcessor,
}

/// A prepared request: ids and pixels.
pub struct Prepared {
    /// One unpadded row.
    pub input: ModelInput,
    /// Tiles of every image, in order.
    pub pixels: Option<PixelValues>,
}

impl Chat {
    /// Pairs `model` with `tokenizer`.
    pub fn new(model: PhantomModel, tokenizer: Tokenizer) -> Result<Self> {
        let inputs = InputProcessor::new(&model.config, tokenizer)?;
        Ok(Self { model, inputs })
    }

    /// Loads `dir/tokenizer.json` for `model`.
    pub fn from_dir(model: PhantomModel, dir: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(dir.join(TOKENIZER_FILE))?;
        Self::new(model, tokenizer)
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inputs.tokenizer
    }

    /// Turns a conversation and its images into model inputs. Images attach to the first
    /// question as `<image>` placeholders unless it already places them.
    pub fn prepare(&self, turns: &[Turn], images: &[RgbImage]) -> Result<Prepared> {
        // The tokenizer is checked before any pixel is processed.
        let ids = self.inputs.encode(
            turns,
            &Pictures {
                pixels: None,
                tiles_per_image: images
                    .iter()
                    .map(|i| self.inputs.images.tile_count(i.width(), i.height()))
                    .collect(),
            },
        )?;
        let pictures = self.inputs.pictures(images);
        Ok(Prepared {
            input: ModelInput::unpadded(vec![ids]),
            pixels: pictures.pixels,
        })
    }

    /// Pixel tiles as a device tensor.
    pub fn pixel_tensor(&self, pixels: &PixelValues) -> Tensor<4> {
        pixels.to_tensor(&self.model.device())
    }

    /// Stop tokens: the config's eos ids and the template's end token.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stops = self.model.config.eos_token_ids.clone();
        if let Ok(end) = self.inputs.end_token_id()
            && !stops.contains(&end)
        {
            stops.push(end);
        }
        stops
    }

    /// `config` with the model's stop tokens when it names none.
    fn with_stops(&self, config: &GenerationConfig) -> GenerationConfig {
        let mut config = config.clone();
        if config.stop_token_ids.is_empty() {
            config.stop_token_ids = self.stop_tokens();
        }
        config
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
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(String, Generation)> {
        let prepared = self.prepare(turns, images)?;
        let pixels = prepared.pixels.as_ref().map(|p| self.pixel_tensor(p));
        let config = self.with_stops(config);
        let mut text = TextStream::new(self, on_text);
        let generation = generate_async(&self.model, &prepared.input, pixels, &config, |event| {
            text.token(event.token)
        })
        .await?;
        Ok((text.finish()?, generation))
    }

    /// Starts a conversation about `images` (none for text only).
    pub fn conversation(&self, images: Vec<RgbImage>) -> Conversation<'_> {
        let pictures = self.inputs.pictures(&images);
        Conversation {
            chat: self,
            pictures,
            turns: Vec::new(),
            session: None,
            cached: Vec::new(),
        }
    }
}

/// Decodes streamed tokens into complete pieces of text, skipping the stop tokens.
struct TextStream<'c, F> {
    stops: Vec<u32>,
    decoder: phantom_model::processor::tokenizer::IncrementalDecoder<'c>,
    text: String,
    on_text: F,
    failure: Option<phantom_model::processor::tokenizer::TokenizerError>,
}

impl<'c, F: FnMut(&str) -> ControlFlow<()>> TextStream<'c, F> {
    fn new(chat: &'c Chat, on_text: F) -> Self {
        Self {
            stops: chat.stop_tokens(),
            decoder: chat
                .inputs
                .tokenizer
                .incremental_decoder()
                .skip_special_tokens(true),
            text: String::new(),
            on_text,
            failure: None,
        }
    }

    fn token(&mut self, token: u32) -> ControlFlow<()> {
        if self.stops.contains(&token) {
            return ControlFlow::Continue(());
        }
        match self.decoder.step(token) {
            Ok(Some(piece)) => {
                self.text.push_str(&piece);
                (self.on_text)(&piece)
            }
            Ok(None) => ControlFlow::Continue(()),
            Err(e) => {
                self.failure = Some(e);
                ControlFlow::Break(())
            }
        }
    }

    fn finish(mut self) -> Result<String> {
        if let Some(e) = self.failure {
            return Err(e.into());
        }
        let rest = self.decoder.finish()?;
        if !rest.is_empty() {
            self.text.push_str(&rest);
            let _ = (self.on_text)(&rest);
        }
        Ok(self.text)
    }
}

/// A multi-turn conversation that keeps its KV cache between questions.
///
/// Each question renders the whole conversation with the template, as the model was trained
/// to read it, and feeds only what the cache does not already hold: the longest common prefix
/// of the new prompt and the cached tokens stays, anything after it is dropped and the rest is
/// fed. The pictures are encoded once, with the first question.
pub struct Conversation<'c> {
    chat: &'c Chat,
    pictures: Pictures,
    turns: Vec<Turn>,
    session: Option<Session<'c>>,
    /// The ids the session's cache holds, in order.
    cached: Vec<u32>,
}

impl<'c> Conversation<'c> {
    /// The turns so far (the last one answered once [`Conversation::ask`] returns).
    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// Tokens the cache holds.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Asks `question`, streaming the answer's text to `on_text`; returns the answer and the
    /// generation record, whose timings (and `prompt_tokens`) cover this turn only.
    pub fn ask(
        &mut self,
        question: impl Into<String>,
        config: &GenerationConfig,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(String, Generation)> {
        block_on(self.ask_async(question, config, on_text))
    }

    /// [`Conversation::ask`] for callers that must not block (browsers).
    pub async fn ask_async(
        &mut self,
        question: impl Into<String>,
        config: &GenerationConfig,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(String, Generation)> {
        let chat = self.chat;
        let config = chat.with_stops(config);
        config.validate()?;
        self.turns.push(Turn::question(question));
        let result = self.answer_last(&config, on_text).await;
        match &result {
            Ok((text, _)) => {
                if let Some(last) = self.turns.last_mut() {
                    last.assistant = Some(text.clone());
                }
            }
            Err(_) => {
                // The question stays unasked; the cache may hold part of it, which the next
                // prompt's common prefix check discards.
                self.turns.pop();
            }
        }
        result
    }

    async fn answer_last(
        &mut self,
        config: &GenerationConfig,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(String, Generation)> {
        let chat = self.chat;
        let ids = chat.inputs.encode(&self.turns, &self.pictures)?;
        let limit = chat.model.config.llm.max_context();
        if ids.len() + config.max_new_tokens > limit {
            return Err(phantom_model::PhantomError::Input(format!(
                "the conversation has {} tokens; with {} new ones it exceeds the model's \
                 context of {limit}",
                ids.len(),
                config.max_new_tokens
            )));
        }
        // Keep what the cache shares with the new prompt, and at least one token to feed.
        let mut common = self
            .cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        let image = chat.model.config.image_token_index;
        if self.session.is_none() || ids[common..].contains(&image) {
            // A new prefill: nothing to keep, or vision tokens to place.
            common = 0;
        }
        let reserve = ids.len() + config.max_new_tokens;
        if common == 0 {
            self.session = None;
        }
        let session = self
            .session
            .get_or_insert_with(|| Session::new(&chat.model, 1).reserve(reserve));
        if common > 0 {
            session.truncate(common)?;
            session.reset_timings();
        }
        self.cached.truncate(common);
        let suffix = ModelInput::unpadded(vec![ids[common..].to_vec()]);
        let pixels = if common == 0 {
            self.pictures.pixels.as_ref().map(|p| chat.pixel_tensor(p))
        } else {
            None
        };
        let logits = match session.extend_async(&suffix, pixels).await {
            Ok(logits) => logits,
            Err(e) => {
                self.session = None;
                self.cached.clear();
                return Err(e);
            }
        };
        self.cached.extend_from_slice(&ids[common..]);

        let mut text = TextStream::new(chat, on_text);
        let mut on_token = |event: TokenEvent| text.token(event.token);
        let generation =
            match continue_async(session, logits, vec![ids.clone()], config, &mut on_token).await {
                Ok(generation) => generation,
                Err(e) => {
                    self.session = None;
                    self.cached.clear();
                    return Err(e);
                }
            };
        // The session now holds every chosen token but the last (beam search leaves it at the
        // prompt).
        if config.num_beams == 1 {
            let answer = &generation.sequences[0];
            self.cached
                .extend_from_slice(&answer[..answer.len().saturating_sub(1)]);
        }
        Ok((text.finish()?, generation))
    }
}
