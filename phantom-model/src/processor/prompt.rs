//! Chat templates of the Phantom backbones and prompt → input-id construction.
//!
//! The official code (`prompt_rule` / `eval_process`) uses no system prompt, no BOS and an
//! empty separator between turns:
//!
//! * ChatML (Qwen2 for 0.5B, InternLM2 for 1.8B/7B):
//!   `<|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n`, answers end with `<|im_end|>`.
//! * Phi-3 (3.8B): `<|user|>\n{q}<|end|><|assistant|>\n`, answers end with `<|end|>`.
//!
//! Note that there is no newline between the end of the user turn and the assistant tag, unlike
//! the stock InternLM2/Phi-3 chat templates.
//!
//! Each `<image>` in a question becomes `<img>` + 256·n_tiles × `<IMG_CONTEXT>` + `</img>`.

use super::tokenizer::{Tokenizer, TokenizerError};

/// Placeholder for one image inside a question.
pub const IMAGE_PLACEHOLDER: &str = "<image>";
/// Added token that opens an image's run of context tokens.
pub const IMG_START: &str = "<img>";
/// Added token that closes an image's run of context tokens.
pub const IMG_END: &str = "</img>";
/// Added token whose embedding rows are replaced by vision tokens (`image_token_index`).
pub const IMG_CONTEXT: &str = "<IMG_CONTEXT>";
/// Vision tokens per 448×448 tile: a 32×32 patch grid, pixel-shuffled by 0.5 → 16×16.
pub const TOKENS_PER_TILE: usize = 256;

/// Errors of prompt rendering and encoding.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// `llm_config.architectures` names an LLM without a known Phantom template.
    #[error(
        "unknown LLM architecture `{0}` (expected Qwen2ForCausalLM, InternLM2ForCausalLM \
         or Phi3ForCausalLM)"
    )]
    UnknownArchitecture(String),
    /// A conversation needs at least one turn.
    #[error("the conversation has no turns")]
    EmptyConversation,
    /// Only the last turn may be left unanswered (that is where the model continues).
    #[error("turn {turn} has no assistant answer, but only the last turn may omit it")]
    MissingAnswer {
        /// 0-based index of the offending turn.
        turn: usize,
    },
    /// The questions hold a different number of `<image>` placeholders than images given.
    #[error(
        "the questions contain {placeholders} `<image>` placeholder(s) but {images} image(s) were given"
    )]
    ImageCountMismatch {
        /// `<image>` occurrences over all questions.
        placeholders: usize,
        /// Length of the tile-count list.
        images: usize,
    },
    /// Every image has at least one tile.
    #[error("image {image} has 0 tiles")]
    ZeroTiles {
        /// 0-based index of the image in order of appearance.
        image: usize,
    },
    /// Tokenization failed, or a token the prompt needs is missing from the tokenizer.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, PromptError>;

/// A chat template of one Phantom backbone family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Template {
    /// Qwen2 (Phantom-0.5B) and InternLM2 (Phantom-1.8B/7B).
    ChatMl,
    /// Phi-3-mini (Phantom-3.8B).
    Phi3,
}

impl Template {
    /// Picks the template from an `llm_config.architectures` entry.
    pub fn from_architecture(architecture: &str) -> Result<Self> {
        match architecture {
            "Qwen2ForCausalLM" | "InternLM2ForCausalLM" => Ok(Self::ChatMl),
            "Phi3ForCausalLM" => Ok(Self::Phi3),
            other => Err(PromptError::UnknownArchitecture(other.to_string())),
        }
    }

    /// Text that opens a user turn.
    #[must_use]
    pub fn user_start(self) -> &'static str {
        match self {
            Self::ChatMl => "<|im_start|>user\n",
            Self::Phi3 => "<|user|>\n",
        }
    }

    /// Text that opens a system turn. The released checkpoints were trained without one; a
    /// system message renders in the backbone's own chat format.
    #[must_use]
    pub fn system_start(self) -> &'static str {
        match self {
            Self::ChatMl => "<|im_start|>system\n",
            Self::Phi3 => "<|system|>\n",
        }
    }

    /// Text that opens the assistant's answer (the generation prompt).
    #[must_use]
    pub fn assistant_start(self) -> &'static str {
        match self {
            Self::ChatMl => "<|im_start|>assistant\n",
            Self::Phi3 => "<|assistant|>\n",
        }
    }

    /// Token that ends both user and assistant turns; generation stops on it (besides the
    /// config's `eos_token_id`).
    #[must_use]
    pub fn end_token(self) -> &'static str {
        match self {
            Self::ChatMl => "<|im_end|>",
            Self::Phi3 => "<|end|>",
        }
    }

    /// Id of [`Template::end_token`], checked to be a single indivisible token.
    pub fn end_token_id(self, tokenizer: &Tokenizer) -> Result<u32> {
        Ok(tokenizer.require_special(self.end_token())?)
    }

    /// Renders a conversation as text, leaving `<image>` placeholders unexpanded.
    pub fn render(self, turns: &[Turn]) -> Result<String> {
        let segments = self.segments(turns)?;
        let mut out = String::new();
        for segment in &segments {
            match segment {
                Segment::Text(text) => out.push_str(text),
                Segment::Image => out.push_str(IMAGE_PLACEHOLDER),
            }
        }
        Ok(out)
    }

    /// Renders a conversation as text with every `<image>` expanded to
    /// `<img>` + 256·n_tiles × `<IMG_CONTEXT>` + `</img>`; `n_tiles` has one entry per image,
    /// in order of appearance.
    pub fn render_expanded(self, turns: &[Turn], n_tiles: &[usize]) -> Result<String> {
        self.render_expanded_for(turns, n_tiles, TOKENS_PER_TILE)
    }

    /// [`Template::render_expanded`] for a vision tower giving `tokens_per_tile` tokens per tile.
    pub fn render_expanded_for(
        self,
        turns: &[Turn],
        n_tiles: &[usize],
        tokens_per_tile: usize,
    ) -> Result<String> {
        let segments = self.segments(turns)?;
        check_images(&segments, n_tiles)?;
        let mut out = String::new();
        let mut tiles = n_tiles.iter();
        for segment in &segments {
            match segment {
                Segment::Text(text) => out.push_str(text),
                Segment::Image => {
                    // check_images guarantees one entry per placeholder.
                    let n = tiles.next().copied().unwrap_or(0);
                    out.push_str(IMG_START);
                    out.push_str(&IMG_CONTEXT.repeat(tokens_per_tile * n));
                    out.push_str(IMG_END);
                }
            }
        }
        Ok(out)
    }

    /// Builds the model's input ids for a conversation: renders it, tokenizes the text parts
    /// and splices in the ids of `<img>`, `<IMG_CONTEXT>` × 256·n_tiles and `</img>` for each
    /// image (`n_tiles` in order of appearance).
    ///
    /// Splicing instead of tokenizing the expanded string keeps long image runs cheap. It gives
    /// the same ids because the tokenizer splits its input at added tokens anyway; the three
    /// image tokens must therefore be indivisible added tokens ([`Tokenizer::require_special`]),
    /// which is checked whenever the prompt contains an image. Text-only prompts do not need
    /// them.
    pub fn encode(
        self,
        tokenizer: &Tokenizer,
        turns: &[Turn],
        n_tiles: &[usize],
    ) -> Result<Vec<u32>> {
        self.encode_for(tokenizer, turns, n_tiles, TOKENS_PER_TILE)
    }

    /// [`Template::encode`] for a vision tower giving `tokens_per_tile` tokens per tile
    /// ([`crate::PhantomConfig::tokens_per_tile`]; 256 for every released model).
    pub fn encode_for(
        self,
        tokenizer: &Tokenizer,
        turns: &[Turn],
        n_tiles: &[usize],
        tokens_per_tile: usize,
    ) -> Result<Vec<u32>> {
        let segments = self.segments(turns)?;
        check_images(&segments, n_tiles)?;
        // Resolved at the first image only, so text-only prompts work with tokenizers that
        // lack the image tokens.
        let mut image_ids: Option<ImageTokenIds> = None;
        let mut ids = Vec::new();
        let mut tiles = n_tiles.iter();
        for segment in &segments {
            match segment {
                Segment::Text(text) => ids.extend(tokenizer.encode(text)?),
                Segment::Image => {
                    let image = match image_ids {
                        Some(image) => image,
                        None => *image_ids.insert(ImageTokenIds::resolve(tokenizer)?),
                    };
                    // check_images guarantees one entry per placeholder.
                    let n = tiles.next().copied().unwrap_or(0);
                    ids.push(image.start);
                    ids.extend(std::iter::repeat_n(image.context, tokens_per_tile * n));
                    ids.push(image.end);
                }
            }
        }
        Ok(ids)
    }

    /// Splits a conversation into literal text and image slots. Adjacent texts are merged so
    /// that each is tokenized in one piece, exactly as a whole-string encode would see it
    /// between added tokens.
    fn segments(self, turns: &[Turn]) -> Result<Vec<Segment>> {
        if turns.is_empty() {
            return Err(PromptError::EmptyConversation);
        }
        let mut segments = Vec::new();
        let last = turns.len() - 1;
        for (i, turn) in turns.iter().enumerate() {
            push_text(&mut segments, self.user_start());
            // Only questions carry images; `<image>` inside an answer stays literal text.
            for (k, part) in turn.user.split(IMAGE_PLACEHOLDER).enumerate() {
                if k > 0 {
                    segments.push(Segment::Image);
                }
                push_text(&mut segments, part);
            }
            push_text(&mut segments, self.end_token());
            push_text(&mut segments, self.assistant_start());
            match &turn.assistant {
                Some(answer) => {
                    push_text(&mut segments, answer);
                    push_text(&mut segments, self.end_token());
                }
                None if i == last => {}
                None => return Err(PromptError::MissingAnswer { turn: i }),
            }
        }
        Ok(segments)
    }
}

/// One exchange: the user's question and, for completed turns, the assistant's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Turn {
    /// The question; each `<image>` in it stands for one image.
    pub user: String,
    /// The answer, or `None` for the final turn that the model is to answer.
    pub assistant: Option<String>,
}

impl Turn {
    /// A question awaiting an answer.
    pub fn question(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            assistant: None,
        }
    }

    /// A completed exchange.
    pub fn answered(user: impl Into<String>, assistant: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            assistant: Some(assistant.into()),
        }
    }
}

/// Prefixes `question` with one `<image>` per image, the way the official demo places images
/// before the question text.
#[must_use]
pub fn with_image_placeholders(question: &str, n_images: usize) -> String {
    let mut out = IMAGE_PLACEHOLDER.repeat(n_images);
    out.push_str(question);
    out
}

/// Ids of the three image tokens, each checked to be a single indivisible token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokenIds {
    /// `<img>`
    pub start: u32,
    /// `<IMG_CONTEXT>`; must equal the config's `image_token_index`.
    pub context: u32,
    /// `</img>`
    pub end: u32,
}

impl ImageTokenIds {
    /// Looks the three tokens up; the error names the first one that is missing or not a
    /// single id.
    pub fn resolve(tokenizer: &Tokenizer) -> Result<Self> {
        Ok(Self {
            start: tokenizer.require_special(IMG_START)?,
            context: tokenizer.require_special(IMG_CONTEXT)?,
            end: tokenizer.require_special(IMG_END)?,
        })
    }
}

/// Piece of a rendered conversation.
#[derive(Debug)]
enum Segment {
    Text(String),
    Image,
}

fn push_text(segments: &mut Vec<Segment>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(Segment::Text(last)) = segments.last_mut() {
        last.push_str(text);
    } else {
        segments.push(Segment::Text(text.to_string()));
    }
}

fn check_images(segments: &[Segment], n_tiles: &[usize]) -> Result<()> {
    let placeholders = segments
        .iter()
        .filter(|s| matches!(s, Segment::Image))
        .count();
    if placeholders != n_tiles.len() {
        return Err(PromptError::ImageCountMismatch {
            placeholders,
            images: n_tiles.len(),
        });
    }
    if let Some(image) = n_tiles.iter().position(|&n| n == 0) {
        return Err(PromptError::ZeroTiles { image });
    }
    Ok(())
}
