//! SentencePiece `tokenizer.model` → `tokenizer.json` conversion, checked against ids that the
//! Python `sentencepiece` package gave for the fixture models.
//!
//! Fixtures: `tests/fixtures/sentencepiece/` (regenerate with its `make.py`). `tokenizer.model`
//! has the shape of InternLM2's (BPE, byte fallback, split digits, identity normalizer, no dummy
//! prefix, whitespace kept) with `tokenizer_config.json` / `added_tokens.json` as InternLM2 and
//! InternVL checkpoints have them; `dummy_prefix.model` exercises the dummy prefix, whitespace
//! trimming and a precompiled charsmap, `llama_like.model` the dummy prefix with whitespace kept;
//! `unigram.model` must be refused.

use std::path::{Path, PathBuf};

use phantom_model::processor::sentencepiece::{
    self, AddedTokenSpec, ModelType, PieceType, SentencePieceError, SentencePieceModel,
};
use phantom_model::processor::tokenizer::Tokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sentencepiece")
}

fn read(name: &str) -> Vec<u8> {
    let path = fixtures().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

struct Case {
    text: String,
    ids: Vec<u32>,
    sp_encode: bool,
    roundtrip: bool,
    known_divergence: Option<String>,
}

fn cases(model: &str) -> Vec<Case> {
    let json: serde_json::Value = serde_json::from_slice(&read("cases.json")).unwrap();
    let list = json[model].as_array().expect("cases for the model");
    assert!(list.len() >= 15, "{model}: only {} cases", list.len());
    list.iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_owned(),
            ids: c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| u32::try_from(id.as_u64().unwrap()).unwrap())
                .collect(),
            sp_encode: c["sp_encode"].as_bool().unwrap(),
            roundtrip: c["roundtrip"].as_bool().unwrap(),
            known_divergence: c["known_divergence"].as_str().map(str::to_owned),
        })
        .collect()
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "phantom-sentencepiece-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A temp dir holding copies of the named fixture files.
    fn with(name: &str, files: &[&str]) -> Self {
        let dir = Self::new(name);
        for file in files {
            std::fs::copy(fixtures().join(file), dir.0.join(file)).unwrap();
        }
        dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CHECKPOINT_FILES: [&str; 3] = [
    "tokenizer.model",
    "added_tokens.json",
    "tokenizer_config.json",
];

/// Checks every case's ids exactly, and the decoded text where sentencepiece round-trips it.
fn check_cases(tok: &Tokenizer, model: &str) -> usize {
    let mut checked = 0;
    for case in cases(model) {
        let ids = tok.encode(&case.text).unwrap();
        match case.known_divergence.as_deref() {
            None => assert_eq!(ids, case.ids, "{model}: ids of {:?}", case.text),
            Some("leading_dummy_prefix") => {
                // sentencepiece: ["▁", "<|im_start|>", ...]; added tokens are split out first.
                assert_eq!(ids, case.ids[1..], "{model}: ids of {:?}", case.text);
                continue;
            }
            Some(other) => panic!("unknown divergence {other}"),
        }
        if case.roundtrip {
            assert_eq!(
                tok.decode(&ids).unwrap(),
                case.text,
                "{model}: decode of {:?}",
                case.text
            );
            // The streaming decoder must agree (byte-fallback runs split characters).
            let mut stream = tok.incremental_decoder();
            let mut text = String::new();
            for &id in &ids {
                text.extend(stream.step(id).unwrap());
            }
            text.push_str(&stream.finish().unwrap());
            assert_eq!(
                text, case.text,
                "{model}: streamed decode of {:?}",
                case.text
            );
        }
        checked += 1;
    }
    checked
}

#[test]
fn parses_the_model_proto() {
    let model = SentencePieceModel::parse(&read("tokenizer.model")).unwrap();
    assert_eq!(model.pieces.len(), 700);
    assert_eq!(model.trainer_spec.model_type, ModelType::Bpe);
    assert!(model.trainer_spec.byte_fallback);
    assert!(!model.trainer_spec.treat_whitespace_as_suffix);
    let t = &model.trainer_spec;
    assert_eq!((t.unk_id, t.bos_id, t.eos_id, t.pad_id), (0, 1, 2, -1));
    let n = &model.normalizer_spec;
    assert_eq!(n.name, "identity");
    assert!(n.precompiled_charsmap.is_empty());
    assert!(!n.add_dummy_prefix && !n.remove_extra_whitespaces && n.escape_whitespaces);

    let kinds: Vec<(&str, PieceType)> = model.pieces[..6]
        .iter()
        .map(|p| (p.piece.as_str(), p.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("<unk>", PieceType::Unknown),
            ("<s>", PieceType::Control),
            ("</s>", PieceType::Control),
            ("<|im_start|>", PieceType::UserDefined),
            ("<|im_end|>", PieceType::UserDefined),
            ("[UNUSED_TOKEN_0]", PieceType::UserDefined),
        ]
    );
    let bytes = model
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::Byte)
        .count();
    assert_eq!(bytes, 256);
    assert_eq!(model.pieces[6].piece, "<0x00>");
    // BPE scores: normal pieces strictly decreasing in id order.
    let scores: Vec<f32> = model
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::Normal)
        .map(|p| p.score)
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] > w[1]),
        "scores not decreasing"
    );

    let dummy = SentencePieceModel::parse(&read("dummy_prefix.model")).unwrap();
    let n = &dummy.normalizer_spec;
    assert!(n.add_dummy_prefix && n.remove_extra_whitespaces && !n.precompiled_charsmap.is_empty());
}

/// The InternLM2-shaped checkpoint directory: convert to `tokenizer.json`, load it the way the
/// runtime does, and compare with the Python slow tokenizer's ids.
#[test]
fn converted_checkpoint_matches_python_ids() {
    let dir = TempDir::with("checkpoint", &CHECKPOINT_FILES);
    let path = sentencepiece::convert_file(&dir.0, false).unwrap();
    assert_eq!(path, dir.0.join("tokenizer.json"));
    let tok = Tokenizer::from_file(&path).unwrap();
    let checked = check_cases(&tok, "tokenizer.model");
    assert!(checked >= 15, "only {checked} cases checked");

    // 700 pieces + <img>, </img>, <IMG_CONTEXT>.
    assert_eq!(tok.vocab_size(), 703);
    for (token, id) in [
        ("<unk>", 0),
        ("<s>", 1),
        ("</s>", 2),
        ("<|im_start|>", 3),
        ("<|im_end|>", 4),
        ("<|plugin|>", 5),
        ("<img>", 700),
        ("</img>", 701),
        ("<IMG_CONTEXT>", 702),
    ] {
        assert_eq!(tok.require_special(token).unwrap(), id, "{token}");
    }
    // The placeholder piece was renamed; its id now decodes to the new text.
    assert_eq!(tok.token_to_id("[UNUSED_TOKEN_0]"), None);
    assert_eq!(tok.id_to_token(5).as_deref(), Some("<|plugin|>"));

    // Special tokens (per tokenizer_config.json) are dropped when asked.
    let ids = tok
        .encode("<|im_start|>user\nhi<img><IMG_CONTEXT></img><|im_end|>")
        .unwrap();
    assert_eq!(tok.decode_skip_special(&ids).unwrap(), "user\nhi");

    // The in-memory conversion gives the same tokenizer as the file.
    let added = sentencepiece::read_added_tokens(&dir.0).unwrap();
    let direct = sentencepiece::convert_with(&read("tokenizer.model"), &added).unwrap();
    for case in cases("tokenizer.model") {
        let ids = direct.encode_fast(case.text.as_str(), false).unwrap();
        assert_eq!(ids.get_ids(), case.ids, "in-memory ids of {:?}", case.text);
    }
}

/// `convert` with the plain `(content, id)` list: sentencepiece's own ids are untouched, the
/// extra tokens extend the vocabulary as special tokens.
#[test]
fn convert_with_plain_added_tokens() {
    let added = [
        ("<img>".to_owned(), 700),
        ("</img>".to_owned(), 701),
        ("<IMG_CONTEXT>".to_owned(), 702),
    ];
    let tok = Tokenizer::from(sentencepiece::convert(&read("tokenizer.model"), &added).unwrap());
    let mut checked = 0;
    for case in cases("tokenizer.model").into_iter().filter(|c| c.sp_encode) {
        assert_eq!(
            tok.encode(&case.text).unwrap(),
            case.ids,
            "ids of {:?}",
            case.text
        );
        checked += 1;
    }
    assert!(checked >= 15);
    assert_eq!(tok.require_special("<IMG_CONTEXT>").unwrap(), 702);
    // Without the config, the placeholder keeps its sentencepiece text (a user-defined piece,
    // matched as one token but not special).
    assert_eq!(tok.encode("a[UNUSED_TOKEN_0]").unwrap().last(), Some(&5));
    assert_eq!(
        tok.decode_skip_special(&[5, 702]).unwrap(),
        "[UNUSED_TOKEN_0]"
    );
}

/// Dummy prefix, whitespace trimming/collapsing and a precompiled charsmap, against plain
/// `sp.encode`.
#[test]
fn dummy_prefix_model_matches_sentencepiece() {
    let tok = Tokenizer::from(sentencepiece::convert(&read("dummy_prefix.model"), &[]).unwrap());
    let checked = check_cases(&tok, "dummy_prefix.model");
    assert!(checked >= 15, "only {checked} cases checked");
    // Decoding drops the dummy prefix again.
    let ids = tok.encode("Hello world").unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "Hello world");
}

/// Llama's shape (dummy prefix, whitespace kept), against plain `sp.encode`: leading spaces and
/// a literal "▁" keep the extra prefix piece that sentencepiece gives them.
#[test]
fn llama_like_model_matches_sentencepiece() {
    let tok = Tokenizer::from(sentencepiece::convert(&read("llama_like.model"), &[]).unwrap());
    let checked = check_cases(&tok, "llama_like.model");
    assert!(checked >= 15, "only {checked} cases checked");
}

#[test]
fn unigram_model_is_refused() {
    let err = sentencepiece::convert(&read("unigram.model"), &[]).unwrap_err();
    assert!(
        matches!(
            err,
            SentencePieceError::UnsupportedModelType {
                model_type: ModelType::Unigram
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("UNIGRAM") && message.contains("BPE"),
        "{message}"
    );
}

#[test]
fn garbage_is_rejected() {
    // An LCG, so the "random" bytes are the same on every run.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 56) as u8
        })
        .collect();
    let inputs: [(&str, &[u8]); 5] = [
        ("empty", b""),
        ("text", b"this is not a sentencepiece model\n"),
        ("json", br#"{"version": "1.0", "model": {"type": "BPE"}}"#),
        ("random", &random),
        (
            "overlong varint",
            &[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
    ];
    for (name, bytes) in inputs {
        let err = sentencepiece::convert(bytes, &[]).unwrap_err();
        assert!(
            matches!(
                err,
                SentencePieceError::Truncated { .. }
                    | SentencePieceError::WrongWireType { .. }
                    | SentencePieceError::InvalidKey { .. }
                    | SentencePieceError::VarintOverflow { .. }
                    | SentencePieceError::InvalidUtf8 { .. }
                    | SentencePieceError::MissingField { .. }
            ),
            "{name}: {err:?}"
        );
    }
    assert!(matches!(
        sentencepiece::convert(b"", &[]).unwrap_err(),
        SentencePieceError::MissingField {
            field: "trainer_spec"
        }
    ));
    assert!(matches!(
        sentencepiece::convert(inputs[4].1, &[]).unwrap_err(),
        SentencePieceError::VarintOverflow { offset: 1 }
    ));
}

#[test]
fn wrong_wire_types_are_named() {
    // ModelProto.pieces (field 1) as a varint.
    let err = SentencePieceModel::parse(&[0x08, 0x01]).unwrap_err();
    assert!(
        matches!(
            err,
            SentencePieceError::WrongWireType {
                message: "ModelProto",
                field: 1,
                found: 0,
                expected: 2,
                offset: 0
            }
        ),
        "{err:?}"
    );
    // SentencePiece.score (field 2) as a varint inside the first piece.
    let err = SentencePieceModel::parse(&[0x0a, 0x02, 0x10, 0x01]).unwrap_err();
    assert!(
        matches!(
            err,
            SentencePieceError::WrongWireType {
                message: "SentencePiece",
                field: 2,
                expected: 5,
                offset: 2,
                ..
            }
        ),
        "{err:?}"
    );
    // Group wire types are not protobuf that sentencepiece writes.
    let err = SentencePieceModel::parse(&[0x0b]).unwrap_err();
    assert!(
        matches!(
            err,
            SentencePieceError::InvalidKey {
                field: 1,
                wire_type: 3,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn every_truncation_is_rejected() {
    let bytes = read("tokenizer.model");
    for len in 0..bytes.len() {
        let result = SentencePieceModel::parse(&bytes[..len]);
        assert!(result.is_err(), "prefix of {len} bytes parsed");
    }
    let err = sentencepiece::convert(&bytes[..bytes.len() / 2], &[]).unwrap_err();
    assert!(
        matches!(err, SentencePieceError::Truncated { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("data ends inside"), "{err}");
}

#[test]
fn convert_file_refuses_to_overwrite() {
    let dir = TempDir::with("overwrite", &CHECKPOINT_FILES);
    let target = dir.0.join("tokenizer.json");
    std::fs::write(&target, "keep me").unwrap();
    let err = sentencepiece::convert_file(&dir.0, false).unwrap_err();
    assert!(
        matches!(&err, SentencePieceError::AlreadyExists { path } if *path == target),
        "{err:?}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");

    sentencepiece::convert_file(&dir.0, true).unwrap();
    Tokenizer::from_file(&target).unwrap();
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

#[test]
fn convert_file_reports_missing_and_malformed_files() {
    let dir = TempDir::new("missing");
    let err = sentencepiece::convert_file(&dir.0, false).unwrap_err();
    match &err {
        SentencePieceError::Io {
            op: "read", path, ..
        } => {
            assert_eq!(path, &dir.0.join("tokenizer.model"));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("tokenizer.model"), "{err}");

    let dir = TempDir::with("badjson", &["tokenizer.model"]);
    std::fs::write(dir.0.join("added_tokens.json"), "{\"<img>\": \"seven\"}").unwrap();
    let err = sentencepiece::convert_file(&dir.0, false).unwrap_err();
    let is_json = matches!(&err, SentencePieceError::Json { path, .. }
        if path.ends_with("added_tokens.json"));
    assert!(is_json, "{err:?}");
    assert!(!dir.0.join("tokenizer.json").exists());
}

#[test]
fn added_token_conflicts_are_errors() {
    let model = read("tokenizer.model");
    let spec = |content: &str, id: u32| AddedTokenSpec {
        content: content.to_owned(),
        id,
        special: true,
    };
    // A gap after the vocabulary cannot be represented by `tokenizers`.
    let err = sentencepiece::convert_with(&model, &[spec("<img>", 700), spec("</img>", 702)])
        .unwrap_err();
    assert!(
        matches!(&err, SentencePieceError::AddedToken { id: 702, .. }),
        "{err:?}"
    );
    // One text, two ids.
    let err =
        sentencepiece::convert_with(&model, &[spec("<img>", 700), spec("<img>", 701)]).unwrap_err();
    assert!(
        matches!(&err, SentencePieceError::AddedToken { .. }),
        "{err:?}"
    );
    // An added token past the vocabulary whose text is already a piece.
    let err = sentencepiece::convert_with(&model, &[spec("▁the", 700)]).unwrap_err();
    assert!(
        matches!(&err, SentencePieceError::AddedToken { id: 700, .. }),
        "{err:?}"
    );
    // Renaming a piece to the text of another piece.
    let err = sentencepiece::convert_with(&model, &[spec("<s>", 5)]).unwrap_err();
    assert!(
        matches!(&err, SentencePieceError::InvalidModel { .. }),
        "{err:?}"
    );
}

#[test]
fn config_files_are_read() {
    let added = sentencepiece::read_added_tokens(&fixtures()).unwrap();
    let find = |id: u32| added.iter().find(|t| t.id == id).cloned();
    assert_eq!(
        find(5),
        Some(AddedTokenSpec {
            content: "<|plugin|>".to_owned(),
            id: 5,
            special: true
        })
    );
    assert_eq!(
        find(702).map(|t| t.content),
        Some("<IMG_CONTEXT>".to_owned())
    );
    assert_eq!(added.len(), 9);
    assert!(
        sentencepiece::read_added_tokens(Path::new("/nonexistent-dir"))
            .unwrap()
            .is_empty()
    );
}
