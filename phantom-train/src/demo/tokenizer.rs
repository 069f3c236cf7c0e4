//! Training a small byte-level BPE tokenizer for a demo model trained from scratch.
//!
//! The tokenizer follows the layout of the Qwen2 backbone's: a byte-level pre-tokenizer and
//! decoder (so every text, whatever its characters, encodes and decodes back exactly), no
//! normalizer, and the ChatML and image tokens as special added tokens with ids 0 to 5 in the
//! order of [`SPECIAL_TOKENS`]. Prompts are rendered as
//! `<|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>`.
//!
//! Training is deterministic: the same corpus and vocabulary size give a byte-identical
//! `tokenizer.json` (see [`train_tokenizer`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use phantom_model::processor::prompt::{IMG_CONTEXT, IMG_END, IMG_START};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// End of text; also a natural padding token.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// Opens a ChatML turn.
pub const IM_START: &str = "<|im_start|>";
/// Closes a ChatML turn; generation stops on it.
pub const IM_END: &str = "<|im_end|>";
/// The special tokens, in id order (`<|endoftext|>` is id 0); the image tokens are those of
/// the prompt builder.
pub const SPECIAL_TOKENS: [&str; 6] = [
    END_OF_TEXT,
    IM_START,
    IM_END,
    IMG_START,
    IMG_END,
    IMG_CONTEXT,
];

/// Byte-level BPE starts from one token per byte value.
const BYTE_ALPHABET: usize = 256;
/// Smallest vocabulary: the byte alphabet plus the special tokens.
pub const MIN_VOCAB_SIZE: usize = BYTE_ALPHABET + SPECIAL_TOKENS.len();

/// A pair must occur at least this often to become a merge; rarer merges only waste
/// vocabulary on a small corpus.
const MIN_PAIR_FREQUENCY: u64 = 2;

/// Errors of tokenizer training and saving.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerTrainError {
    /// The requested vocabulary cannot even hold the byte alphabet and the special tokens.
    #[error(
        "vocabulary size {requested} is too small: byte-level BPE needs at least {minimum} \
         (256 byte tokens and {} special tokens)",
        SPECIAL_TOKENS.len()
    )]
    VocabTooSmall {
        /// The size asked for.
        requested: usize,
        /// The least size that works.
        minimum: usize,
    },
    /// The `tokenizers` trainer failed.
    #[error("tokenizer training failed: {reason}")]
    Train {
        /// Message of the `tokenizers` crate.
        reason: String,
    },
    /// The tokenizer could not be turned into JSON.
    #[error("cannot serialise the tokenizer: {reason}")]
    Serialize {
        /// Message of the `tokenizers` crate.
        reason: String,
    },
    /// The tokenizer file could not be written.
    #[error("cannot write {}: {source}", .path.display())]
    Io {
        /// File that was being written.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Trains a byte-level BPE tokenizer of at most `vocab_size` tokens (special tokens included)
/// on `corpus`, e.g. every question and answer of the training set.
///
/// Special tokens that occur in the corpus text (e.g. in rendered prompts) are cut out
/// before training, so their text is never learnt as merges. Fewer than `vocab_size` tokens
/// result when the corpus has no more pairs that occur at least twice.
///
/// The result is deterministic: the same corpus and size give the same `tokenizer.json`
/// bytes. The trainer counts words and pairs in parallel, but only adds counts up; it assigns
/// ids in a fixed order (special tokens, the sorted byte alphabet, then merges in the order
/// they are made) and breaks ties between equally frequent pairs by their token ids, and the
/// file lists vocabulary and merges by id and rank. So neither thread scheduling nor the
/// randomly seeded hash maps inside the trainer change the result, which the tests check.
///
/// # Errors
///
/// [`TokenizerTrainError::VocabTooSmall`] below [`MIN_VOCAB_SIZE`], and
/// [`TokenizerTrainError::Train`] when the `tokenizers` trainer fails.
pub fn train_tokenizer(
    corpus: &[String],
    vocab_size: usize,
) -> Result<Tokenizer, TokenizerTrainError> {
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(TokenizerTrainError::VocabTooSmall {
            requested: vocab_size,
            minimum: MIN_VOCAB_SIZE,
        });
    }
    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|&token| AddedToken::from(token, true))
        .collect();
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(MIN_PAIR_FREQUENCY)
        .show_progress(false)
        .special_tokens(special)
        .initial_alphabet(alphabet)
        .build();

    // Qwen2 style: no prefix space, so that decoding gives back exactly the encoded text.
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(byte_level));
    // The trainer would learn the text of special tokens found in the corpus as ordinary
    // words, so it only sees the text between them, as encoding does.
    let pieces = corpus.iter().flat_map(|text| plain_pieces(text));
    let mut trainer = TrainerWrapper::from(trainer);
    tokenizer
        .train(&mut trainer, pieces)
        .map_err(|e| TokenizerTrainError::Train {
            reason: e.to_string(),
        })?;
    Ok(tokenizer)
}

/// The non-empty stretches of `text` between occurrences of special tokens.
fn plain_pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    // No special token is a prefix of another, so the earliest match is unambiguous.
    while let Some((at, len)) = SPECIAL_TOKENS
        .iter()
        .filter_map(|token| rest.find(token).map(|at| (at, token.len())))
        .min()
    {
        pieces.push(&rest[..at]);
        rest = &rest[at + len..];
    }
    pieces.push(rest);
    pieces.retain(|piece| !piece.is_empty());
    pieces
}

/// Writes `tokenizer` as a pretty-printed `tokenizer.json` to `path`.
///
/// # Errors
///
/// [`TokenizerTrainError::Serialize`] when the tokenizer cannot be turned into JSON, and
/// [`TokenizerTrainError::Io`] when the file cannot be written (its directory must exist).
pub fn save(tokenizer: &Tokenizer, path: &Path) -> Result<(), TokenizerTrainError> {
    let json = tokenizer
        .to_string(true)
        .map_err(|e| TokenizerTrainError::Serialize {
            reason: e.to_string(),
        })?;
    std::fs::write(path, json).map_err(|source| TokenizerTrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::shapes;
    use rand::{Rng, SeedableRng};

    /// Every question and answer of a shapes data set.
    fn shapes_corpus() -> Vec<String> {
        shapes::generate(400, 1, 56)
            .into_iter()
            .flat_map(|s| [s.question, s.chosen, s.rejected])
            .collect()
    }

    /// Random words over four letters: many ways to build the same token from different
    /// pairs, and many equally frequent pairs.
    fn tie_heavy_corpus(seed: u64) -> Vec<String> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..2000)
            .map(|_| {
                let words: Vec<String> = (0..rng.random_range(1..12))
                    .map(|_| {
                        (0..rng.random_range(1..9))
                            .map(|_| char::from(b'a' + rng.random_range(0..4u8)))
                            .collect()
                    })
                    .collect();
                words.join(" ")
            })
            .collect()
    }

    /// What the project's tokenizer wrapper does: no BOS/EOS, added tokens recognised.
    fn encode(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer
            .encode_fast(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> String {
        tokenizer.decode(ids, false).unwrap()
    }

    /// The wrapper's `require_special`: in the vocabulary, and its text encodes to that id.
    fn require_special(tokenizer: &Tokenizer, token: &str) -> u32 {
        let id = tokenizer.token_to_id(token).unwrap();
        assert_eq!(encode(tokenizer, token), [id], "{token}");
        id
    }

    #[test]
    fn texts_round_trip() {
        let corpus = shapes_corpus();
        let tokenizer = train_tokenizer(&corpus, 400).unwrap();
        let extra = [
            "",
            " leading and trailing spaces ",
            "two  spaces\nand\ttabs\r\n",
            "Ünïcödé, 汉字, emoji 🦀 and combining e\u{301}",
            "<image>What colour is the circle?",
            "unseen words: zebra quixotic",
        ];
        for text in corpus.iter().map(String::as_str).chain(extra) {
            let ids = encode(&tokenizer, text);
            assert_eq!(decode(&tokenizer, &ids), text);
        }
    }

    #[test]
    fn special_tokens_are_single_fixed_ids() {
        let tokenizer = train_tokenizer(&shapes_corpus(), 400).unwrap();
        for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(require_special(&tokenizer, token), id as u32);
        }
        let added = tokenizer.get_added_tokens_decoder();
        for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
            let added = &added[&(id as u32)];
            assert_eq!(added.content, *token);
            assert!(added.special);
        }
    }

    #[test]
    fn rendered_prompt_has_one_id_per_special_token() {
        let tokenizer = train_tokenizer(&shapes_corpus(), 400).unwrap();
        let context = IMG_CONTEXT.repeat(16);
        let prompt = format!(
            "{IM_START}user\n{IMG_START}{context}{IMG_END}What colour is the circle?{IM_END}\
             {IM_START}assistant\nThe circle is red.{IM_END}{END_OF_TEXT}"
        );
        let ids = encode(&tokenizer, &prompt);
        let count = |token: &str| {
            let id = tokenizer.token_to_id(token).unwrap();
            ids.iter().filter(|&&i| i == id).count()
        };
        assert_eq!(count(IM_START), 2);
        assert_eq!(count(IM_END), 2);
        assert_eq!(count(IMG_START), 1);
        assert_eq!(count(IMG_END), 1);
        assert_eq!(count(IMG_CONTEXT), 16);
        assert_eq!(count(END_OF_TEXT), 1);
        assert_eq!(decode(&tokenizer, &ids), prompt);
        // Skipping special tokens leaves exactly the plain text.
        assert_eq!(
            tokenizer.decode(&ids, true).unwrap(),
            "user\nWhat colour is the circle?assistant\nThe circle is red."
        );
    }

    #[test]
    fn special_tokens_in_the_corpus_are_not_learnt() {
        let corpus: Vec<String> = shapes_corpus()
            .chunks(3)
            .map(|t| {
                format!(
                    "{IM_START}user\n{}{IM_END}{IM_START}assistant\n{}{IM_END}",
                    t[0], t[1]
                )
            })
            .collect();
        let tokenizer = train_tokenizer(&corpus, 500).unwrap();
        let learnt_markup: Vec<String> = tokenizer
            .get_vocab(false)
            .into_keys()
            .filter(|t| !SPECIAL_TOKENS.contains(&t.as_str()))
            .filter(|t| t.contains("im_") || t.contains("|>"))
            .collect();
        assert!(learnt_markup.is_empty(), "{learnt_markup:?}");
        // The text around them is still learnt: the role names become whole tokens.
        assert_eq!(encode(&tokenizer, "user\n").len(), 2);
        assert_eq!(encode(&tokenizer, "assistant\n").len(), 2);
    }

    #[test]
    fn pieces_between_special_tokens() {
        assert_eq!(
            plain_pieces("<|im_start|>user\n<img><IMG_CONTEXT></img>Hi<|im_end|>"),
            ["user\n", "Hi"]
        );
        assert_eq!(plain_pieces("plain <im_end|>"), ["plain <im_end|>"]);
        assert!(plain_pieces("").is_empty());
    }

    #[test]
    fn vocab_size_is_at_most_requested() {
        let corpus = tie_heavy_corpus(0);
        for size in [MIN_VOCAB_SIZE, 300, 700, 1200] {
            let tokenizer = train_tokenizer(&corpus, size).unwrap();
            assert!(tokenizer.get_vocab_size(true) <= size, "{size}");
            assert_eq!(
                tokenizer.get_vocab_size(true),
                tokenizer.get_vocab_size(false)
            );
        }
        let full = train_tokenizer(&corpus, 1200).unwrap();
        assert_eq!(full.get_vocab_size(true), 1200);
    }

    #[test]
    fn too_small_vocab_is_an_error() {
        let err = train_tokenizer(&shapes_corpus(), MIN_VOCAB_SIZE - 1).unwrap_err();
        assert!(matches!(
            err,
            TokenizerTrainError::VocabTooSmall {
                requested: 261,
                minimum: 262
            }
        ));
    }

    #[test]
    fn empty_corpus_gives_a_byte_tokenizer() {
        let tokenizer = train_tokenizer(&[], 400).unwrap();
        assert_eq!(tokenizer.get_vocab_size(true), MIN_VOCAB_SIZE);
        let text = "any text at all ✓";
        assert_eq!(decode(&tokenizer, &encode(&tokenizer, text)), text);
    }

    #[test]
    fn deterministic() {
        for (corpus, size) in [(shapes_corpus(), 400), (tie_heavy_corpus(3), 1000)] {
            let first = train_tokenizer(&corpus, size)
                .unwrap()
                .to_string(true)
                .unwrap();
            for _ in 0..4 {
                let again = train_tokenizer(&corpus, size)
                    .unwrap()
                    .to_string(true)
                    .unwrap();
                assert!(again == first, "training is not deterministic");
            }
        }
    }

    #[test]
    fn saved_file_loads_back() {
        let dir = std::env::temp_dir().join(format!("phantom-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let corpus = shapes_corpus();
        let tokenizer = train_tokenizer(&corpus, 400).unwrap();
        save(&tokenizer, &path).unwrap();

        let from_file = Tokenizer::from_file(&path).unwrap();
        // The project's wrapper reads the bytes and parses them with `from_bytes`.
        let from_bytes = Tokenizer::from_bytes(std::fs::read(&path).unwrap()).unwrap();
        for loaded in [&from_file, &from_bytes] {
            assert_eq!(loaded.get_vocab_size(true), tokenizer.get_vocab_size(true));
            for token in SPECIAL_TOKENS {
                assert_eq!(
                    require_special(loaded, token),
                    require_special(&tokenizer, token)
                );
            }
            for text in &corpus {
                assert_eq!(encode(loaded, text), encode(&tokenizer, text));
            }
        }
        // Saving the loaded tokenizer gives the same bytes.
        let again = dir.join("again.json");
        save(&from_file, &again).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&again).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn project_wrapper_builds_phantom_prompts() {
        use phantom_model::processor::prompt::{
            ImageTokenIds, TOKENS_PER_TILE, Template, Turn, with_image_placeholders,
        };
        use phantom_model::processor::tokenizer::Tokenizer as Wrapper;

        let dir = std::env::temp_dir().join(format!("phantom-tok-wrap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let samples = shapes::generate(40, 2, 56);
        let corpus: Vec<String> = samples
            .iter()
            .flat_map(|s| [s.question.clone(), s.chosen.clone(), s.rejected.clone()])
            .collect();
        save(&train_tokenizer(&corpus, 400).unwrap(), &path).unwrap();
        let wrapper = Wrapper::from_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(wrapper.require_special(token).unwrap(), id as u32);
        }
        let image = ImageTokenIds::resolve(&wrapper).unwrap();
        let template = Template::ChatMl;
        assert_eq!(template.end_token_id(&wrapper).unwrap(), 2);

        for sample in &samples {
            let turns = [Turn::answered(
                with_image_placeholders(&sample.question, 1),
                sample.chosen.as_str(),
            )];
            let ids = template.encode(&wrapper, &turns, &[1]).unwrap();
            let expanded = template.render_expanded(&turns, &[1]).unwrap();
            // Splicing image ids gives what tokenizing the expanded text gives.
            assert_eq!(ids, wrapper.encode(&expanded).unwrap());
            assert_eq!(wrapper.decode(&ids).unwrap(), expanded);
            let context = ids.iter().filter(|&&id| id == image.context).count();
            assert_eq!(context, TOKENS_PER_TILE);
            assert_eq!(ids.iter().filter(|&&id| id == image.start).count(), 1);
            assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);

            // Streaming the answer's ids gives the answer back.
            let answer = wrapper.encode(&sample.chosen).unwrap();
            let mut decoder = wrapper.incremental_decoder();
            let mut streamed = String::new();
            for &id in &answer {
                streamed.extend(decoder.step(id).unwrap());
            }
            streamed.push_str(&decoder.finish().unwrap());
            assert_eq!(streamed, sample.chosen);
        }
    }

    #[test]
    fn save_to_missing_directory_is_io_error() {
        let tokenizer = train_tokenizer(&[], 300).unwrap();
        let path = std::env::temp_dir().join("phantom-no-such-dir/x/tokenizer.json");
        assert!(matches!(
            save(&tokenizer, &path),
            Err(TokenizerTrainError::Io { .. })
        ));
    }
}
