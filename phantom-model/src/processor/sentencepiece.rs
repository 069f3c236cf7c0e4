//! One-time conversion of a SentencePiece `tokenizer.model` into a `tokenizers` pipeline
//! (`tokenizer.json`).
//!
//! The InternLM2-based checkpoints (Phantom-1.8B, Phantom-7B) ship only the SentencePiece model
//! plus `added_tokens.json` / `tokenizer_config.json`, while [`super::tokenizer`] loads
//! `tokenizer.json` files. [`convert_file`] writes that file next to the model once;
//! [`convert`] / [`convert_with`] build the tokenizer in memory.
//!
//! The Python slow tokenizer (`InternLM2Tokenizer`) splits its added tokens out of the text and
//! runs every other chunk through `sp_model.encode(chunk, out_type=str)`. The pipeline built
//! here reproduces that for BPE models:
//!
//! * **model**: BPE over the SentencePiece vocabulary (ids = piece indices). SentencePiece's BPE
//!   repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece, so
//!   the merge list is every split of every normal piece into two normal pieces, ranked by the
//!   merged piece's score. Byte fallback (`<0xNN>` pieces) and `<unk>` as in the model.
//! * **normalizer**: the model's precompiled character map when it has one (none for the
//!   `identity` normalizer of InternLM2 and Llama); with `remove_extra_whitespaces`, runs of
//!   spaces collapsed and the ends trimmed; with `add_dummy_prefix`, the prefix for texts that
//!   start with a space; then `" "` → `"▁"`.
//! * **pre-tokenizer**: only with `add_dummy_prefix`: a `Metaspace` that puts `"▁"` in front of
//!   the text's first chunk (not after every added token, unlike the "legacy" Llama converter).
//! * **added tokens**: `<unk>`, control pieces (`<s>`, `</s>`) and user-defined pieces, plus the
//!   caller's added tokens, which may rename a piece (InternLM2's `added_tokens_decoder` renames
//!   its `[UNUSED_TOKEN_n]` placeholders to `<|im_start|>` and friends) or extend the vocabulary
//!   (`<img>`, `<IMG_CONTEXT>`, ...). Like the slow tokenizer, text equal to `<s>` or `</s>` is
//!   that token (plain `sp.encode` would spell it out). They are matched on the normalized
//!   text, so trimming and the dummy prefix see the whole text, as in SentencePiece.
//! * **decoder**: `"▁"` → `" "`, byte fallback, fuse, and (with `add_dummy_prefix` or
//!   `remove_extra_whitespaces`) one leading space stripped, as `sp.decode` does.
//! * no post-processor: Phantom never adds BOS/EOS (`add_special_tokens = false`).
//!
//! Known differences from SentencePiece, none of which arises for a model with an `identity`
//! normalizer and no dummy prefix (the shape of InternLM2's):
//!
//! * with `add_dummy_prefix`, a text that *starts* with an added token gets no lone `"▁"` piece
//!   in front of it (SentencePiece: `["▁", "<|im_start|>", ...]`);
//! * a precompiled character map runs through the `tokenizers` `Precompiled` normalizer, which
//!   works on grapheme clusters and can drop a combining mark that follows a mapped character;
//! * `UNUSED` pieces are never produced (SentencePiece may form one and split it back);
//! * when two *different* pairs that merge into the same piece overlap, SentencePiece merges
//!   the leftmost one and the BPE merge list the one ranked first;
//! * `sp.decode` renders control pieces as nothing and `<unk>` as ` ⁇ `; the `tokenizers`
//!   decoder shows their text (or drops them with `skip_special_tokens`).
//!
//! Unigram, word and char models are refused with [`SentencePieceError::UnsupportedModelType`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{NormalizerWrapper, Precompiled, Replace, Sequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, Tokenizer};

/// SentencePiece's whitespace symbol, U+2581.
const SPACE_SYMBOL: char = '\u{2581}';

/// Errors of the SentencePiece conversion.
#[derive(Debug, thiserror::Error)]
pub enum SentencePieceError {
    /// The protobuf ends in the middle of a field.
    #[error("malformed tokenizer.model: data ends inside {what} at byte {offset}")]
    Truncated {
        /// What was being read (a varint, a field of a message, ...).
        what: &'static str,
        /// Byte offset in the file where the missing data should have started.
        offset: usize,
    },
    /// A known field is encoded with a wire type its declared type cannot have.
    #[error(
        "malformed tokenizer.model: field {field} of {message} has wire type {found}, \
         expected {expected} (byte {offset})"
    )]
    WrongWireType {
        /// Protobuf message being read (`ModelProto`, `TrainerSpec`, ...).
        message: &'static str,
        /// Field number.
        field: u32,
        /// Wire type found in the data.
        found: u8,
        /// Wire type the field's type requires.
        expected: u8,
        /// Byte offset of the field's key.
        offset: usize,
    },
    /// A field key carries a wire type that is invalid or unused by SentencePiece (groups, 6, 7),
    /// or field number 0.
    #[error(
        "malformed tokenizer.model: invalid field key (field {field}, wire type {wire_type}) \
         at byte {offset}"
    )]
    InvalidKey {
        /// Field number of the key.
        field: u64,
        /// Wire type of the key.
        wire_type: u8,
        /// Byte offset of the key.
        offset: usize,
    },
    /// A varint runs past 10 bytes.
    #[error("malformed tokenizer.model: varint longer than 10 bytes at byte {offset}")]
    VarintOverflow {
        /// Byte offset of the varint.
        offset: usize,
    },
    /// A string field is not UTF-8.
    #[error("malformed tokenizer.model: {what} is not valid UTF-8 (byte {offset})")]
    InvalidUtf8 {
        /// Which string (e.g. `piece 17`).
        what: String,
        /// Byte offset of the string.
        offset: usize,
    },
    /// A sub-message SentencePiece always writes is absent (e.g. a file cut at a field boundary).
    #[error("malformed tokenizer.model: no {field}")]
    MissingField {
        /// The missing field.
        field: &'static str,
    },
    /// The model is not a BPE model.
    #[error(
        "unsupported sentencepiece model type {model_type}: only BPE models (InternLM2, Llama) \
         can be converted"
    )]
    UnsupportedModelType {
        /// The model's `trainer_spec.model_type`.
        model_type: ModelType,
    },
    /// The model uses a setting the conversion does not reproduce.
    #[error("unsupported sentencepiece setting: {setting}")]
    Unsupported {
        /// What is not supported.
        setting: String,
    },
    /// The model is well-formed protobuf but not a usable vocabulary.
    #[error("invalid sentencepiece model: {reason}")]
    InvalidModel {
        /// What is wrong.
        reason: String,
    },
    /// An added token cannot be placed at its id.
    #[error("added token `{content}` (id {id}): {reason}")]
    AddedToken {
        /// The token text.
        content: String,
        /// Its requested id.
        id: u32,
        /// What is wrong.
        reason: String,
    },
    /// The `tokenizers` crate refused a component.
    #[error("cannot build the tokenizer: {reason}")]
    Tokenizer {
        /// Message of the `tokenizers` crate.
        reason: String,
    },
    /// A file could not be read, written or renamed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// `read`, `write` or `rename`.
        op: &'static str,
        /// File concerned.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON side file (`added_tokens.json`, `tokenizer_config.json`) is malformed.
    #[error("cannot parse {path}: {reason}")]
    Json {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `tokenizer.json` exists and overwriting was not asked for.
    #[error("{path} already exists (convert with overwrite = true to replace it)")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, SentencePieceError>;

// ------------------------------------------------------------------------------------------------
// Model description
// ------------------------------------------------------------------------------------------------

/// `TrainerSpec.model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// Unigram language model (the SentencePiece default).
    Unigram,
    /// Byte-pair encoding (InternLM2, Llama).
    Bpe,
    /// Whitespace-delimited words.
    Word,
    /// Single characters.
    Char,
    /// A value this code does not know.
    Other(i32),
}

impl ModelType {
    fn from_i32(value: i32) -> Self {
        match value {
            1 => Self::Unigram,
            2 => Self::Bpe,
            3 => Self::Word,
            4 => Self::Char,
            v => Self::Other(v),
        }
    }
}

impl fmt::Display for ModelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unigram => f.write_str("UNIGRAM"),
            Self::Bpe => f.write_str("BPE"),
            Self::Word => f.write_str("WORD"),
            Self::Char => f.write_str("CHAR"),
            Self::Other(v) => write!(f, "{v} (unknown)"),
        }
    }
}

/// `SentencePiece.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// Ordinary vocabulary piece.
    Normal,
    /// The unknown piece (`<unk>`).
    Unknown,
    /// Control symbol (`<s>`, `</s>`): never produced from text by SentencePiece.
    Control,
    /// User-defined symbol: always one piece, never split or merged.
    UserDefined,
    /// Reserved, never emitted.
    Unused,
    /// Byte-fallback piece `<0xNN>`.
    Byte,
}

impl PieceType {
    fn from_i32(value: i32) -> Option<Self> {
        Some(match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry; its id is its index in [`SentencePieceModel::pieces`].
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece text, with `"▁"` for spaces.
    pub piece: String,
    /// Its score (for BPE: higher merges first).
    pub score: f32,
    /// Its kind.
    pub kind: PieceType,
}

/// The `TrainerSpec` fields that matter for encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    /// Model type (field 3, default UNIGRAM).
    pub model_type: ModelType,
    /// Characters missing from the vocabulary become `<0xNN>` pieces (field 35).
    pub byte_fallback: bool,
    /// Whitespace is a suffix rather than a prefix of pieces (field 24; not supported).
    pub treat_whitespace_as_suffix: bool,
    /// Id of `<unk>` (field 40, default 0).
    pub unk_id: i32,
    /// Id of `<s>` (field 41, default 1; -1 when absent).
    pub bos_id: i32,
    /// Id of `</s>` (field 42, default 2; -1 when absent).
    pub eos_id: i32,
    /// Id of the padding piece (field 43, default -1).
    pub pad_id: i32,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        Self {
            model_type: ModelType::Unigram,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
        }
    }
}

/// The `NormalizerSpec` fields that matter for encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizerSpec {
    /// Rule-set name (field 1), e.g. `identity` or `nmt_nfkc`; informational.
    pub name: String,
    /// Compiled normalization rules (field 2); empty for `identity`.
    pub precompiled_charsmap: Vec<u8>,
    /// Prepend `"▁"` to the text (field 3, default true).
    pub add_dummy_prefix: bool,
    /// Trim spaces at both ends and collapse runs of spaces (field 4, default true).
    pub remove_extra_whitespaces: bool,
    /// Replace `" "` with `"▁"` (field 5, default true).
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// A parsed SentencePiece `ModelProto` (the parts needed to encode).
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    /// The vocabulary, in id order.
    pub pieces: Vec<Piece>,
    /// Training settings (model type, byte fallback, special ids).
    pub trainer_spec: TrainerSpec,
    /// Normalization settings.
    pub normalizer_spec: NormalizerSpec,
}

// ------------------------------------------------------------------------------------------------
// Protobuf reading
// ------------------------------------------------------------------------------------------------

const WIRE_VARINT: u8 = 0;
const WIRE_I64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_I32: u8 = 5;

/// A cursor over one protobuf message; offsets in errors are absolute file offsets.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

/// One decoded field value.
enum Value<'a> {
    Varint(u64),
    I64,
    Len(&'a [u8], usize),
    I32(u32),
}

impl Value<'_> {
    fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => WIRE_VARINT,
            Value::I64 => WIRE_I64,
            Value::Len(..) => WIRE_LEN,
            Value::I32(_) => WIRE_I32,
        }
    }
}

/// A field of a message: number, value and the absolute offset of its key.
struct Field<'a> {
    number: u32,
    value: Value<'a>,
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }

    fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(SentencePieceError::Truncated {
                what,
                offset: self.offset(),
            });
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64> {
        let start = self.offset();
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.take(1, what)?[0];
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(SentencePieceError::VarintOverflow { offset: start })
    }

    /// The next field, or `None` at the end of the message.
    fn field(&mut self) -> Result<Option<Field<'a>>> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let offset = self.offset();
        let key = self.varint("a field key")?;
        let wire_type = (key & 7) as u8;
        let number = key >> 3;
        let invalid = SentencePieceError::InvalidKey {
            field: number,
            wire_type,
            offset,
        };
        let Ok(number) = u32::try_from(number) else {
            return Err(invalid);
        };
        if number == 0 {
            return Err(invalid);
        }
        let value = match wire_type {
            WIRE_VARINT => Value::Varint(self.varint("a varint field")?),
            WIRE_I64 => {
                self.take(8, "a 64-bit field")?;
                Value::I64
            }
            WIRE_LEN => {
                let len = self.varint("a length prefix")?;
                let start = self.offset();
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                Value::Len(self.take(len, "a length-delimited field")?, start)
            }
            WIRE_I32 => {
                let b = self.take(4, "a 32-bit field")?;
                Value::I32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => return Err(invalid),
        };
        Ok(Some(Field {
            number,
            value,
            offset,
        }))
    }
}

impl<'a> Field<'a> {
    fn wrong(&self, message: &'static str, expected: u8) -> SentencePieceError {
        SentencePieceError::WrongWireType {
            message,
            field: self.number,
            found: self.value.wire_type(),
            expected,
            offset: self.offset,
        }
    }

    fn varint(&self, message: &'static str) -> Result<u64> {
        match self.value {
            Value::Varint(v) => Ok(v),
            _ => Err(self.wrong(message, WIRE_VARINT)),
        }
    }

    /// `int32` / enum: protobuf keeps the low 32 bits (negative values are sign-extended).
    fn int32(&self, message: &'static str) -> Result<i32> {
        Ok(self.varint(message)? as u32 as i32)
    }

    fn bool(&self, message: &'static str) -> Result<bool> {
        Ok(self.varint(message)? != 0)
    }

    fn float(&self, message: &'static str) -> Result<f32> {
        match self.value {
            Value::I32(bits) => Ok(f32::from_bits(bits)),
            _ => Err(self.wrong(message, WIRE_I32)),
        }
    }

    fn bytes(&self, message: &'static str) -> Result<(&'a [u8], usize)> {
        match self.value {
            Value::Len(bytes, offset) => Ok((bytes, offset)),
            _ => Err(self.wrong(message, WIRE_LEN)),
        }
    }

    fn string(&self, message: &'static str, what: impl FnOnce() -> String) -> Result<String> {
        let (bytes, offset) = self.bytes(message)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(SentencePieceError::InvalidUtf8 {
                what: what(),
                offset: offset + e.valid_up_to(),
            }),
        }
    }
}

impl SentencePieceModel {
    /// Parses the bytes of a `tokenizer.model` (a serialized SentencePiece `ModelProto`).
    ///
    /// Unknown fields are skipped. Fails on malformed protobuf, on a missing `trainer_spec` or
    /// `normalizer_spec` (SentencePiece always writes both, so their absence means a file cut
    /// short), and on unknown piece types. Does not check that the model can be converted.
    ///
    /// # Errors
    ///
    /// The protobuf errors of [`SentencePieceError`] (`Truncated`, `WrongWireType`,
    /// `InvalidKey`, `VarintOverflow`, `InvalidUtf8`, `MissingField`) and `InvalidModel` for an
    /// unknown piece type.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        const MSG: &str = "ModelProto";
        let mut reader = Reader::new(bytes, 0);
        let mut pieces = Vec::new();
        let mut trainer_spec = None;
        let mut normalizer_spec = None;
        while let Some(field) = reader.field()? {
            match field.number {
                1 => {
                    let (msg, offset) = field.bytes(MSG)?;
                    pieces.push(parse_piece(msg, offset, pieces.len())?);
                }
                2 => {
                    let (msg, offset) = field.bytes(MSG)?;
                    // Repeated occurrences of a sub-message merge, as in protobuf.
                    let spec = trainer_spec.get_or_insert_with(TrainerSpec::default);
                    parse_trainer_spec(msg, offset, spec)?;
                }
                3 => {
                    let (msg, offset) = field.bytes(MSG)?;
                    let spec = normalizer_spec.get_or_insert_with(NormalizerSpec::default);
                    parse_normalizer_spec(msg, offset, spec)?;
                }
                _ => {}
            }
        }
        Ok(Self {
            pieces,
            trainer_spec: trainer_spec.ok_or(SentencePieceError::MissingField {
                field: "trainer_spec",
            })?,
            normalizer_spec: normalizer_spec.ok_or(SentencePieceError::MissingField {
                field: "normalizer_spec",
            })?,
        })
    }
}

fn parse_piece(bytes: &[u8], base: usize, index: usize) -> Result<Piece> {
    const MSG: &str = "SentencePiece";
    let mut reader = Reader::new(bytes, base);
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while let Some(field) = reader.field()? {
        match field.number {
            1 => piece.piece = field.string(MSG, || format!("piece {index}"))?,
            2 => piece.score = field.float(MSG)?,
            3 => {
                let value = field.int32(MSG)?;
                piece.kind =
                    PieceType::from_i32(value).ok_or_else(|| SentencePieceError::InvalidModel {
                        reason: format!("piece {index} has unknown type {value}"),
                    })?;
            }
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer_spec(bytes: &[u8], base: usize, spec: &mut TrainerSpec) -> Result<()> {
    const MSG: &str = "TrainerSpec";
    let mut reader = Reader::new(bytes, base);
    while let Some(field) = reader.field()? {
        match field.number {
            3 => spec.model_type = ModelType::from_i32(field.int32(MSG)?),
            24 => spec.treat_whitespace_as_suffix = field.bool(MSG)?,
            35 => spec.byte_fallback = field.bool(MSG)?,
            40 => spec.unk_id = field.int32(MSG)?,
            41 => spec.bos_id = field.int32(MSG)?,
            42 => spec.eos_id = field.int32(MSG)?,
            43 => spec.pad_id = field.int32(MSG)?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer_spec(bytes: &[u8], base: usize, spec: &mut NormalizerSpec) -> Result<()> {
    const MSG: &str = "NormalizerSpec";
    let mut reader = Reader::new(bytes, base);
    while let Some(field) = reader.field()? {
        match field.number {
            1 => spec.name = field.string(MSG, || "normalizer name".to_owned())?,
            2 => spec.precompiled_charsmap = field.bytes(MSG)?.0.to_vec(),
            3 => spec.add_dummy_prefix = field.bool(MSG)?,
            4 => spec.remove_extra_whitespaces = field.bool(MSG)?,
            5 => spec.escape_whitespaces = field.bool(MSG)?,
            _ => {}
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Conversion
// ------------------------------------------------------------------------------------------------

/// A token that the checkpoint adds on top of (or renames inside) the SentencePiece vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedTokenSpec {
    /// The token text, e.g. `<|im_start|>`.
    pub content: String,
    /// Its id: below the piece count it replaces that piece's text, at or above it extends the
    /// vocabulary (such ids must follow the last piece without gaps).
    pub id: u32,
    /// Special tokens are dropped by `decode` with `skip_special_tokens`.
    pub special: bool,
}

/// Converts a SentencePiece BPE `tokenizer.model` into a `tokenizers` pipeline that gives the
/// ids of the Python slow tokenizer.
///
/// `added_tokens` are `(content, id)` pairs, e.g. from `added_tokens.json`; they are marked
/// special. Use [`convert_with`] to choose per token.
///
/// # Errors
///
/// Malformed protobuf (see [`SentencePieceModel::parse`]); a model that is not BPE
/// (`UnsupportedModelType`) or uses a setting that cannot be reproduced (`Unsupported`); an
/// inconsistent vocabulary (`InvalidModel`); added tokens that cannot get their ids
/// (`AddedToken`: a gap after the vocabulary, one text with two ids, a text that is already
/// another piece).
pub fn convert(model_bytes: &[u8], added_tokens: &[(String, u32)]) -> Result<Tokenizer> {
    let added: Vec<AddedTokenSpec> = added_tokens
        .iter()
        .map(|(content, id)| AddedTokenSpec {
            content: content.clone(),
            id: *id,
            special: true,
        })
        .collect();
    convert_with(model_bytes, &added)
}

/// [`convert`] with an explicit `special` flag for each added token.
///
/// # Errors
///
/// As [`convert`].
pub fn convert_with(model_bytes: &[u8], added_tokens: &[AddedTokenSpec]) -> Result<Tokenizer> {
    let model = SentencePieceModel::parse(model_bytes)?;
    convert_model(&model, added_tokens)
}

/// Builds the tokenizer from an already parsed model; see [`convert`].
///
/// # Errors
///
/// As [`convert`], less the protobuf errors.
pub fn convert_model(
    model: &SentencePieceModel,
    added_tokens: &[AddedTokenSpec],
) -> Result<Tokenizer> {
    let trainer = &model.trainer_spec;
    let norm = &model.normalizer_spec;
    if trainer.model_type != ModelType::Bpe {
        return Err(SentencePieceError::UnsupportedModelType {
            model_type: trainer.model_type,
        });
    }
    if trainer.treat_whitespace_as_suffix {
        return Err(SentencePieceError::Unsupported {
            setting: "treat_whitespace_as_suffix".to_owned(),
        });
    }
    if norm.add_dummy_prefix && !norm.escape_whitespaces {
        return Err(SentencePieceError::Unsupported {
            setting: "add_dummy_prefix without escape_whitespaces".to_owned(),
        });
    }
    let pieces = &model.pieces;
    if pieces.is_empty() {
        return Err(invalid("the model has no pieces"));
    }
    let n = u32::try_from(pieces.len()).map_err(|_| invalid("too many pieces"))?;
    let unk = usize::try_from(trainer.unk_id)
        .ok()
        .filter(|&i| i < pieces.len())
        .ok_or_else(|| invalid(format!("unk_id {} is not a piece id", trainer.unk_id)))?;
    if pieces[unk].kind != PieceType::Unknown {
        return Err(invalid(format!(
            "unk_id {unk} is `{}`, not an UNKNOWN piece",
            pieces[unk].piece
        )));
    }

    // Final text of every id: the piece, or the added token that renames it.
    let added = collect_added(pieces, n, added_tokens)?;
    let text_of = |id: usize| -> &str {
        added
            .get(&(id as u32))
            .map_or(pieces[id].piece.as_str(), |t| t.content.as_str())
    };

    let mut vocab = Vocab::default();
    for id in 0..pieces.len() {
        let text = text_of(id);
        if let Some(first) = vocab.insert(text.to_owned(), id as u32) {
            return Err(invalid(format!(
                "ids {first} and {id} both have the text `{text}`"
            )));
        }
    }
    if trainer.byte_fallback {
        for byte in 0..=255u8 {
            let name = format!("<0x{byte:02X}>");
            match vocab.get(&name) {
                Some(&id) if pieces[id as usize].kind == PieceType::Byte => {}
                _ => {
                    return Err(invalid(format!(
                        "byte_fallback is on but `{name}` is missing"
                    )));
                }
            }
        }
    }

    let merges = bpe_merges(pieces, &added);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(text_of(unk).to_owned())
        .fuse_unk(true)
        .byte_fallback(trainer.byte_fallback)
        .build()
        .map_err(tok_err)?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(normalizer(norm)?);
    if norm.add_dummy_prefix {
        tokenizer.with_pre_tokenizer(Some(Metaspace::new(
            SPACE_SYMBOL,
            PrependScheme::First,
            false,
        )));
    }
    tokenizer.with_decoder(Some(decoder(norm)));

    // Added tokens in id order, so that ids past the vocabulary come out sequentially.
    let tokens: Vec<AddedToken> = added
        .values()
        .map(|t| AddedToken::from(t.content.clone(), t.special).normalized(true))
        .collect();
    tokenizer.add_tokens(&tokens);
    for t in added.values() {
        let got = tokenizer.token_to_id(&t.content);
        if got != Some(t.id) {
            return Err(SentencePieceError::AddedToken {
                content: t.content.clone(),
                id: t.id,
                reason: format!("the built tokenizer gives it id {got:?}"),
            });
        }
    }
    Ok(tokenizer)
}

fn invalid(reason: impl Into<String>) -> SentencePieceError {
    SentencePieceError::InvalidModel {
        reason: reason.into(),
    }
}

fn tok_err(e: impl fmt::Display) -> SentencePieceError {
    SentencePieceError::Tokenizer {
        reason: e.to_string(),
    }
}

/// All added tokens by id: `<unk>`, control and user-defined pieces, overridden or extended
/// by the caller's tokens.
fn collect_added(
    pieces: &[Piece],
    n: u32,
    extra: &[AddedTokenSpec],
) -> Result<BTreeMap<u32, AddedTokenSpec>> {
    let mut added = BTreeMap::new();
    for (id, piece) in pieces.iter().enumerate() {
        let special = match piece.kind {
            PieceType::Unknown | PieceType::Control => true,
            PieceType::UserDefined => false,
            _ => continue,
        };
        added.insert(
            id as u32,
            AddedTokenSpec {
                content: piece.piece.clone(),
                id: id as u32,
                special,
            },
        );
    }
    let mut extended: BTreeMap<u32, &AddedTokenSpec> = BTreeMap::new();
    let mut seen: HashMap<&str, u32> = HashMap::new();
    for token in extra {
        let err = |reason: String| SentencePieceError::AddedToken {
            content: token.content.clone(),
            id: token.id,
            reason,
        };
        if token.content.is_empty() {
            return Err(err("empty text".to_owned()));
        }
        if let Some(other) = seen.insert(&token.content, token.id)
            && other != token.id
        {
            return Err(err(format!("the same text is also given id {other}")));
        }
        if token.id >= n
            && let Some(previous) = extended.insert(token.id, token)
            && previous.content != token.content
        {
            return Err(err(format!("id also given to `{}`", previous.content)));
        }
        added.insert(token.id, token.clone());
    }
    // Ids past the vocabulary must continue it without gaps (`tokenizers` numbers them so).
    for (expected, &id) in (n..).zip(extended.keys()) {
        if id != expected {
            let token = extended[&id];
            return Err(SentencePieceError::AddedToken {
                content: token.content.clone(),
                id,
                reason: format!(
                    "ids past the {n} pieces must be consecutive; {expected} is missing"
                ),
            });
        }
    }
    Ok(added)
}

/// SentencePiece BPE merges as an ordered merge list: every split of a normal piece into two
/// normal pieces, ranked by the merged piece's score (best first; ties by id). Pieces that are
/// added tokens (e.g. renamed placeholders) are matched whole and take no part.
fn bpe_merges(pieces: &[Piece], added: &BTreeMap<u32, AddedTokenSpec>) -> Merges {
    let mergeable =
        |id: usize| pieces[id].kind == PieceType::Normal && !added.contains_key(&(id as u32));
    let normal: HashMap<&str, usize> = (0..pieces.len())
        .filter(|&id| mergeable(id))
        .map(|id| (pieces[id].piece.as_str(), id))
        .collect();
    let mut ranked: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, p) in pieces.iter().enumerate() {
        if !mergeable(id) {
            continue;
        }
        for (split, _) in p.piece.char_indices().skip(1) {
            let (left, right) = p.piece.split_at(split);
            if let (Some(&l), Some(&r)) = (normal.get(left), normal.get(right)) {
                ranked.push((p.score, id, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, l, r)| (pieces[l].piece.clone(), pieces[r].piece.clone()))
        .collect()
}

fn normalizer(norm: &NormalizerSpec) -> Result<Option<NormalizerWrapper>> {
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    if !norm.precompiled_charsmap.is_empty() {
        let precompiled = Precompiled::from(&norm.precompiled_charsmap)
            .map_err(|e| invalid(format!("precompiled_charsmap of `{}`: {e}", norm.name)))?;
        steps.push(precompiled.into());
    }
    // All of this runs on the whole text: added tokens are matched after normalization, so `^`
    // and `$` are the text's own ends, as in SentencePiece.
    if norm.remove_extra_whitespaces {
        // Collapse runs of spaces, trim the end (SentencePiece trims the escaped text, so a
        // literal "▁" there goes too) and, without a dummy prefix, the start.
        steps.push(regex_replace(" {2,}", " ")?);
        steps.push(regex_replace(
            match (norm.add_dummy_prefix, norm.escape_whitespaces) {
                (true, _) => "[ \u{2581}]+$",
                (false, true) => "^ +|[ \u{2581}]+$",
                (false, false) => "^ +| +$",
            },
            "",
        )?);
    }
    if norm.add_dummy_prefix {
        // The `Metaspace` pre-tokenizer prepends "▁" to the first chunk, but only when that does
        // not start with "▁" already. Those texts get their dummy prefix here; the leading
        // character is rewritten rather than removed, because `Metaspace` recognises the first
        // chunk by its start at offset 0.
        if norm.remove_extra_whitespaces {
            // A leading literal "▁" survives the trimming: prefix it. A leading space (one,
            // after collapsing) is trimmed and replaced by the prefix: it becomes the prefix.
            steps.push(regex_replace("^\\u{2581}", "\u{2581}\u{2581}")?);
            steps.push(regex_replace("^ ", "\u{2581}")?);
        } else {
            // A leading space or "▁" is kept, after the prefix.
            steps.push(regex_replace("^[ \\u{2581}]", "\u{2581}\u{2581}")?);
        }
    }
    if norm.escape_whitespaces {
        steps.push(
            Replace::new(" ", SPACE_SYMBOL.to_string())
                .map_err(tok_err)?
                .into(),
        );
    }
    Ok(match steps.len() {
        0 => None,
        1 => steps.pop(),
        _ => Some(Sequence::new(steps).into()),
    })
}

fn regex_replace(pattern: &str, content: &str) -> Result<NormalizerWrapper> {
    let replace = Replace::new(ReplacePattern::Regex(pattern.to_owned()), content);
    Ok(replace.map_err(tok_err)?.into())
}

fn decoder(norm: &NormalizerSpec) -> DecoderWrapper {
    let mut steps: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE_SYMBOL.to_string(), " ")
            .expect("a literal pattern always compiles")
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if norm.add_dummy_prefix || norm.remove_extra_whitespaces {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    DecoderSequence::new(steps).into()
}

// ------------------------------------------------------------------------------------------------
// Files
// ------------------------------------------------------------------------------------------------

/// Reads the added tokens of a checkpoint directory: `added_tokens.json` (`{"token": id}`) and
/// the `added_tokens_decoder` of `tokenizer_config.json` (`{"id": {"content": …,
/// "special": …}}`). Both files are optional.
///
/// Tokens listed only in `added_tokens.json` are taken as special.
///
/// # Errors
///
/// `Io` when a file exists but cannot be read; `Json` when it is not valid JSON of the
/// expected shape, or when a text is given two ids or an id two texts.
pub fn read_added_tokens(dir: &Path) -> Result<Vec<AddedTokenSpec>> {
    let mut by_id: BTreeMap<u32, AddedTokenSpec> = BTreeMap::new();
    let mut add = |path: &Path, token: AddedTokenSpec| -> Result<()> {
        if let Some(old) = by_id.get_mut(&token.id) {
            if old.content != token.content {
                return Err(json_err(
                    path,
                    format!(
                        "id {} is `{}` here but `{}` elsewhere",
                        token.id, token.content, old.content
                    ),
                ));
            }
            old.special = token.special;
        } else {
            by_id.insert(token.id, token);
        }
        Ok(())
    };

    let path = dir.join("added_tokens.json");
    if let Some(value) = read_json(&path)? {
        let map = value
            .as_object()
            .ok_or_else(|| json_err(&path, "expected an object {\"token\": id}"))?;
        for (content, id) in map {
            let id = json_id(id.as_u64(), &path, content)?;
            add(
                &path,
                AddedTokenSpec {
                    content: content.clone(),
                    id,
                    special: true,
                },
            )?;
        }
    }

    let path = dir.join("tokenizer_config.json");
    if let Some(value) = read_json(&path)?
        && let Some(decoder) = value.get("added_tokens_decoder")
    {
        let map = decoder
            .as_object()
            .ok_or_else(|| json_err(&path, "added_tokens_decoder is not an object"))?;
        for (id, entry) in map {
            let id = json_id(id.parse().ok(), &path, id)?;
            let content = entry
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| json_err(&path, format!("added token {id} has no content")))?;
            let special = entry
                .get("special")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true);
            add(
                &path,
                AddedTokenSpec {
                    content: content.to_owned(),
                    id,
                    special,
                },
            )?;
        }
    }

    let mut seen: HashMap<&str, u32> = HashMap::new();
    for token in by_id.values() {
        if let Some(other) = seen.insert(&token.content, token.id) {
            return Err(json_err(
                &dir.join("tokenizer_config.json"),
                format!("`{}` is given ids {other} and {}", token.content, token.id),
            ));
        }
    }
    Ok(by_id.into_values().collect())
}

fn json_id(id: Option<u64>, path: &Path, what: &str) -> Result<u32> {
    id.and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| json_err(path, format!("`{what}` has no valid token id")))
}

fn json_err(path: &Path, reason: impl Into<String>) -> SentencePieceError {
    SentencePieceError::Json {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SentencePieceError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| json_err(path, e.to_string()))
}

/// Converts `dir/tokenizer.model` (with the added tokens of [`read_added_tokens`]) into
/// `dir/tokenizer.json` and returns that path.
///
/// The file is written to a temporary name in `dir` and renamed into place, so a reader never
/// sees a partial file. An existing `tokenizer.json` is an error unless `overwrite` is true.
///
/// # Errors
///
/// `AlreadyExists` (nothing is written), `Io` naming the file that could not be read, written
/// or renamed, the errors of [`read_added_tokens`] and of [`convert`].
pub fn convert_file(dir: &Path, overwrite: bool) -> Result<PathBuf> {
    let target = dir.join("tokenizer.json");
    if !overwrite && target.exists() {
        return Err(SentencePieceError::AlreadyExists { path: target });
    }
    let model_path = dir.join("tokenizer.model");
    let bytes = std::fs::read(&model_path).map_err(|source| SentencePieceError::Io {
        op: "read",
        path: model_path.clone(),
        source,
    })?;
    let added = read_added_tokens(dir)?;
    let tokenizer = convert_with(&bytes, &added)?;
    let json = tokenizer.to_string(false).map_err(tok_err)?;

    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let tmp = dir.join(format!(
        ".tokenizer.json.{}-{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if let Err(source) = std::fs::write(&tmp, json) {
        let _ = std::fs::remove_file(&tmp);
        return Err(SentencePieceError::Io {
            op: "write",
            path: tmp,
            source,
        });
    }
    if !overwrite && target.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Err(SentencePieceError::AlreadyExists { path: target });
    }
    std::fs::rename(&tmp, &target).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        SentencePieceError::Io {
            op: "rename",
            path: target.clone(),
            source,
        }
    })?;
    Ok(target)
}
