//! Parity with the official implementation: the reference fixtures were produced by running the
//! authors' PyTorch code on tiny random models (see `fixtures/phantom-ref/README.md`). Every
//! check runs on each compiled backend; f32, atol 1e-4 on real positions, greedy ids exact.

use std::ops::ControlFlow;

use burn::prelude::*;
use phantom_infer::{GenerationConfig, Session, generate};
use phantom_model::decoder::DecoderTrace;
use phantom_tests::*;

const ATOL: f32 = 1e-4;
/// Every model fixture: Qwen2 (0.5B, tied and untied head), InternLM2 (1.8B/7B), Phi-3 (3.8B).
const FIXTURES: [&str; 4] = ["tiny_tied", "tiny_untied", "internlm2_tiny", "phi3_tiny"];

#[test]
fn vision_tokens_match() {
    for (dev_name, device) in test_devices() {
        for name in FIXTURES {
            let fx = Fixture::open(name);
            let model = fx.model(&device);
            let pixels = vision_pixels(&device);
            if fx.outputs.has("vision.vit_last_hidden_state") {
                let vit = model.vision_model.forward(pixels.clone());
                let want = fx.outputs.f32("vision.vit_last_hidden_state");
                assert_close(
                    &format!("{dev_name}/{name} vit"),
                    &values(vit),
                    &want.data,
                    None,
                    ATOL,
                );
            }
            let tokens = model.encode_images(pixels).unwrap();
            let want = fx.outputs.f32("vision.vision_tokens");
            assert_eq!(tokens.dims().to_vec(), want.shape);
            assert_close(
                &format!("{dev_name}/{name} vision tokens"),
                &values(tokens),
                &want.data,
                None,
                ATOL,
            );
        }
    }
}

#[test]
fn text_logits_match_at_generate_positions() {
    for (dev_name, device) in test_devices() {
        for name in FIXTURES {
            let fx = Fixture::open(name);
            let model = fx.model(&device);
            let input = fx.input("text");
            let logits = model.forward(&input, None).unwrap();
            let want = fx.outputs.f32("text.logits_generate_pos");
            assert_eq!(logits.dims().to_vec(), want.shape);
            let keep = expand_mask(&input.attention_mask, want.shape[2]);
            assert_close(
                &format!("{dev_name}/{name} text logits"),
                &values(logits),
                &want.data,
                Some(&keep),
                ATOL,
            );
        }
    }
}

#[test]
fn multimodal_logits_match() {
    for (dev_name, device) in test_devices() {
        for name in FIXTURES {
            let fx = Fixture::open(name);
            let model = fx.model(&device);
            let input = fx.input("mm");
            let vision = model.encode_images(vision_pixels(&device)).unwrap();
            let embeds = model.embed(&input, Some(vision)).unwrap();
            let mut cache = model.new_cache(1);
            let hidden = model
                .forward_embeds(embeds, &input.attention_mask, &mut cache, None)
                .unwrap();
            let want = fx.outputs.f32("mm.final_hidden");
            assert_close(
                &format!("{dev_name}/{name} mm hidden"),
                &values(hidden.clone()),
                &want.data,
                None,
                ATOL,
            );

            let index = fx.outputs.i64("mm.logits_selected_index");
            let idx = Tensor::<1, Int>::from_data(
                TensorData::new(index.data.clone(), [index.data.len()]),
                &device,
            );
            let logits = model.language_model.logits(hidden.select(1, idx));
            let want = fx.outputs.f32("mm.logits_selected");
            assert_eq!(logits.dims().to_vec(), want.shape);
            assert_close(
                &format!("{dev_name}/{name} mm logits"),
                &values(logits),
                &want.data,
                None,
                ATOL,
            );
        }
    }
}

/// Greedy decoding through the KV cache: every step's logits and every id.
fn check_greedy(
    fx: &Fixture,
    prefix: &str,
    vision: Option<Tensor<3>>,
    device: &Device,
    dev_name: &str,
) {
    let model = fx.model(device);
    let input = fx.input(prefix);
    let want_ids = fx.outputs.i64(&format!("{prefix}.gen.sequences"));
    let want_logits = fx.outputs.f32(&format!("{prefix}.gen.step_logits"));
    let (steps, b, v) = (
        want_logits.shape[0],
        want_logits.shape[1],
        want_logits.shape[2],
    );
    let (mut session, mut logits) = Session::prefill_vision_tokens(&model, &input, vision).unwrap();
    let mut ids = vec![Vec::new(); b];
    for step in 0..steps {
        let got = values(logits.clone());
        let want = &want_logits.data[step * b * v..(step + 1) * b * v];
        assert_close(
            &format!("{dev_name}/{} {prefix} step {step} logits", fx.name),
            &got,
            want,
            None,
            ATOL,
        );
        let next: Vec<u32> = got.chunks(v).map(phantom_infer::generate::argmax).collect();
        for (row, &t) in next.iter().enumerate() {
            ids[row].push(t as i64);
        }
        if step + 1 < steps {
            logits = session.step(&next).unwrap();
        }
    }
    assert_eq!(
        ids,
        want_ids.rows(),
        "{dev_name}/{} {prefix} greedy ids",
        fx.name
    );
}

#[test]
fn greedy_ids_match_through_the_kv_cache() {
    for (dev_name, device) in test_devices() {
        for name in FIXTURES {
            let fx = Fixture::open(name);
            check_greedy(&fx, "text", None, &device, &dev_name);
            let model = fx.model(&device);
            let vision = model.encode_images(vision_pixels(&device)).unwrap();
            check_greedy(&fx, "mm", Some(vision), &device, &dev_name);
            let demo = fx
                .outputs
                .f32("demo.vision_tokens_bf16_input")
                .to_device::<3>(&device);
            check_greedy(&fx, "demo", Some(demo), &device, &dev_name);
        }
    }
}

#[test]
fn generate_loop_reproduces_the_reference_ids() {
    let (_, device) = test_devices().remove(0);
    for name in FIXTURES {
        let fx = Fixture::open(name);
        let model = fx.model(&device);
        let input = fx.input("text");
        let config = GenerationConfig::greedy(8, model.config.eos_token_ids.clone());
        let mut streamed = vec![Vec::new(); 2];
        let out = generate(&model, &input, None, &config, |ev| {
            streamed[ev.row].push(ev.token as i64);
            ControlFlow::Continue(())
        })
        .unwrap();
        let want = fx.outputs.i64("text.gen.sequences").rows();
        let got: Vec<Vec<i64>> = out
            .sequences
            .iter()
            .map(|r| r.iter().map(|&t| t as i64).collect())
            .collect();
        assert_eq!(got, want, "{name}");
        assert_eq!(streamed, want, "{name}: streamed tokens");
    }
}

#[test]
fn debug_internals_match() {
    for (dev_name, device) in test_devices() {
        for name in FIXTURES {
            let fx = Fixture::open(name);
            let model = fx.model(&device);
            let input = fx.input("text");
            let embeds = model.embed(&input, None).unwrap();
            let want = fx.outputs.f32("text.debug.hidden_states.0");
            assert_close(
                "embeddings",
                &values(embeds.clone()),
                &want.data,
                None,
                ATOL,
            );
            let mut cache = model.new_cache(2);
            let mut trace = DecoderTrace::new();
            let hidden = model
                .forward_embeds(embeds, &input.attention_mask, &mut cache, Some(&mut trace))
                .unwrap();
            let want = fx.outputs.f32("text.debug.hidden_states.2");
            let keep = expand_mask(&input.attention_mask, want.shape[2]);
            assert_close(
                "final hidden",
                &values(hidden),
                &want.data,
                Some(&keep),
                ATOL,
            );

            let (h, d) = (
                model.config.llm.num_attention_heads,
                model.config.llm.head_dim(),
            );
            let hidden_size = model.config.llm.hidden_size;
            let keep = expand_mask(&input.attention_mask, hidden_size);
            for (layer, tr) in trace.iter().enumerate() {
                let key = |k: &str| format!("text.debug.layer{layer}.{k}");
                let ctx = |k: &str| format!("{dev_name}/{name} layer {layer} {k}");
                let keep_gate = expand_mask(&input.attention_mask, h);
                let pv = tr.phantom.as_ref().unwrap();
                // Qwen2 and Phi-3 store per-query-head tensors (taken after repeat_kv),
                // InternLM2 per-KV-head ones; the port works on KV heads, so expand to compare
                // where the reference has more heads.
                let like = |t: Tensor<4>, reference: &str| {
                    let want = fx.outputs.f32(reference);
                    let [b, s, hkv, d] = t.dims();
                    let g = want.shape[2] / hkv;
                    let t = t
                        .unsqueeze_dim::<5>(3)
                        .repeat_dim(3, g)
                        .reshape([b, s, hkv * g, d]);
                    (values(t), want)
                };
                let keep_of = |heads: usize| expand_mask(&input.attention_mask, heads * d);
                for (what, got) in [
                    ("phantom_q", &pv.q),
                    ("phantom_k", &pv.k),
                    ("phantom_v", &pv.v),
                ] {
                    let (got, want) = like(got.clone(), &key(what));
                    assert_close(&ctx(what), &got, &want.data, None, ATOL);
                }
                // The XAttention outputs are η·Y ≈ 1e-4 in size: compare them tightly.
                for (what, got, tol) in [
                    ("xattn_query_phantom.out", tr.xattn_query.clone(), 1e-6),
                    ("xattn_key_phantom.out", tr.xattn_key.clone(), 1e-6),
                    ("xattn_value_phantom.out", tr.xattn_value.clone(), ATOL),
                ] {
                    let (got, want) = like(got.unwrap(), &key(what));
                    assert_close(
                        &ctx(what),
                        &got,
                        &want.data,
                        Some(&keep_of(want.shape[2])),
                        tol,
                    );
                }
                assert_close(
                    &ctx("gate 1"),
                    &values(tr.gate_1.clone().unwrap()),
                    &fx.outputs.f32(&key("gating_phantom_1.out")).data,
                    Some(&keep_gate),
                    ATOL,
                );
                assert_close(
                    &ctx("gate 2"),
                    &values(tr.gate_2.clone().unwrap()),
                    &fx.outputs.f32(&key("gating_phantom_2.out")).data,
                    Some(&keep_gate),
                    ATOL,
                );
                assert_close(
                    &ctx("attn out"),
                    &values(tr.out.clone().unwrap()),
                    &fx.outputs.f32(&key("self_attn.out")).data,
                    Some(&keep),
                    ATOL,
                );
            }
        }
    }
}
