//! Continuous batching against the official greedy answers: requests that join a running batch
//! at different times (one alone, then two prefilled together, one with pictures, prompts of
//! different lengths) each produce exactly the tokens the official code produced for them
//! alone, on every backbone and test device.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use phantom_infer::GenerationConfig;
use phantom_infer::batch::{Engine, FinishReason, Job, JobEvent};
use phantom_model::processor::image::PixelValues;
use phantom_tests::*;

/// A job whose events land in the returned list.
fn job(input: Vec<u32>, pixels: Option<PixelValues>) -> (Job, Arc<Mutex<Vec<JobEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink_events = events.clone();
    let job = Job {
        input,
        pixels,
        config: GenerationConfig {
            max_new_tokens: 8,
            stop_token_ids: Vec::new(),
            ..GenerationConfig::default()
        },
        sink: Box::new(move |event| {
            sink_events.lock().expect("events").push(event);
            ControlFlow::Continue(())
        }),
    };
    (job, events)
}

/// The tokens of a finished job.
fn tokens(events: &Mutex<Vec<JobEvent>>) -> Vec<u32> {
    let events = events.lock().expect("events");
    let finished = events.iter().find_map(|e| match e {
        JobEvent::Finished {
            reason,
            completion_tokens,
            ..
        } => Some((*reason, *completion_tokens)),
        JobEvent::Failed(why) => panic!("the job failed: {why}"),
        JobEvent::Token(_) => None,
    });
    assert_eq!(finished, Some((FinishReason::Length, 8)), "{events:?}");
    events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Token(t) => Some(*t),
            _ => None,
        })
        .collect()
}

/// The real (unpadded) ids of row `row` of a fixture batch.
fn real_ids(input: &phantom_model::ModelInput, row: usize) -> Vec<u32> {
    input.input_ids[row]
        .iter()
        .zip(&input.attention_mask[row])
        .filter(|(_, real)| **real)
        .map(|(id, _)| *id)
        .collect()
}

fn expected(fx: &Fixture, prefix: &str, row: usize) -> Vec<u32> {
    fx.outputs.i64(&format!("{prefix}.gen.sequences")).rows()[row]
        .iter()
        .map(|&t| t as u32)
        .collect()
}

#[test]
fn requests_joining_a_batch_answer_as_the_official_code_does_alone() {
    let pixels = Tensors::open(fixtures().join("vision_inputs.safetensors")).f32("pixel_values");
    let pictures = PixelValues {
        data: pixels.data.clone(),
        num_tiles: pixels.shape[0],
        tile_size: pixels.shape[2],
    };
    for (name, device) in test_devices() {
        for fixture in MODEL_FIXTURES {
            let fx = Fixture::open(fixture);
            let model = fx.model(&device);
            let text = fx.input("text");
            let mm = fx.input("mm");
            let mut engine = Engine::new(&model, 64 << 20);

            // The longer text row starts alone and decodes two steps...
            let (first, first_events) = job(real_ids(&text, 1), None);
            engine.admit(first);
            engine.step();
            engine.step();
            // ...then the picture question (561 tokens) and the short, formerly padded text row
            // arrive together and are prefilled as one padded batch.
            let (picture, picture_events) = job(real_ids(&mm, 0), Some(pictures.clone()));
            let (short, short_events) = job(real_ids(&text, 0), None);
            engine.admit_all(vec![picture, short]);
            assert_eq!(engine.batch_size(), 3, "{name} {fixture}");
            let mut steps = 0;
            while !engine.is_idle() {
                engine.step();
                steps += 1;
                assert!(steps < 32, "{name} {fixture}: the batch never finished");
            }
            let context = format!("{name} {fixture}");
            assert_eq!(
                tokens(&first_events),
                expected(&fx, "text", 1),
                "{context}: text row 1"
            );
            assert_eq!(
                tokens(&short_events),
                expected(&fx, "text", 0),
                "{context}: text row 0"
            );
            assert_eq!(
                tokens(&picture_events),
                expected(&fx, "mm", 0),
                "{context}: picture"
            );
            assert_eq!(engine.stats().vision_runs, 1, "{context}");
        }
    }
}
