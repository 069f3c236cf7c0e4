//! Text tokenizer: a thin wrapper over the Hugging Face `tokenizers` crate.
//!
//! Phantom feeds prompts to the LLM without BOS/EOS decoration (`add_special_tokens = false`
//! in the official code), so [`Tokenizer::encode`] never runs the post-processor's special-token
//! insertion. [`IncrementalDecoder`] turns a stream of generated ids into text chunks that are
//! always complete UTF-8 characters.
//!
//! Only `tokenizer.json` files are supported. The InternLM2 checkpoints (Phantom-1.8B/7B) ship a
//! sentencepiece `tokenizer.model` instead; [`super::sentencepiece::convert_file`] (`phantom-infer convert-tokenizer`) writes the `tokenizer.json` once.

use std::path::{Path, PathBuf};

/// Errors of the tokenizer wrapper.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file could not be read.
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        /// File that was being read.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer JSON could not be parsed (or uses a model the crate does not know).
    #[error("cannot parse tokenizer{}: {reason}", fmt_path(.path.as_deref()))]
    Parse {
        /// File the JSON came from, when it came from a file.
        path: Option<PathBuf>,
        /// Message of the `tokenizers` crate.
        reason: String,
    },
    /// Encoding a text failed inside the `tokenizers` pipeline.
    #[error("cannot encode text: {reason}")]
    Encode {
        /// Message of the `tokenizers` crate.
        reason: String,
    },
    /// Decoding ids failed inside the `tokenizers` decoder.
    #[error("cannot decode token ids: {reason}")]
    Decode {
        /// Message of the `tokenizers` crate.
        reason: String,
    },
    /// A token that the prompt format needs is not in the vocabulary at all.
    #[error("special token `{token}` is not in the tokenizer's vocabulary")]
    MissingSpecialToken {
        /// The token text, e.g. `<IMG_CONTEXT>`.
        token: String,
    },
    /// A token is in the vocabulary, but encoding its text does not give exactly that one id
    /// (typically: it is a plain vocabulary entry rather than an added token, so text is split
    /// into smaller pieces before it could ever match).
    #[error(
        "special token `{token}` (id {id}) does not encode to exactly one id: \
         encoding its text gives {encoded:?}"
    )]
    SpecialTokenNotSingle {
        /// The token text.
        token: String,
        /// Its id in the vocabulary.
        id: u32,
        /// What encoding the token's text actually produced.
        encoded: Vec<u32>,
    },
}

fn fmt_path(path: Option<&Path>) -> String {
    match path {
        Some(p) => format!(" {}", p.display()),
        None => String::new(),
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A loaded `tokenizer.json`.
///
/// Cheap to share by reference; all methods take `&self`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The inner tokenizer's Debug dumps the whole vocabulary; keep it short.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl From<tokenizers::Tokenizer> for Tokenizer {
    fn from(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // Read the bytes ourselves so that a missing file and a malformed file give
        // distinct, typed errors (the crate folds both into one boxed error).
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes, Some(path))
    }

    /// Parses the contents of a `tokenizer.json` (e.g. embedded with `include_bytes!` or
    /// fetched in a browser, where there is no file system).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, None)
    }

    fn parse(bytes: &[u8], path: Option<&Path>) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError::Parse {
                path: path.map(Path::to_path_buf),
                reason: e.to_string(),
            })?;
        Ok(Self { inner })
    }

    /// The wrapped `tokenizers` object, for anything this wrapper does not cover.
    #[must_use]
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes `text` to ids without adding BOS/EOS or any template tokens
    /// (`add_special_tokens = false`, as the official Phantom code does).
    ///
    /// Added tokens that occur in the text (e.g. `<|im_start|>`) are still recognised and map
    /// to their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // `encode_fast` skips offset tracking, which we never use; ids are identical.
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode {
                reason: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, keeping special tokens (`skip_special_tokens = false`).
    ///
    /// Ids that the tokenizer does not know (e.g. the padding rows of a model's embedding
    /// matrix beyond the tokenizer's vocabulary) are silently dropped by the `tokenizers` crate.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Decodes ids to text, dropping special (added, `special: true`) tokens.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                reason: e.to_string(),
            })
    }

    /// The id of `token` (added tokens first, then the model vocabulary), if it exists.
    #[must_use]
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of token `id`, if it exists.
    #[must_use]
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Resolves a token that must behave as one indivisible id, e.g. `<IMG_CONTEXT>` or
    /// `<|im_end|>`.
    ///
    /// It must exist in the vocabulary **and** encoding its text must give exactly that id;
    /// otherwise prompts that contain it as text would be tokenized differently from prompts
    /// that splice the id in directly. The error names the token.
    pub fn require_special(&self, token: &str) -> Result<u32> {
        let id = self
            .token_to_id(token)
            .ok_or_else(|| TokenizerError::MissingSpecialToken {
                token: token.to_string(),
            })?;
        let encoded = self.encode(token)?;
        if encoded != [id] {
            return Err(TokenizerError::SpecialTokenNotSingle {
                token: token.to_string(),
                id,
                encoded,
            });
        }
        Ok(id)
    }

    /// Number of distinct tokens, added tokens included.
    #[must_use]
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Starts an [`IncrementalDecoder`] over this tokenizer.
    #[must_use]
    pub fn incremental_decoder(&self) -> IncrementalDecoder<'_> {
        IncrementalDecoder::new(self)
    }
}

/// Streams generated ids out as text, one complete chunk at a time.
///
/// Decoding one id at a time is wrong for two reasons: byte-level BPE tokens may hold only part
/// of a multi-byte UTF-8 character (decoded alone it becomes U+FFFD), and some decoders change a
/// token's text depending on its neighbours (e.g. sentencepiece's leading-space rule). So each
/// step decodes a small window of ids twice, "context only" (`ids[prefix..read]`, already
/// emitted) and "context + pending" (`ids[prefix..]`), and emits the difference. Text that ends
/// in U+FFFD is held back until a later id completes the character; [`IncrementalDecoder::finish`]
/// flushes whatever is left.
///
/// For a stream of ids that decodes to valid UTF-8, the concatenation of every chunk and the
/// final flush equals `tokenizer.decode(all_ids)`, and no chunk contains U+FFFD. When the model
/// emits genuinely invalid byte sequences, U+FFFD appears where the bytes are invalid.
#[derive(Debug)]
pub struct IncrementalDecoder<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    /// Window of ids still needed: `ids[..read]` were already emitted (kept as context),
    /// `ids[read..]` are pending. Ids before the window are dropped to bound memory.
    ids: Vec<u32>,
    /// Start of the not-yet-emitted ids inside `ids`.
    read: usize,
}

/// U+FFFD, which lossy UTF-8 decoding puts where a character is incomplete.
const REPLACEMENT: char = '\u{FFFD}';

impl<'t> IncrementalDecoder<'t> {
    /// A decoder that keeps special tokens in the text.
    #[must_use]
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        Self {
            tokenizer,
            skip_special_tokens: false,
            ids: Vec::new(),
            read: 0,
        }
    }

    /// Whether special tokens are dropped from the output (default: kept).
    #[must_use]
    pub fn skip_special_tokens(mut self, skip: bool) -> Self {
        self.skip_special_tokens = skip;
        self
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode_with(ids, self.skip_special_tokens)
    }

    /// Feeds one id. Returns the new text it completes, or `None` when nothing can be emitted
    /// yet (an incomplete character, or a token that decodes to nothing).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let context = self.decode(&self.ids[..self.read])?;
        let full = self.decode(&self.ids)?;
        if full.ends_with(REPLACEMENT) {
            // Most likely a character split across tokens: wait for its remaining bytes.
            return Ok(None);
        }
        let new_text = match full.strip_prefix(context.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                // The decoder rewrote text that is already out (it should not for byte-level
                // and sentencepiece decoders, but e.g. a whole run of byte-fallback tokens
                // turns into U+FFFD together). Emitted text cannot be taken back, so decode the
                // pending ids on their own instead.
                let pending = self.decode(&self.ids[self.read..])?;
                if pending.ends_with(REPLACEMENT) {
                    return Ok(None);
                }
                pending
            }
        };
        if new_text.is_empty() {
            // E.g. a skipped special token: keep it pending so the window stays consistent.
            return Ok(None);
        }
        // The pending ids become the context of the next step; older ids are no longer needed.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(Some(new_text))
    }

    /// Flushes text still held back (an incomplete character at the very end comes out as
    /// U+FFFD, as a full decode would show it). Returns an empty string when nothing is left.
    pub fn finish(self) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let context = self.decode(&self.ids[..self.read])?;
        let full = self.decode(&self.ids)?;
        match full.strip_prefix(context.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => self.decode(&self.ids[self.read..]),
        }
    }
}
