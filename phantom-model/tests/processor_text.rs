//! Text side of the processor: tokenizer wrapper, incremental decoding, chat templates and
//! prompt → input ids, checked against the reference fixtures.
//!
//! Toy tokenizers: the model fixtures were made with a toy tokenizer (fixtures README §2(a),
//! §9.5) that maps each UTF-8 byte b to id b+16 plus a few special ids. This file builds it as a
//! real `tokenizer.json` and keeps the stored copies under `tests/fixtures/toy_tokenizer*/` in
//! sync: run with `PHANTOM_WRITE_TOY_TOKENIZER=1` to rewrite them after changing the recipe.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use phantom_model::processor::prompt::{
    self, IMG_CONTEXT, IMG_END, IMG_START, ImageTokenIds, PromptError, TOKENS_PER_TILE, Template,
    Turn,
};
use phantom_model::processor::tokenizer::{Tokenizer, TokenizerError};
use tokenizers::AddedToken;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn reference() -> PathBuf {
    fixtures().join("phantom-ref")
}

/// The real Qwen3 tokenizer of the fixtures (loaded once: it is 5 MB of JSON).
fn qwen() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_file(reference().join("tokenizer/tokenizer.json"))
            .expect("load fixture tokenizer.json")
    })
}

/// The Qwen3 tokenizer plus `<img>`, `<IMG_CONTEXT>`, `</img>` as added special tokens, the
/// way Phantom's own Qwen2-based tokenizer is said to have them.
fn qwen_with_image_tokens() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let mut inner = qwen().inner().clone();
        let added = inner.add_special_tokens(&[
            AddedToken::from(IMG_START, true),
            AddedToken::from(IMG_END, true),
            AddedToken::from(IMG_CONTEXT, true),
        ]);
        assert_eq!(added, 3);
        Tokenizer::from(inner)
    })
}

struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn cases() -> Vec<Case> {
    let path = reference().join("tokenizer/tokenizer_cases.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read cases")).expect("parse cases");
    json["cases"]
        .as_array()
        .expect("cases array")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            ids: c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| u32::try_from(v.as_u64().expect("id")).expect("u32 id"))
                .collect(),
            decoded: c["decoded"].as_str().expect("decoded").to_string(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tokenizer wrapper

#[test]
fn encode_and_decode_match_reference_cases() {
    let tok = qwen();
    let cases = cases();
    assert_eq!(cases.len(), 13);
    for case in &cases {
        let ids = tok.encode(&case.text).expect("encode");
        assert_eq!(ids, case.ids, "ids of {:?}", case.text);
        assert_eq!(
            tok.decode(&ids).expect("decode"),
            case.decoded,
            "decode of {:?}",
            case.text
        );
    }
}

#[test]
fn vocabulary_queries() {
    let tok = qwen();
    // 151,643 BPE tokens + 26 added tokens (fixtures README §6).
    assert_eq!(tok.vocab_size(), 151_669);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(151_643));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(151_644));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(151_645));
    assert_eq!(tok.token_to_id("<IMG_CONTEXT>"), None);
    assert_eq!(tok.id_to_token(151_645).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.require_special("<|im_end|>").expect("im_end"), 151_645);
    assert_eq!(Template::ChatMl.end_token_id(tok).expect("end id"), 151_645);
    // skip_special drops added special tokens only.
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>")
        .expect("encode");
    assert_eq!(tok.decode_skip_special(&ids).expect("decode"), "user\nHi");
}

#[test]
fn require_special_names_the_missing_token() {
    let tok = qwen();
    for token in [IMG_START, IMG_CONTEXT, IMG_END] {
        match tok.require_special(token) {
            Err(TokenizerError::MissingSpecialToken { token: t }) => assert_eq!(t, token),
            other => panic!("expected MissingSpecialToken for {token}, got {other:?}"),
        }
        let message = tok.require_special(token).unwrap_err().to_string();
        assert!(message.contains(token), "{message}");
    }
    // In the vocabulary, but a plain BPE entry: text "Ġthe" is split before it could match.
    match tok.require_special("Ġthe") {
        Err(TokenizerError::SpecialTokenNotSingle { token, id, encoded }) => {
            assert_eq!(token, "Ġthe");
            assert_eq!(id, 279);
            assert_ne!(encoded, vec![279]);
        }
        other => panic!("expected SpecialTokenNotSingle, got {other:?}"),
    }
}

#[test]
fn load_errors_are_typed() {
    let missing = reference().join("tokenizer/does_not_exist.json");
    match Tokenizer::from_file(&missing) {
        Err(TokenizerError::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Io error, got {other:?}"),
    }
    let cases_path = reference().join("tokenizer/tokenizer_cases.json");
    match Tokenizer::from_file(&cases_path) {
        Err(err @ TokenizerError::Parse { .. }) => {
            assert!(err.to_string().contains("tokenizer_cases.json"), "{err}")
        }
        other => panic!("expected Parse error, got {other:?}"),
    }
    assert!(matches!(
        Tokenizer::from_bytes(b"{ not json"),
        Err(TokenizerError::Parse { path: None, .. })
    ));
    let bytes = std::fs::read(reference().join("tokenizer/tokenizer.json")).expect("read");
    let tok = Tokenizer::from_bytes(&bytes).expect("from_bytes");
    assert_eq!(tok.encode("Hello").expect("encode"), vec![9707]);
}

// ---------------------------------------------------------------------------------------------
// Incremental decoding

/// Streams `ids` and returns (chunks, finish, number of steps that held text back).
fn stream(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, String, usize) {
    let mut decoder = tok.incremental_decoder();
    let mut chunks = Vec::new();
    let mut held = 0;
    for &id in ids {
        match decoder.step(id).expect("step") {
            Some(chunk) => chunks.push(chunk),
            None => held += 1,
        }
    }
    let rest = decoder.finish().expect("finish");
    (chunks, rest, held)
}

fn assert_streams_cleanly(tok: &Tokenizer, ids: &[u32], label: &str) -> usize {
    let full = tok.decode(ids).expect("decode");
    let (chunks, rest, held) = stream(tok, ids);
    for chunk in &chunks {
        assert!(
            !chunk.contains('\u{FFFD}'),
            "{label}: chunk {chunk:?} holds U+FFFD"
        );
        assert!(!chunk.is_empty(), "{label}: empty chunk");
    }
    assert_eq!(rest, "", "{label}: valid text leaves nothing to flush");
    assert_eq!(
        chunks.concat(),
        full,
        "{label}: chunks differ from the full decode"
    );
    held
}

#[test]
fn incremental_decoder_reproduces_full_decode_on_every_case() {
    let tok = qwen();
    let mut held_total = 0;
    for case in cases() {
        held_total += assert_streams_cleanly(tok, &case.ids, &case.text);
    }
    // The emoji/CJK cases split characters across byte-level tokens, so the hold-back path
    // must actually have been taken.
    assert!(held_total > 0);
}

#[test]
fn incremental_decoder_on_korean_emoji_cjk() {
    let tok = qwen();
    for text in [
        "안녕하세요, 세계! 이미지를 설명해 주세요.",
        "Emoji: 😀🐱\u{200d}👤👍🏽 🇰🇷 ❤️",
        "中文测试：请描述这张图片。",
        "こんにちは世界。画像を詳しく説明してください。",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🧑‍🤝‍🧑 ḱ̷̰ 𠀀𠀁",
    ] {
        let ids = tok.encode(text).expect("encode");
        assert_streams_cleanly(tok, &ids, text);
    }
    // Byte-per-token toy tokenizer: every multi-byte character is split.
    let toy = toy(Template::ChatMl);
    for text in ["안녕하세요", "😀🐱\u{200d}👤", "中文测试", "a€b𝄞c"] {
        let ids = toy.encode(text).expect("encode");
        let held = assert_streams_cleanly(&toy, &ids, text);
        let multibyte_extra: usize = text.chars().map(|c| c.len_utf8() - 1).sum();
        assert_eq!(
            held, multibyte_extra,
            "{text}: one hold per continuation byte"
        );
    }
}

#[test]
fn incremental_decoder_chunks_are_new_text_only() {
    let tok = qwen();
    let ids = tok.encode("Hello, world!").expect("encode");
    let (chunks, rest, held) = stream(tok, &ids);
    assert_eq!(chunks, vec!["Hello", ",", " world", "!"]);
    assert_eq!((rest.as_str(), held), ("", 0));
}

#[test]
fn incremental_decoder_flushes_and_survives_invalid_bytes() {
    let toy = toy(Template::ChatMl);
    let byte = |b: u8| u32::from(b) + 16;
    // Incomplete character at the very end: held back, then flushed as U+FFFD by finish().
    let mut decoder = toy.incremental_decoder();
    assert_eq!(
        decoder.step(byte(b'a')).expect("step").as_deref(),
        Some("a")
    );
    assert_eq!(decoder.step(byte(0xE4)).expect("step"), None);
    assert_eq!(decoder.step(byte(0xB8)).expect("step"), None);
    assert_eq!(decoder.finish().expect("finish"), "\u{FFFD}");
    // A stray invalid byte does not stall the stream: it comes out with the next character.
    let mut decoder = toy.incremental_decoder();
    assert_eq!(decoder.step(byte(0xF9)).expect("step"), None);
    assert_eq!(
        decoder.step(byte(b'A')).expect("step").as_deref(),
        Some("\u{FFFD}A")
    );
    assert_eq!(decoder.finish().expect("finish"), "");
    // Special tokens are kept by default and dropped on request.
    let ids = toy.encode("<|im_end|>x").expect("encode");
    assert_eq!(ids, vec![8, byte(b'x')]);
    let (chunks, _, _) = stream(&toy, &ids);
    assert_eq!(chunks.concat(), "<|im_end|>x");
    let mut decoder = toy.incremental_decoder().skip_special_tokens(true);
    assert_eq!(decoder.step(8).expect("step"), None);
    assert_eq!(
        decoder.step(byte(b'x')).expect("step").as_deref(),
        Some("x")
    );
}

// ---------------------------------------------------------------------------------------------
// Templates

#[test]
fn template_from_architecture() {
    assert_eq!(
        Template::from_architecture("Qwen2ForCausalLM").ok(),
        Some(Template::ChatMl)
    );
    assert_eq!(
        Template::from_architecture("InternLM2ForCausalLM").ok(),
        Some(Template::ChatMl)
    );
    assert_eq!(
        Template::from_architecture("Phi3ForCausalLM").ok(),
        Some(Template::Phi3)
    );
    match Template::from_architecture("LlamaForCausalLM") {
        Err(err @ PromptError::UnknownArchitecture(_)) => {
            assert!(err.to_string().contains("LlamaForCausalLM"))
        }
        other => panic!("expected UnknownArchitecture, got {other:?}"),
    }
    // Every fixture's config picks its template.
    for (dir, expected) in [
        ("tiny_tied", Template::ChatMl),
        ("tiny_untied", Template::ChatMl),
        ("internlm2_tiny", Template::ChatMl),
        ("phi3_tiny", Template::Phi3),
    ] {
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(reference().join(dir).join("config.json")).expect("config"),
        )
        .expect("parse config");
        let arch = config["llm_config"]["architectures"][0]
            .as_str()
            .expect("architecture");
        assert_eq!(
            Template::from_architecture(arch).expect(dir),
            expected,
            "{dir}"
        );
    }
    assert_eq!(Template::ChatMl.end_token(), "<|im_end|>");
    assert_eq!(Template::Phi3.end_token(), "<|end|>");
}

#[test]
fn render_single_turn() {
    let q = [Turn::question("Describe a cat.")];
    assert_eq!(
        Template::ChatMl.render(&q).expect("render"),
        "<|im_start|>user\nDescribe a cat.<|im_end|><|im_start|>assistant\n"
    );
    assert_eq!(
        Template::Phi3.render(&q).expect("render"),
        "<|user|>\nDescribe a cat.<|end|><|assistant|>\n"
    );
    let qi = [Turn::question(prompt::with_image_placeholders(
        "Describe the image in detail.",
        1,
    ))];
    assert_eq!(
        Template::ChatMl.render(&qi).expect("render"),
        "<|im_start|>user\n<image>Describe the image in detail.<|im_end|><|im_start|>assistant\n"
    );
    assert_eq!(
        Template::Phi3.render_expanded(&qi, &[1]).expect("render"),
        format!(
            "<|user|>\n<img>{}</img>Describe the image in detail.<|end|><|assistant|>\n",
            "<IMG_CONTEXT>".repeat(256)
        )
    );
}

#[test]
fn render_multi_turn() {
    let turns = [
        Turn::answered("<image>What is this?", "A cat."),
        Turn::answered("And its colour?", "Black."),
        Turn::question("Is it <image> happy?"),
    ];
    assert_eq!(
        Template::ChatMl.render(&turns).expect("render"),
        "<|im_start|>user\n<image>What is this?<|im_end|><|im_start|>assistant\nA cat.<|im_end|>\
         <|im_start|>user\nAnd its colour?<|im_end|><|im_start|>assistant\nBlack.<|im_end|>\
         <|im_start|>user\nIs it <image> happy?<|im_end|><|im_start|>assistant\n"
    );
    assert_eq!(
        Template::Phi3.render(&turns).expect("render"),
        "<|user|>\n<image>What is this?<|end|><|assistant|>\nA cat.<|end|>\
         <|user|>\nAnd its colour?<|end|><|assistant|>\nBlack.<|end|>\
         <|user|>\nIs it <image> happy?<|end|><|assistant|>\n"
    );
    let expanded = Template::Phi3
        .render_expanded(&turns, &[2, 1])
        .expect("render");
    assert_eq!(
        expanded,
        format!(
            "<|user|>\n<img>{}</img>What is this?<|end|><|assistant|>\nA cat.<|end|>\
             <|user|>\nAnd its colour?<|end|><|assistant|>\nBlack.<|end|>\
             <|user|>\nIs it <img>{}</img> happy?<|end|><|assistant|>\n",
            "<IMG_CONTEXT>".repeat(512),
            "<IMG_CONTEXT>".repeat(256)
        )
    );
    // A fully answered conversation ends with the end token (training / scoring use).
    let done = [Turn::answered("Hi", "Hello.")];
    assert_eq!(
        Template::ChatMl.render(&done).expect("render"),
        "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello.<|im_end|>"
    );
    // `<image>` in an answer is literal text, not an image slot.
    let literal = [Turn::answered("Hi", "<image>"), Turn::question("ok")];
    assert!(
        Template::ChatMl
            .render_expanded(&literal, &[])
            .expect("render")
            .contains("<image>")
    );
}

#[test]
fn render_errors() {
    assert!(matches!(
        Template::ChatMl.render(&[]),
        Err(PromptError::EmptyConversation)
    ));
    let gap = [Turn::question("a"), Turn::question("b")];
    assert!(matches!(
        Template::ChatMl.render(&gap),
        Err(PromptError::MissingAnswer { turn: 0 })
    ));
    let two = [Turn::question("<image><image>Compare.")];
    match Template::ChatMl.render_expanded(&two, &[3]) {
        Err(PromptError::ImageCountMismatch {
            placeholders: 2,
            images: 1,
        }) => {}
        other => panic!("expected ImageCountMismatch, got {other:?}"),
    }
    let none = [Turn::question("No image here.")];
    assert!(matches!(
        Template::Phi3.encode(qwen(), &none, &[1]),
        Err(PromptError::ImageCountMismatch {
            placeholders: 0,
            images: 1
        })
    ));
    assert!(matches!(
        Template::ChatMl.render_expanded(&two, &[1, 0]),
        Err(PromptError::ZeroTiles { image: 1 })
    ));
}

#[test]
fn expansion_counts_two_images_one_and_seven_tiles() {
    let tok = qwen_with_image_tokens();
    let image = ImageTokenIds::resolve(tok).expect("image tokens");
    assert_eq!(
        (image.start, image.end, image.context),
        (151_669, 151_670, 151_671),
        "appended after the 151,669 existing ids"
    );
    let turns = [Turn::question(
        "<image>First.<image>Second: which is larger?",
    )];
    let ids = Template::ChatMl
        .encode(tok, &turns, &[1, 7])
        .expect("encode");
    let count = |id: u32| ids.iter().filter(|&&x| x == id).count();
    assert_eq!(count(image.context), TOKENS_PER_TILE * 8);
    assert_eq!(count(image.start), 2);
    assert_eq!(count(image.end), 2);
    // Runs in order of appearance: 256 context ids, then 7·256.
    let starts: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|&(_, &x)| x == image.start)
        .map(|(i, _)| i)
        .collect();
    let ends: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|&(_, &x)| x == image.end)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(ends[0] - starts[0] - 1, 256);
    assert_eq!(ends[1] - starts[1] - 1, 7 * 256);
    assert!(
        ids[starts[0] + 1..ends[0]]
            .iter()
            .all(|&x| x == image.context)
    );
    assert!(
        ids[starts[1] + 1..ends[1]]
            .iter()
            .all(|&x| x == image.context)
    );
}

/// Splicing image ids must give exactly what tokenizing the expanded string gives, whenever
/// the image tokens are added tokens.
#[test]
fn spliced_ids_equal_tokenized_expanded_text() {
    let conversations: Vec<(Vec<Turn>, Vec<usize>)> = vec![
        (vec![Turn::question("<image>Describe the image.")], vec![1]),
        (
            vec![Turn::question("<image>\n<image> compare 안녕 😀 these  ")],
            vec![7, 1],
        ),
        (
            vec![
                Turn::answered("<image>What is this?", "A cat 🐱.\n"),
                Turn::question("Now this one:<image>"),
            ],
            vec![3, 5],
        ),
        (vec![Turn::question("Text only, café.")], vec![]),
    ];
    for template in [Template::ChatMl, Template::Phi3] {
        for tok in [qwen_with_image_tokens(), &toy(template)] {
            for (turns, tiles) in &conversations {
                let spliced = template.encode(tok, turns, tiles).expect("encode");
                let expanded = template.render_expanded(turns, tiles).expect("render");
                let whole = tok.encode(&expanded).expect("encode expanded");
                assert_eq!(spliced, whole, "{template:?} {turns:?}");
                assert_eq!(tok.decode(&spliced).expect("decode"), expanded);
            }
        }
    }
    // The modified reference case: the three strings are now single ids.
    let tok = qwen_with_image_tokens();
    let ids = tok
        .encode("<img><IMG_CONTEXT><IMG_CONTEXT></img> is not special here")
        .expect("ids");
    assert_eq!(&ids[..4], &[151_669, 151_671, 151_671, 151_670]);
}

#[test]
fn image_prompt_with_tokenizer_lacking_image_tokens_is_an_error_naming_the_token() {
    let turns = [Turn::question("<image>Describe the image.")];
    match Template::ChatMl.encode(qwen(), &turns, &[1]) {
        Err(PromptError::Tokenizer(TokenizerError::MissingSpecialToken { token })) => {
            assert_eq!(token, IMG_START)
        }
        other => panic!("expected a missing <img> error, got {other:?}"),
    }
    let message = Template::ChatMl
        .encode(qwen(), &turns, &[1])
        .unwrap_err()
        .to_string();
    assert!(message.contains("<img>"), "{message}");
    // Text-only prompts do not need the image tokens.
    let text = [Turn::question("Describe a cat.")];
    let ids = Template::ChatMl
        .encode(qwen(), &text, &[])
        .expect("text prompt");
    let rendered = Template::ChatMl.render(&text).expect("render");
    assert_eq!(ids, qwen().encode(&rendered).expect("encode"));
    assert_eq!(ids[0], 151_644);
}

// ---------------------------------------------------------------------------------------------
// Toy tokenizers of the model fixtures

/// GPT-2 byte-level alphabet: printable Latin-1 bytes stand for themselves, the other bytes
/// take the code points 256, 257, … in increasing byte order.
fn byte_level_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        char::from(byte)
    } else {
        let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
        char::from_u32(256 + rank).expect("valid code point")
    }
}

/// Size of the toy models' vocabulary (`llm_config.vocab_size`).
const TOY_VOCAB: u32 = 512;

fn toy_specials(template: Template) -> Vec<(&'static str, u32)> {
    let mut specials = vec![("<|pad|>", 0), ("<|bos|>", 1), ("<|eos|>", 2)];
    match template {
        Template::ChatMl => specials.extend([("<|im_start|>", 7), ("<|im_end|>", 8)]),
        Template::Phi3 => specials.extend([
            ("<|user|>", 3),
            ("<|assistant|>", 4),
            ("<|end|>", 5),
            ("<|system|>", 6),
        ]),
    }
    specials.extend([("<img>", 9), ("</img>", 10), ("<IMG_CONTEXT>", 500)]);
    specials
}

/// Builds the toy tokenizer of the fixtures as a `tokenizers` pipeline:
/// * the ByteLevel pre-tokenizer (no regex split, no prefix space) rewrites every UTF-8 byte b
///   as one alphabet character, a bijection, so any text works, not only ASCII;
/// * a merge-free BPE whose vocabulary maps that character to id b+16 then emits one id per
///   byte;
/// * the template and image tokens are added special tokens at their fixture ids; pad/bos/eos
///   (0/1/2 in config.json) get names too, and every other id below 512 a filler
///   `<|toy_N|>` so that all model ids decode to something;
/// * the ByteLevel decoder turns bytes back into text (lossy where the model emits invalid
///   UTF-8).
fn build_toy(template: Template) -> tokenizers::Tokenizer {
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    let specials = toy_specials(template);
    let vocab: Vocab = (0..TOY_VOCAB)
        .map(|id| {
            let token = if let Some((name, _)) = specials.iter().find(|(_, i)| *i == id) {
                (*name).to_string()
            } else if (16..16 + 256).contains(&id) {
                byte_level_char((id - 16) as u8).to_string()
            } else {
                format!("<|toy_{id}|>")
            };
            (token, id)
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .expect("toy BPE");
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|(name, _)| AddedToken::from(*name, true))
        .collect();
    tok.add_special_tokens(&added);
    tok
}

fn toy_path(template: Template) -> PathBuf {
    match template {
        Template::ChatMl => fixtures().join("toy_tokenizer/tokenizer.json"),
        Template::Phi3 => fixtures().join("toy_tokenizer_phi3/tokenizer.json"),
    }
}

/// The stored toy tokenizer file.
fn toy(template: Template) -> Tokenizer {
    Tokenizer::from_file(toy_path(template))
        .expect("toy tokenizer.json (see toy_tokenizer_files_are_current)")
}

#[test]
fn toy_tokenizer_files_are_current() {
    let our_alphabet: BTreeSet<char> = (0..=255u8).map(byte_level_char).collect();
    let crate_alphabet: BTreeSet<char> =
        tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
    assert_eq!(our_alphabet, crate_alphabet);

    for template in [Template::ChatMl, Template::Phi3] {
        let built = build_toy(template).to_string(true).expect("serialise toy");
        let path = toy_path(template);
        if std::env::var_os("PHANTOM_WRITE_TOY_TOKENIZER").is_some() {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, format!("{built}\n")).expect("write toy tokenizer");
        }
        let stored: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("stored toy tokenizer"))
                .expect("parse stored");
        let built: serde_json::Value = serde_json::from_str(&built).expect("parse built");
        assert_eq!(
            stored,
            built,
            "{} is stale: rerun with PHANTOM_WRITE_TOY_TOKENIZER=1",
            path.display()
        );
    }
}

#[test]
fn toy_tokenizer_maps_bytes_to_id_plus_16() {
    for template in [Template::ChatMl, Template::Phi3] {
        let tok = toy(template);
        assert_eq!(tok.vocab_size(), TOY_VOCAB as usize);
        // Every byte value, through ASCII controls and multi-byte characters.
        let ascii: String = (0u8..128).map(char::from).collect();
        let text = format!("{ascii} é€𝄞 안녕 <image> <|toy_300|> \r\n");
        let ids = tok.encode(&text).expect("encode");
        let expected: Vec<u32> = text.bytes().map(|b| u32::from(b) + 16).collect();
        assert_eq!(ids, expected);
        assert_eq!(tok.decode(&ids).expect("decode"), text);
        let bytes: BTreeSet<u8> = text.bytes().collect();
        assert!(bytes.len() > 128);
        for (name, id) in toy_specials(template) {
            assert_eq!(tok.require_special(name).expect(name), id, "{name}");
            assert_eq!(tok.decode(&[id]).expect("decode"), name);
        }
        // Fillers are plain vocabulary entries, not indivisible tokens.
        assert!(matches!(
            tok.require_special("<|toy_300|>"),
            Err(TokenizerError::SpecialTokenNotSingle { id: 300, .. })
        ));
        assert_eq!(
            template.end_token_id(&tok).expect("end"),
            match template {
                Template::ChatMl => 8,
                Template::Phi3 => 5,
            }
        );
    }
    // Each toy only knows its own template's tokens.
    assert!(toy(Template::ChatMl).require_special("<|end|>").is_err());
    assert!(toy(Template::Phi3).require_special("<|im_end|>").is_err());
}

/// Reads an int64 tensor of a fixture's outputs.safetensors as (shape, values).
fn fixture_ids(dir: &str, key: &str) -> (Vec<usize>, Vec<i64>) {
    let bytes = std::fs::read(reference().join(dir).join("outputs.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let view = st.tensor(key).expect(key);
    assert_eq!(view.dtype(), safetensors::Dtype::I64, "{key}");
    let values = view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    (view.shape().to_vec(), values)
}

fn as_i64(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&x| i64::from(x)).collect()
}

#[test]
fn prompt_builder_reproduces_fixture_input_ids() {
    for (dir, template, demo_len, text_len) in [
        ("tiny_tied", Template::ChatMl, 305, 48),
        ("tiny_untied", Template::ChatMl, 305, 48),
        ("internlm2_tiny", Template::ChatMl, 305, 48),
        ("phi3_tiny", Template::Phi3, 292, 35),
    ] {
        let tok = toy(template);
        let image = ImageTokenIds::resolve(&tok).expect("image tokens");
        assert_eq!(image.context, 500, "image_token_index");

        // (d) demo: one 1-tile image before the question.
        let demo = [Turn::question(prompt::with_image_placeholders(
            "Describe the image in detail.",
            1,
        ))];
        let ids = template.encode(&tok, &demo, &[1]).expect("demo ids");
        let (shape, expected) = fixture_ids(dir, "demo.input_ids");
        assert_eq!(shape, vec![1, demo_len], "{dir}");
        assert_eq!(as_i64(&ids), expected, "{dir} demo.input_ids");

        // (b) mm: the same question with one image of 2 tiles (512 context ids).
        let ids = template.encode(&tok, &demo, &[2]).expect("mm ids");
        let (_, expected) = fixture_ids(dir, "mm.input_ids");
        assert_eq!(as_i64(&ids), expected, "{dir} mm.input_ids");

        // (a) text batch: real tokens (mask 1) after the left padding.
        let (shape, all_ids) = fixture_ids(dir, "text.input_ids");
        let (_, mask) = fixture_ids(dir, "text.attention_mask");
        assert_eq!(shape, vec![2, text_len], "{dir}");
        for (row, question) in ["Describe a cat.", "What is the capital of France?"]
            .iter()
            .enumerate()
        {
            let range = row * text_len..(row + 1) * text_len;
            let real: Vec<i64> = all_ids[range.clone()]
                .iter()
                .zip(&mask[range])
                .filter(|(_, m)| **m == 1)
                .map(|(id, _)| *id)
                .collect();
            let ids = template
                .encode(&tok, &[Turn::question(*question)], &[])
                .expect("text ids");
            assert_eq!(as_i64(&ids), real, "{dir} text.input_ids row {row}");
        }
    }
}
