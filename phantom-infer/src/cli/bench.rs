//! `phantom-infer bench`: speed and memory of a randomly initialised model of a released size
//! on one backend, as one JSON object (the `cargo xtask bench-infer` table is built from it).

use std::time::Instant;

use burn::prelude::*;
use clap::Args;
use phantom_infer::Session;
use phantom_model::device::{Precision, device_with_precision, load_options};
use phantom_model::{ModelInput, PhantomModel};

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model size: 0.5b, 1.8b, 3.8b or 7b.
    #[arg(long, default_value = "0.5b")]
    size: String,
    /// Backend (default: best compiled).
    #[arg(long)]
    device: Option<String>,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Decode steps per context (the first is a warm-up and not counted).
    #[arg(long, default_value_t = 9)]
    decode_steps: usize,
    /// Contexts at which decode speed is measured.
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    contexts: Vec<usize>,
    /// Precision: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// Skip the vision-tower measurement.
    #[arg(long)]
    no_vision: bool,
}

/// Peak resident memory of this process in MiB (Linux), if known.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Copy bandwidth of this machine in GB/s (bytes read + written), best of a few runs.
fn copy_bandwidth_gbs() -> f64 {
    let n = 256 * 1024 * 1024 / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (2 * n * 4) as f64 / best / 1e9
}

fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    // A small LCG: reproducible ids without another dependency.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % (vocab as u64 - 1000)) as u32 + 500
        })
        .collect()
}

/// `phantom-infer bench`.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let device = device_with_precision(args.device.as_deref(), args.dtype)?;
    let config = phantom_model::presets::config(&args.size)?;
    let vocab = config.llm.vocab_size;
    let model = phantom_model::cast_parameters(
        PhantomModel::new(config, &device),
        load_options(&device, args.dtype),
    );
    let params_decoder = model.language_model.num_params();
    let params_vision = model.vision_model.num_params() + model.vision_proj.num_params();
    let mut report = serde_json::json!({
        "size": args.size,
        "device": format!("{device:?}"),
        "dtype": args.dtype.to_string(),
        "params_decoder": params_decoder,
        "params_vision": params_vision,
    });

    if !args.no_vision {
        let side = model.config.vision.image_size;
        let tile = Tensor::<4>::random(
            [1, 3, side, side],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        for key in ["vision_ms_per_tile", "vision_ms_per_tile_warm"] {
            let start = Instant::now();
            let tokens = model.encode_images(tile.clone())?;
            let _ = tokens.into_data();
            report[key] = (start.elapsed().as_secs_f64() * 1e3).into();
        }
    }

    // Burn draws a parameter on first use: a short untimed prompt draws them all, so the
    // timings below measure computation only.
    let warm_up = ModelInput::unpadded(vec![random_ids(8, vocab, 0)]);
    let _ = Session::prefill(&model, &warm_up, None)?.1.into_data();

    let prompt = ModelInput::unpadded(vec![random_ids(args.prompt_len, vocab, 1)]);
    let start = Instant::now();
    let (_session, logits) = Session::prefill(&model, &prompt, None)?;
    let _ = logits.into_data();
    report["prefill_tokens"] = args.prompt_len.into();
    report["prefill_tokens_per_s"] =
        (args.prompt_len as f64 / start.elapsed().as_secs_f64()).into();

    for &context in &args.contexts {
        let prompt = ModelInput::unpadded(vec![random_ids(context, vocab, context as u64)]);
        let (mut session, _) = Session::prefill(&model, &prompt, None)?;
        let mut token = 1000u32;
        let mut counted = std::time::Duration::ZERO;
        for step in 0..args.decode_steps.max(2) {
            let start = Instant::now();
            let logits = session.step(&[token])?;
            let next = logits.argmax(1).into_data().convert::<i64>();
            token = next
                .try_to_vec::<i64>()
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(0) as u32;
            if step > 0 {
                counted += start.elapsed();
            }
        }
        let steps = args.decode_steps.max(2) - 1;
        report[format!("decode_tokens_per_s_{context}")] =
            (steps as f64 / counted.as_secs_f64()).into();
    }

    // Decode reads every decoder weight once per token (the tied head reuses the embedding).
    let weight_bytes = params_decoder as f64 * args.dtype.bytes() as f64;
    let bandwidth = copy_bandwidth_gbs();
    report["weight_bytes_per_token"] = weight_bytes.into();
    report["copy_bandwidth_gbs"] = bandwidth.into();
    // A copy moves its bytes through memory twice (read + write); a weight stream once.
    report["decode_bound_tokens_per_s"] = (bandwidth * 1e9 / weight_bytes).into();
    report["peak_rss_mb"] = peak_rss_mb().into();
    println!("{report}");
    Ok(())
}
