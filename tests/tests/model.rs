//! Properties of the model that the fixtures do not pin directly: η = 0 is plain attention,
//! cached decoding equals a full recompute, batches agree with single rows, weights round-trip
//! through the official layout, and bad checkpoints or inputs fail with clear errors.

use burn::prelude::*;
use phantom_infer::Session;
use phantom_model::{ModelInput, PhantomError, PhantomModel};
use phantom_tests::*;

fn device() -> Device {
    test_devices().remove(0).1
}

/// Scales every phantom weight, which must not matter when η = 0.
fn scramble_phantom(model: PhantomModel) -> PhantomModel {
    let mut model = model;
    for layer in &mut model.language_model.model.layers {
        let p = &mut layer.self_attn.phantom;
        for x in [
            &mut p.xattn_query_phantom,
            &mut p.xattn_key_phantom,
            &mut p.xattn_value_phantom,
        ] {
            for lin in [
                &mut x.linear_q,
                &mut x.linear_k,
                &mut x.linear_v,
                &mut x.linear_o,
            ] {
                lin.weight = lin.weight.clone().map(|w| w.mul_scalar(3.0));
            }
        }
        for gate in [&mut p.gating_phantom_1, &mut p.gating_phantom_2] {
            gate.weight = gate.weight.clone().map(|w| w.mul_scalar(-2.0));
        }
    }
    model
}

#[test]
fn eta_zero_is_plain_attention() {
    let device = device();
    let fx = Fixture::open("tiny_tied");
    let input = fx.input("text");
    let mut plain = fx.model(&device);
    plain.set_phantom_eta(0.0);
    let a = values(plain.forward(&input, None).unwrap());
    let mut scrambled = scramble_phantom(fx.model(&device));
    scrambled.set_phantom_eta(0.0);
    let b = values(scrambled.forward(&input, None).unwrap());
    let keep = expand_mask(&input.attention_mask, 512);
    // Bit-for-bit up to float reassociation: the phantom branch contributes exactly nothing.
    assert!(max_abs_diff(&a, &b, Some(&keep)) < 1e-6);
    // …and at the released η the branch does matter (README: about 1.9e-3 on this fixture).
    let with = values(fx.model(&device).forward(&input, None).unwrap());
    let change = max_abs_diff(&a, &with, Some(&keep));
    assert!(
        change > 5e-4 && change < 5e-3,
        "phantom effect at η=1e-4 was {change}"
    );
}

#[test]
fn cached_decoding_equals_full_recompute() {
    let device = device();
    let fx = Fixture::open("tiny_untied");
    let model = fx.model(&device);
    let input = fx.input("text");
    let (mut session, mut logits) = Session::prefill(&model, &input, None).unwrap();
    let mut rows = input.clone();
    for _ in 0..5 {
        let v = logits.dims()[1];
        let next: Vec<u32> = values(logits.clone())
            .chunks(v)
            .map(phantom_infer::generate::argmax)
            .collect();
        for (row, &t) in next.iter().enumerate() {
            rows.input_ids[row].push(t);
            rows.attention_mask[row].push(true);
        }
        logits = session.step(&next).unwrap();
        let full = model.forward(&rows, None).unwrap();
        let [b, t, v] = full.dims();
        let last = full.narrow(1, t - 1, 1).reshape([b, v]);
        let diff = max_abs_diff(&values(logits.clone()), &values(last), None);
        assert!(diff < 1e-4, "cached step differs from recompute by {diff}");
    }
}

#[test]
fn batched_rows_equal_single_rows() {
    let device = device();
    let fx = Fixture::open("tiny_tied");
    let model = fx.model(&device);
    let input = fx.input("text");
    let batch = values(model.forward(&input, None).unwrap());
    let (b, t) = input.dims();
    let v = 512;
    for row in 0..b {
        let real: Vec<u32> = input.input_ids[row]
            .iter()
            .zip(&input.attention_mask[row])
            .filter(|(_, m)| **m)
            .map(|(i, _)| *i)
            .collect();
        let n = real.len();
        let single = values(
            model
                .forward(&ModelInput::unpadded(vec![real]), None)
                .unwrap(),
        );
        let batch_row = &batch[(row * t + (t - n)) * v..(row + 1) * t * v];
        assert!(max_abs_diff(&single, batch_row, None) < 1e-4, "row {row}");
    }
}

#[test]
fn weights_round_trip_through_the_official_layout() {
    let device = device();
    for name in ["tiny_tied", "tiny_untied"] {
        let fx = Fixture::open(name);
        let model = fx.model(&device);
        let dir =
            std::env::temp_dir().join(format!("phantom-roundtrip-{name}-{}", std::process::id()));
        phantom_model::save_model(&model, &dir).unwrap();
        // Same keys and shapes as the official file (the tied head may be left out).
        let ours = safetensors_keys(&dir.join("model.safetensors"));
        let mut official = safetensors_keys(&fx.dir().join("model.safetensors"));
        if model.config.llm.tie_word_embeddings {
            official.retain(|(k, _)| k != "language_model.lm_head.weight");
        }
        assert_eq!(ours, official, "{name}: saved keys");
        // The weights are as readable as any other new file (the config), not private.
        let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions();
        assert_eq!(mode("model.safetensors"), mode("config.json"), "{name}");
        let reloaded = phantom_model::load_model(&dir, &device, Default::default()).unwrap();
        let input = fx.input("text");
        let a = values(model.forward(&input, None).unwrap());
        let b = values(reloaded.forward(&input, None).unwrap());
        assert_eq!(a, b, "{name}: reloaded model computes the same logits");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let device = device();
    for name in ["internlm2_tiny", "phi3_tiny"] {
        let fx = Fixture::open(name);
        let model = fx.model(&device);
        let dir =
            std::env::temp_dir().join(format!("phantom-shards-{name}-{}", std::process::id()));
        phantom_model::save_model(&model, &dir).unwrap();
        let files = phantom_model::split_into_shards(&dir, 3).unwrap();
        assert_eq!(files.len(), 3, "{name}: {files:?}");
        for file in &files {
            let mode = std::fs::metadata(file).unwrap().permissions();
            let config = std::fs::metadata(dir.join("config.json"))
                .unwrap()
                .permissions();
            assert_eq!(
                mode,
                config,
                "{name}: {} is as readable as the config",
                file.display()
            );
        }
        assert!(!dir.join("model.safetensors").exists());
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let mut keys: Vec<String> = files
            .iter()
            .flat_map(|f| safetensors_keys(f).into_iter().map(|(k, _)| k))
            .collect();
        keys.sort();
        let mut indexed: Vec<String> = map.keys().cloned().collect();
        indexed.sort();
        assert_eq!(keys, indexed, "{name}: the index lists every tensor once");
        let reloaded = phantom_model::load_model(&dir, &device, Default::default()).unwrap();
        let input = fx.input("text");
        let a = values(model.forward(&input, None).unwrap());
        let b = values(reloaded.forward(&input, None).unwrap());
        assert_eq!(a, b, "{name}: the sharded model computes the same logits");
        std::fs::remove_dir_all(&dir).ok();
    }
}

fn safetensors_keys(path: &std::path::Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect();
    keys.sort();
    keys
}

/// A copy of a fixture folder whose safetensors is rewritten by `edit`.
fn edited_checkpoint(
    name: &str,
    tag: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> std::path::PathBuf {
    let src = fixtures().join(name);
    let dir = std::env::temp_dir().join(format!("phantom-bad-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, v.shape().to_vec(), data)
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(k, s, d)| (k, d.iter().flat_map(|x| x.to_le_bytes()).collect(), s))
        .collect();
    let tv: Vec<(String, safetensors::tensor::TensorView)> = views
        .iter()
        .map(|(k, b, s)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(tv, None).unwrap(),
    )
    .unwrap();
    dir
}

fn load_error(dir: &std::path::Path) -> String {
    match phantom_model::load_model(dir, &device(), Default::default()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_checkpoints_name_every_offending_tensor() {
    let missing = edited_checkpoint("tiny_untied", "missing", |t| {
        t.retain(|(k, _, _)| {
            k != "language_model.model.layers.1.self_attn.gating_phantom_2.bias"
                && k != "vision_proj.3.weight"
        });
    });
    let err = load_error(&missing);
    assert!(
        err.contains("missing") && err.contains("gating_phantom_2") && err.contains("vision_proj"),
        "{err}"
    );

    let unexpected = edited_checkpoint("tiny_untied", "unexpected", |t| {
        t.push((
            "language_model.model.layers.0.self_attn.extra.weight".into(),
            vec![2],
            vec![0.0, 1.0],
        ));
    });
    let err = load_error(&unexpected);
    assert!(
        err.contains("unexpected") && err.contains("self_attn.extra.weight"),
        "{err}"
    );

    let misshaped = edited_checkpoint("tiny_untied", "shape", |t| {
        for (k, s, d) in t.iter_mut() {
            if k == "language_model.model.layers.0.mlp.up_proj.weight" {
                *s = vec![64, 128];
                let _ = d;
            }
        }
    });
    let err = load_error(&misshaped);
    assert!(err.contains("up_proj") && err.contains("128"), "{err}");

    // The tied head may be present or absent; the untied head must be present.
    let untied_without_head = edited_checkpoint("tiny_untied", "nohead", |t| {
        t.retain(|(k, _, _)| k != "language_model.lm_head.weight");
    });
    assert!(load_error(&untied_without_head).contains("lm_head"));
    let tied_without_head = edited_checkpoint("tiny_tied", "tiednohead", |t| {
        t.retain(|(k, _, _)| k != "language_model.lm_head.weight");
    });
    phantom_model::load_model(&tied_without_head, &device(), Default::default()).unwrap();
    for dir in [
        missing,
        unexpected,
        misshaped,
        untied_without_head,
        tied_without_head,
    ] {
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn bad_configs_are_clear_errors() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_tied/config.json")).unwrap(),
    )
    .unwrap();
    let check = |edit: &dyn Fn(&mut serde_json::Value), needle: &str| {
        let mut cfg = base.clone();
        edit(&mut cfg);
        let err = phantom_model::PhantomConfig::from_json(&cfg.to_string()).unwrap_err();
        assert!(matches!(err, PhantomError::Config(_)));
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    };
    check(
        &|c| c["llm_config"]["architectures"] = serde_json::json!(["LlamaForCausalLM"]),
        "LlamaForCausalLM",
    );
    check(
        &|c| c["downsample_ratio"] = serde_json::json!(0.25),
        "downsample_ratio",
    );
    check(
        &|c| c["vision_config"]["qk_normalization"] = serde_json::json!(true),
        "qk_normalization",
    );
    check(
        &|c| c["llm_config"]["num_key_value_heads"] = serde_json::json!(3),
        "heads",
    );
    check(
        &|c| c["llm_config"]["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0}),
        "linear",
    );
    check(
        &|c| c["image_token_index"] = serde_json::json!(100000),
        "image_token_index",
    );
    check(
        &|c| {
            c.as_object_mut().unwrap().remove("eos_token_id");
        },
        "eos_token_id",
    );
    assert!(
        phantom_model::PhantomConfig::from_json("{not json")
            .unwrap_err()
            .to_string()
            .contains("JSON")
    );
    // η is read from the top level, default 1e-4.
    let mut cfg = base.clone();
    cfg["phantom_eta"] = serde_json::json!(0.5);
    assert_eq!(
        phantom_model::PhantomConfig::from_json(&cfg.to_string())
            .unwrap()
            .phantom_eta,
        0.5
    );
    assert_eq!(
        phantom_model::PhantomConfig::from_json(&base.to_string())
            .unwrap()
            .phantom_eta,
        1e-4
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let device = device();
    let model = Fixture::open("tiny_tied").model(&device);
    let err = |input: ModelInput, pixels: Option<Tensor<4>>| {
        model.forward(&input, pixels).unwrap_err().to_string()
    };
    // Image placeholder count must match the tiles.
    let mut ids = vec![7u32; 10];
    ids.extend(vec![500; 256]);
    let e = err(ModelInput::unpadded(vec![ids.clone()]), None);
    assert!(
        e.contains("256 image tokens") && e.contains("0 tile"),
        "{e}"
    );
    let e = err(
        ModelInput::unpadded(vec![ids]),
        Some(vision_pixels(&device)),
    );
    assert!(e.contains("2 tile"), "{e}");
    // Ids outside the vocabulary, right padding, empty rows.
    assert!(err(ModelInput::unpadded(vec![vec![1, 2, 9999]]), None).contains("9999"));
    let right = ModelInput {
        input_ids: vec![vec![5, 6, 0]],
        attention_mask: vec![vec![true, true, false]],
    };
    assert!(err(right, None).contains("left"));
    let empty = ModelInput {
        input_ids: vec![vec![0, 0]],
        attention_mask: vec![vec![false, false]],
    };
    assert!(err(empty, None).contains("no real token"));
    // Wrong tile size.
    let small = Tensor::<4>::zeros([1, 3, 224, 224], &device);
    assert!(
        model
            .encode_images(small)
            .unwrap_err()
            .to_string()
            .contains("448")
    );
    // Over-long prompts fail before any compute.
    let long = ModelInput::unpadded(vec![vec![5; 5000]]);
    assert!(err(long, None).contains("context"));
}

#[test]
fn device_names_are_checked() {
    let e = phantom_model::device::device(Some("tpu"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown device `tpu`"), "{e}");
    if !cfg!(feature = "tch") {
        let e = phantom_model::device::device(Some("tch"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`tch` feature"), "{e}");
    }
    if !cfg!(feature = "cuda") {
        let e = phantom_model::device::device(Some("cuda:1"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "device: `cuda:1` needs the `cuda` feature, which this build lacks (rebuild with \
             `--features cuda`)"
        );
    }
    let e = phantom_model::device::device(Some("cuda:x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`cuda:x`: expected an index like `:0`"), "{e}");
}

#[test]
fn a_growing_cache_still_equals_full_recompute() {
    // Past the headroom of a fresh cache: its buffers double mid-generation.
    let device = device();
    let fx = Fixture::open("tiny_tied");
    let model = fx.model(&device);
    let input = fx.input("text");
    let (mut session, _) = Session::prefill(&model, &input, None).unwrap();
    let mut rows = input.clone();
    let mut logits = None;
    for step in 0..300u32 {
        let next = vec![20 + step % 400, 30 + (step * 7) % 400];
        for (row, &t) in next.iter().enumerate() {
            rows.input_ids[row].push(t);
            rows.attention_mask[row].push(true);
        }
        logits = Some(session.step(&next).unwrap());
    }
    let full = model.forward(&rows, None).unwrap();
    let [b, t, v] = full.dims();
    let last = full.narrow(1, t - 1, 1).reshape([b, v]);
    let diff = max_abs_diff(&values(logits.unwrap()), &values(last), None);
    assert!(diff < 1e-4, "after growing, cached steps differ by {diff}");
}

#[test]
fn an_extended_or_truncated_session_equals_a_fresh_prefill() {
    let device = device();
    let fx = Fixture::open("tiny_untied");
    let model = fx.model(&device);
    let row: Vec<u32> = fx.input("text").input_ids[1].clone();
    let (a, b) = row.split_at(20);
    let fresh = |ids: Vec<u32>| {
        let (_, logits) = Session::prefill(&model, &ModelInput::unpadded(vec![ids]), None).unwrap();
        values(logits)
    };
    let want = fresh(row.clone());

    // The prompt in two runs.
    let (mut session, _) =
        Session::prefill(&model, &ModelInput::unpadded(vec![a.to_vec()]), None).unwrap();
    let got = session
        .extend(&ModelInput::unpadded(vec![b.to_vec()]), None)
        .unwrap();
    assert!(max_abs_diff(&values(got), &want, None) < 1e-4);

    // A detour, cut off again, then the real continuation.
    session.truncate(20).unwrap();
    session
        .extend(&ModelInput::unpadded(vec![vec![77, 78, 79]]), None)
        .unwrap();
    session.truncate(20).unwrap();
    assert_eq!(session.len(), 20);
    let got = session
        .extend(&ModelInput::unpadded(vec![b.to_vec()]), None)
        .unwrap();
    assert!(max_abs_diff(&values(got), &want, None) < 1e-4);

    // Nothing real would be left: refused.
    assert!(session.truncate(0).is_err());
    // Padding after the first prompt: refused.
    let padded = ModelInput::left_padded(vec![vec![5, 6]], 0);
    let mut padded = padded;
    padded.attention_mask[0][0] = false;
    assert!(session.extend(&padded, None).is_err());
}
