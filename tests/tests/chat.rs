//! End to end as a user runs it: a picture and a question through the image processor, the
//! chat template, the tokenizer and the model, reproducing the official demo run on the tiny
//! fixture model (`demo.*` in the fixtures: astronaut.png, "Describe the image in detail.").

use std::ops::ControlFlow;
use std::path::Path;

use phantom_infer::{Chat, GenerationConfig};
use phantom_model::processor::image::ImageProcessor;
use phantom_model::processor::prompt::Turn;
use phantom_model::processor::tokenizer::Tokenizer;
use phantom_model::weights::{LoadOptions, load_model};
use phantom_tests::*;

/// The fixture model with the toy tokenizer its reference run used (bytes ↦ id + 16).
fn toy_chat(fixture: &Fixture) -> Chat {
    let device = test_devices().remove(0).1;
    let model = fixture.model(&device);
    let toy = if fixture.name.starts_with("phi3") {
        "toy_tokenizer_phi3"
    } else {
        "toy_tokenizer"
    };
    let tokenizer =
        Tokenizer::from_file(fixtures().join(format!("../{toy}/tokenizer.json"))).unwrap();
    Chat::new(model, tokenizer).unwrap()
}

#[test]
fn demo_prompt_and_greedy_answer_match_the_official_run() {
    for name in ["tiny_tied", "tiny_untied", "internlm2_tiny", "phi3_tiny"] {
        let fx = Fixture::open(name);
        let chat = toy_chat(&fx);
        let image = ImageProcessor::default()
            .open(fixtures().join("images/astronaut.png"))
            .unwrap();
        let turns = [Turn::question("Describe the image in detail.")];
        let prepared = chat.prepare(&turns, std::slice::from_ref(&image)).unwrap();
        let want_ids: Vec<u32> = fx
            .outputs
            .i64("demo.input_ids")
            .data
            .iter()
            .map(|&i| i as u32)
            .collect();
        assert_eq!(prepared.input.input_ids[0], want_ids, "{name}: prompt ids");
        assert_eq!(prepared.pixels.as_ref().unwrap().num_tiles, 1);

        let config = GenerationConfig::greedy(8, vec![]);
        let mut streamed = String::new();
        let (text, generation) = chat
            .answer(&turns, &[image], &config, |piece| {
                streamed.push_str(piece);
                ControlFlow::Continue(())
            })
            .unwrap();
        let want: Vec<u32> = fx
            .outputs
            .i64("demo.gen.sequences")
            .data
            .iter()
            .map(|&i| i as u32)
            .collect();
        assert_eq!(generation.sequences[0], want, "{name}: greedy ids");
        assert_eq!(text, streamed, "{name}: streamed text is the answer");
        assert_eq!(text, chat.tokenizer().decode_skip_special(&want).unwrap());
        assert_eq!(generation.timings.tiles, 1);
    }
}

#[test]
fn multi_turn_prompts_render_previous_answers() {
    let fx = Fixture::open("tiny_tied");
    let chat = toy_chat(&fx);
    let turns = [Turn::answered("Hi", "Hello"), Turn::question("Bye")];
    let prepared = chat.prepare(&turns, &[]).unwrap();
    let text = chat
        .tokenizer()
        .decode(&prepared.input.input_ids[0])
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello<|im_end|><|im_start|>user\nBye<|im_end|><|im_start|>assistant\n"
    );
}

/// The demo model `phantom-train demo` trained (the browser test's model, see
/// `tests/fixtures/demo_model/README.md`) answers a held-out question as it did when trained,
/// on every test backend.
#[test]
fn trained_demo_model_answers_its_held_out_question() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo_model");
    let image = ImageProcessor::default()
        .open(dir.join("square.png"))
        .unwrap();
    let turns = [Turn::question("What colour is the square?")];
    for (name, device) in test_devices() {
        let model = load_model(&dir, &device, LoadOptions::default()).unwrap();
        let chat = Chat::from_dir(model, &dir).unwrap();
        let config = GenerationConfig {
            max_new_tokens: 16,
            ..GenerationConfig::default()
        };
        let (text, generation) = chat
            .answer(&turns, std::slice::from_ref(&image), &config, |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(text, "The square is red.", "{name}");
        assert_eq!(
            generation.sequences[0],
            [273, 316, 266, 332, 19, 2],
            "{name}"
        );
    }
}

/// A tokenizer whose `<IMG_CONTEXT>` is not the config's `image_token_index` belongs to another
/// model; asking about a picture says so instead of answering blind.
#[test]
fn a_tokenizer_of_another_model_is_refused_for_pictures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo_model");
    let device = test_devices().remove(0).1;
    let model = load_model(&dir, &device, LoadOptions::default()).unwrap();
    let toy = Tokenizer::from_file(fixtures().join("../toy_tokenizer/tokenizer.json")).unwrap();
    let chat = Chat::new(model, toy).unwrap();
    let image = ImageProcessor::default()
        .open(dir.join("square.png"))
        .unwrap();
    let err = chat
        .prepare(&[Turn::question("What colour?")], &[image])
        .err()
        .expect("a mismatched tokenizer is an error");
    let text = err.to_string();
    assert!(text.contains("does not belong to this model"), "{text}");
    assert!(text.contains("image_token_index is 5"), "{text}");
    // Text-only questions need no image token and still work.
    chat.prepare(&[Turn::question("What colour?")], &[])
        .unwrap();
}

#[test]
fn a_conversation_feeds_only_each_new_turn() {
    for name in ["tiny_tied", "phi3_tiny"] {
        let fx = Fixture::open(name);
        let chat = toy_chat(&fx);
        let image = ImageProcessor::default()
            .open(fixtures().join("images/astronaut.png"))
            .unwrap();
        let config = GenerationConfig::greedy(6, vec![]);
        let mut conversation = chat.conversation(vec![image.clone()]);
        let questions = [
            "Describe the image in detail.",
            "And the colours?",
            "What is in the corner of the picture?",
        ];
        let mut prefilled = Vec::new();
        for (turn, question) in questions.iter().enumerate() {
            let (answer, generation) = conversation
                .ask(*question, &config, |_| ControlFlow::Continue(()))
                .unwrap();
            prefilled.push(generation.timings.prompt_tokens);
            // The same answer as a fresh one-shot run over the whole conversation.
            let turns = conversation.turns().to_vec();
            let (fresh, fresh_generation) = chat
                .answer(
                    &[&turns[..turn], &[Turn::question(*question)]].concat(),
                    std::slice::from_ref(&image),
                    &config,
                    |_| ControlFlow::Continue(()),
                )
                .unwrap();
            assert_eq!(answer, fresh, "{name} turn {turn}");
            assert_eq!(
                generation.sequences, fresh_generation.sequences,
                "{name} turn {turn}"
            );
            if turn > 0 {
                assert_eq!(
                    generation.timings.tiles, 0,
                    "{name}: the picture is encoded once"
                );
            }
        }
        // The first turn reads the picture (256 tokens per tile); later ones read only their
        // question plus the end of the previous answer: a few dozen tokens each, however long
        // the conversation has grown.
        assert!(prefilled[0] > 256, "{name}: {prefilled:?}");
        for (turn, question) in questions.iter().enumerate().skip(1) {
            let own = question.len() + 40;
            assert!(
                prefilled[turn] <= own,
                "{name} turn {turn} prefilled {} tokens (its own are about {})",
                prefilled[turn],
                question.len()
            );
        }
        assert!(conversation.cached_tokens() > prefilled.iter().sum::<usize>() - 10);
    }
}
