//! The generation loop beyond greedy: sampling filters, seeds, stop tokens and beam search.

use std::ops::ControlFlow;

use phantom_infer::generate::{argmax, sample_row};
use phantom_infer::{GenerationConfig, generate};
use phantom_model::ModelInput;
use phantom_tests::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn sampling(
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repetition_penalty: f32,
) -> GenerationConfig {
    GenerationConfig {
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        ..GenerationConfig::default()
    }
}

#[test]
fn argmax_takes_the_first_maximum() {
    assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
}

#[test]
fn top_k_one_and_tiny_top_p_are_greedy() {
    let scores = vec![0.5, 2.0, 1.9, -3.0];
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..50 {
        assert_eq!(
            sample_row(scores.clone(), &[], &sampling(1.0, 1, 1.0, 1.0), &mut rng),
            1
        );
        assert_eq!(
            sample_row(scores.clone(), &[], &sampling(1.0, 0, 0.01, 1.0), &mut rng),
            1
        );
    }
}

#[test]
fn top_k_limits_the_candidates() {
    let scores = vec![1.0, 1.0, 1.0, 0.99, -50.0];
    let mut rng = StdRng::seed_from_u64(1);
    let mut seen = [0usize; 5];
    for _ in 0..2000 {
        seen[sample_row(scores.clone(), &[], &sampling(1.0, 3, 1.0, 1.0), &mut rng) as usize] += 1;
    }
    assert_eq!(
        seen[3] + seen[4],
        0,
        "only the 3 best may be drawn: {seen:?}"
    );
    // Three equal scores: each near a third.
    for &n in &seen[..3] {
        assert!((550..=780).contains(&n), "{seen:?}");
    }
}

#[test]
fn sampling_follows_the_softmax() {
    // p = softmax([ln 1, ln 3]) = [0.25, 0.75].
    let scores = vec![0.0, 3f32.ln()];
    let mut rng = StdRng::seed_from_u64(3);
    let ones = (0..4000)
        .filter(|_| sample_row(scores.clone(), &[], &sampling(1.0, 0, 1.0, 1.0), &mut rng) == 1)
        .count();
    assert!((2900..=3100).contains(&ones), "{ones} of 4000");
    // Temperature 0.5 squares the odds: [1, 9] / 10.
    let ones = (0..4000)
        .filter(|_| sample_row(scores.clone(), &[], &sampling(0.5, 0, 1.0, 1.0), &mut rng) == 1)
        .count();
    assert!((3520..=3680).contains(&ones), "{ones} of 4000");
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_scores() {
    // Token 0 seen: 2.0 / 4 = 0.5 < 1.0, so greedy moves to token 1.
    let mut rng = StdRng::seed_from_u64(0);
    assert_eq!(
        sample_row(vec![2.0, 1.0], &[0], &sampling(0.0, 0, 1.0, 4.0), &mut rng),
        1
    );
    // Token 1 seen with a negative score: −0.5 · 4 = −2 < −1, so token 0 wins.
    assert_eq!(
        sample_row(
            vec![-1.0, -0.5],
            &[1],
            &sampling(0.0, 0, 1.0, 4.0),
            &mut rng
        ),
        0
    );
}

#[test]
fn invalid_settings_are_errors() {
    assert!(sampling(-1.0, 0, 1.0, 1.0).validate().is_err());
    assert!(sampling(1.0, 0, 0.0, 1.0).validate().is_err());
    assert!(sampling(1.0, 0, 1.0, 0.0).validate().is_err());
    let beams = GenerationConfig {
        num_beams: 0,
        ..GenerationConfig::default()
    };
    assert!(beams.validate().is_err());
}

fn fixture_generate(config: &GenerationConfig) -> Vec<Vec<u32>> {
    let device = test_devices().remove(0).1;
    let fx = Fixture::open("tiny_untied");
    let model = fx.model(&device);
    let input = fx.input("text");
    generate(&model, &input, None, config, |_| ControlFlow::Continue(()))
        .unwrap()
        .sequences
}

#[test]
fn seeded_sampling_is_reproducible_and_stops_at_stop_tokens() {
    let config = GenerationConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        seed: 42,
        ..GenerationConfig::default()
    };
    let a = fixture_generate(&config);
    assert_eq!(a, fixture_generate(&config));
    assert_eq!(a[0].len(), 12);
    // Make the 3rd token of row 0 a stop token: that row ends there, the other goes on.
    let stop = a[0][2];
    let stopped = fixture_generate(&GenerationConfig {
        stop_token_ids: vec![stop],
        ..config.clone()
    });
    let first_stop = stopped[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(stopped[0].len(), first_stop + 1);
}

#[test]
fn one_beam_is_greedy_and_three_beams_score_at_least_as_well() {
    let device = test_devices().remove(0).1;
    let fx = Fixture::open("tiny_untied");
    let model = fx.model(&device);
    let input = fx.input("text");
    let greedy = GenerationConfig::greedy(6, vec![]);
    let g = generate(&model, &input, None, &greedy, |_| ControlFlow::Continue(()))
        .unwrap()
        .sequences;
    let beams = GenerationConfig {
        num_beams: 3,
        ..greedy.clone()
    };
    let b = generate(&model, &input, None, &beams, |_| ControlFlow::Continue(()))
        .unwrap()
        .sequences;
    // Score a continuation by its summed log-probability under a full forward.
    let score = |row: usize, tokens: &[u32]| -> f64 {
        let mut rows = input.clone();
        rows.input_ids = vec![rows.input_ids[row].clone()];
        rows.attention_mask = vec![rows.attention_mask[row].clone()];
        let t0 = rows.input_ids[0].len();
        rows.input_ids[0].extend(tokens);
        rows.attention_mask[0].extend(vec![true; tokens.len()]);
        let logits = model.forward(&ModelInput { ..rows }, None).unwrap();
        let v = logits.dims()[2];
        let lp = values(burn::tensor::activation::log_softmax(logits, 2));
        tokens
            .iter()
            .enumerate()
            .map(|(i, &tok)| lp[(t0 - 1 + i) * v + tok as usize] as f64)
            .sum()
    };
    for row in 0..2 {
        assert_eq!(b[row].len(), g[row].len());
        assert!(
            score(row, &b[row]) >= score(row, &g[row]) - 1e-4,
            "row {row}: beams {:?} vs greedy {:?}",
            b[row],
            g[row]
        );
    }
}

#[test]
fn top_p_reaches_into_a_long_tail() {
    // A flat tail of 2,000 tokens after one favourite: p = 0.9 needs most of the tail, far more
    // candidates than the first partial selection holds, and none outside the top tokens.
    let mut scores = vec![0.0f32; 2001];
    scores[0] = 5.0;
    let mut rng = StdRng::seed_from_u64(11);
    let config = sampling(1.0, 0, 0.9, 1.0);
    let draws: Vec<u32> = (0..3000)
        .map(|_| sample_row(scores.clone(), &[], &config, &mut rng))
        .collect();
    let favourite = draws.iter().filter(|&&t| t == 0).count() as f64 / 3000.0;
    // Softmax mass of the favourite: e^5 / (e^5 + 2000) ≈ 0.069; within the nucleus it stays
    // about that share.
    assert!(
        (0.04..0.10).contains(&favourite),
        "favourite drawn {favourite}"
    );
    let distinct: std::collections::HashSet<u32> = draws.iter().copied().collect();
    assert!(
        distinct.len() > 1000,
        "only {} distinct tokens",
        distinct.len()
    );
}
