//! `phantom-infer bench`: speed and memory of a model of a released size on one backend, as
//! one JSON object (the `cargo xtask bench-infer` table is built from it). The model is a
//! randomly initialised one, or a checkpoint folder whose loading is timed too.

use std::time::{Duration, Instant};

use burn::prelude::*;
use clap::Args;
use phantom_infer::Session;
use phantom_model::device::{Precision, device_with_precision, load_options};
use phantom_model::{ModelInput, PhantomModel};

use super::{DtypeChoice, ModelArgs};

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model size: 0.5b, 1.8b, 3.8b or 7b (random weights).
    #[arg(long, default_value = "0.5b")]
    size: String,
    /// A checkpoint folder to load (and time) instead of random weights of `--size`.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
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
    /// Quantize the linear weights: q8 or q4.
    #[arg(long)]
    quantize: Option<phantom_model::quantize::Quantization>,
    /// Skip the vision-tower measurement.
    #[arg(long)]
    no_vision: bool,
    /// Also time the first token of a question about a 1-tile and a 6-tile picture (the vision
    /// tower on 1 and 7 tiles, then a prompt of 286 and 1822 tokens).
    #[arg(long)]
    ttft: bool,
}

/// Peak resident memory of this process in MiB (Linux), if known.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Read bandwidth of this machine in GB/s: every core sums its share of a 1 GiB buffer, far
/// larger than the caches; best of five.
fn read_bandwidth_gbs() -> f64 {
    let n = (1usize << 30) / 4;
    let data = vec![1.0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let sum = |part: &[f32]| -> f32 {
        // Sixteen running sums, so that the loop vectorises and streams.
        let mut lanes = [0.0f32; 16];
        for chunk in part.chunks_exact(16) {
            for (l, &x) in lanes.iter_mut().zip(chunk) {
                *l += x;
            }
        }
        lanes.iter().sum()
    };
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for part in data.chunks(n.div_ceil(threads)) {
                s.spawn(move || std::hint::black_box(sum(part)));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
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

/// Seconds to prefill a prompt of `len` random ids.
fn prefill_time(model: &PhantomModel, len: usize, seed: u64) -> anyhow::Result<Duration> {
    let prompt = ModelInput::unpadded(vec![random_ids(len, model.config.llm.vocab_size, seed)]);
    let start = Instant::now();
    let (_session, logits) = Session::prefill(model, &prompt, None)?;
    let _ = logits.into_data();
    Ok(start.elapsed())
}

/// Seconds for the vision tower and projector on `tiles` random tiles.
fn vision_time(model: &PhantomModel, tiles: usize) -> anyhow::Result<Duration> {
    let side = model.config.vision.image_size;
    let pixels = Tensor::<4>::random(
        [tiles, 3, side, side],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &model.device(),
    );
    let start = Instant::now();
    let _ = model.encode_images(pixels)?.into_data();
    Ok(start.elapsed())
}

/// `phantom-infer bench`.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let (model, device) = match &args.model {
        Some(dir) => {
            let model_args = ModelArgs {
                model: dir.clone(),
                device: args.device.clone(),
                dtype: DtypeChoice::Fixed(args.dtype),
                quantize: args.quantize,
                quiet_load: true,
            };
            let model = model_args.load()?;
            let device = model.device();
            (model, device)
        }
        None => {
            let device = device_with_precision(args.device.as_deref(), args.dtype)?;
            let config = phantom_model::presets::config(&args.size)?;
            let mut model = phantom_model::cast_parameters(
                PhantomModel::new(config, &device),
                load_options(&device, args.dtype),
            );
            if let Some(scheme) = args.quantize {
                let config = phantom_model::quantize::QuantizationConfig::new(scheme);
                model = phantom_model::quantize_parameters(model, config);
            }
            crate::allocator::running();
            (model, device)
        }
    };
    let load_s = start.elapsed().as_secs_f64();
    let vocab = model.config.llm.vocab_size;
    let params_decoder = model.language_model.num_params();
    let params_vision = model.vision_model.num_params() + model.vision_proj.num_params();
    let mut report = serde_json::json!({
        "size": args.size,
        "device": format!("{device:?}"),
        "dtype": args.dtype.to_string(),
        "quantization": model.config.quantization.map(|q| q.scheme.to_string()),
        "params_decoder": params_decoder,
        "params_vision": params_vision,
    });
    if args.model.is_some() {
        report["load_s"] = load_s.into();
    }

    if !args.no_vision {
        for key in ["vision_ms_per_tile", "vision_ms_per_tile_warm"] {
            report[key] = (vision_time(&model, 1)?.as_secs_f64() * 1e3).into();
        }
    }

    // Burn draws a parameter on first use: a short untimed prompt draws them all, so the
    // timings below measure computation only.
    prefill_time(&model, 8, 0)?;

    let prefill = prefill_time(&model, args.prompt_len, 1)?;
    report["prefill_tokens"] = args.prompt_len.into();
    report["prefill_tokens_per_s"] = (args.prompt_len as f64 / prefill.as_secs_f64()).into();

    if args.ttft {
        // A question about a picture: 256 tokens per tile plus about 30 of text.
        for (key, tiles, len) in [("ttft_1_tile_s", 1, 286), ("ttft_6_tile_s", 7, 1822)] {
            let vision = vision_time(&model, tiles)?;
            let prefill = prefill_time(&model, len, len as u64)?;
            report[key] = (vision + prefill).as_secs_f64().into();
            report[format!("prefill_tokens_per_s_{len}")] =
                (len as f64 / prefill.as_secs_f64()).into();
        }
    }

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

    // Read before the bandwidth measurement, whose buffer is not the model's.
    report["peak_rss_mb"] = peak_rss_mb().into();
    // A decode step reads every decoder weight once (the tied head reuses the embedding).
    let weight_bytes = params_decoder as f64 * args.dtype.bytes() as f64;
    let bandwidth = read_bandwidth_gbs();
    report["weight_bytes_per_token"] = weight_bytes.into();
    report["read_bandwidth_gbs"] = bandwidth.into();
    report["decode_bound_tokens_per_s"] = (bandwidth * 1e9 / weight_bytes).into();
    println!("{report}");
    Ok(())
}
