//! The JavaScript surface: load a model from fetched bytes, ask about a picture, stream the
//! answer token by token.
//!
//! ```js
//! import init, { Phantom } from "./pkg/phantom_wasm.js";
//! await init();
//! const model = await Phantom.load(["webgpu", "cpu"], configText, tokenizerBytes,
//!                                  [weightBytes], ["model.safetensors"], (done, total) => {});
//! const result = JSON.parse(await model.ask(width, height, rgba, "What is this?", "{}",
//!                                           (piece) => output.append(piece)));
//! ```

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::rc::Rc;

use js_sys::{Array, Function, Promise, Uint8Array};
use phantom_infer::{Chat, GenerationConfig};
use phantom_model::processor::image::{DEFAULT_MAX_PIXELS, ImageProcessor, RgbImage};
use phantom_model::processor::prompt::Turn;
use phantom_model::processor::tokenizer::Tokenizer;
use phantom_model::{LoadOptions, PhantomConfig, PhantomError, WeightLoader};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::backend::{self, Backend, BackendKind};
use crate::checkpoint::{ByteSource, Header};
use crate::error::{Result, WasmError};
use crate::image::rgb_from_rgba;
use crate::memory::{self, Footprint, PART_BYTES};

/// Makes Rust panics readable in the browser console.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

#[wasm_bindgen]
extern "C" {
    /// A downloaded file. `js_sys::Uint8Array` declares lengths and offsets as u32, and shards
    /// of released checkpoints pass 4 GiB, so this view of it counts in f64.
    #[wasm_bindgen(extends = Uint8Array, js_name = Uint8Array)]
    type FileBytes;
    #[wasm_bindgen(method, getter)]
    fn length(this: &FileBytes) -> f64;
    #[wasm_bindgen(method)]
    fn subarray(this: &FileBytes, begin: f64, end: f64) -> Uint8Array;
}

impl ByteSource for FileBytes {
    fn byte_len(&self) -> u64 {
        self.length() as u64
    }

    fn read_into(&self, offset: u64, out: &mut [u8]) {
        let begin = offset as f64;
        self.subarray(begin, begin + out.len() as f64).copy_to(out);
    }
}

fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// A Phantom model loaded in the page.
#[wasm_bindgen]
pub struct Phantom {
    inner: Rc<Loaded>,
}

struct Loaded {
    // One question at a time: `ask` holds the chat mutably for the whole answer.
    chat: RefCell<Chat>,
    backend: Backend,
    footprint: Footprint,
    load_ms: f64,
    rejected: Vec<String>,
}

#[wasm_bindgen]
impl Phantom {
    /// Loads a model from fetched files.
    ///
    /// `backends` lists `"webgpu"` and/or `"cpu"` in order of preference; the first that starts
    /// and can hold the model is used, and the error names every reason when none can.
    /// `config` is the text of `config.json`, `tokenizer` the bytes of `tokenizer.json`,
    /// `weights` the safetensors files (`model.safetensors` or every shard) named by `names`.
    /// They stay in JavaScript memory and are copied in slices of at most 64 MiB.
    /// `on_progress(done, total)` follows the bytes of weights loaded.
    pub async fn load(
        backends: Array,
        config: String,
        tokenizer: Uint8Array,
        weights: Array,
        names: Array,
        on_progress: Function,
    ) -> Result<Phantom, JsError> {
        load(backends, config, tokenizer, weights, names, on_progress)
            .await
            .map_err(js_error)
    }

    /// The backend in use: `"webgpu"` or `"cpu"`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.inner.backend.kind.to_string()
    }

    /// A JSON description of the backend, its limits, the model and its memory.
    pub fn info(&self) -> String {
        let loaded = &self.inner;
        let chat = loaded.chat.borrow();
        let config = &chat.model.config;
        let limits = loaded.backend.limits.map(|l| {
            serde_json::json!({
                "maxStorageBufferBindingSize": l.max_storage_buffer_binding_size,
                "maxBufferSize": l.max_buffer_size,
                "maxComputeInvocationsPerWorkgroup": l.max_compute_invocations_per_workgroup,
                "maxComputeWorkgroupStorageSize": l.max_compute_workgroup_storage_size,
            })
        });
        serde_json::json!({
            "backend": loaded.backend.kind.to_string(),
            "adapter": loaded.backend.adapter,
            "limits": limits,
            "rejected": loaded.rejected,
            "architecture": config.llm.backbone.architecture(),
            "parameters": loaded.footprint.parameters,
            "weight_bytes": loaded.footprint.weight_bytes,
            "largest_tensor": loaded.footprint.largest,
            "wasm_memory_bytes": backend::memory_in_use(),
            "load_ms": loaded.load_ms,
        })
        .to_string()
    }

    /// Answers `question` about a `width × height` picture given as RGBA bytes (a canvas's
    /// `ImageData`), calling `on_text(piece)` with each new piece of the answer; returning
    /// `false` from it stops the answer there.
    ///
    /// `options` is a JSON object with any of `max_new_tokens` (512), `max_tiles` (6),
    /// `temperature` (0: greedy), `top_k`, `top_p`, `repetition_penalty`, `seed`, `num_beams`.
    /// Resolves to the JSON text `{"answer", "tokens", "timings", "backend"}`, the same as
    /// `phantom-infer chat --json` plus the backend.
    pub fn ask(
        &self,
        width: u32,
        height: u32,
        rgba: &[u8],
        question: String,
        options: String,
        on_text: Function,
    ) -> Promise {
        let image = rgb_from_rgba(width, height, rgba, DEFAULT_MAX_PIXELS);
        let inner = self.inner.clone();
        future_to_promise(async move {
            let image = image.map_err(|e| JsValue::from(js_error(e)))?;
            ask(&inner, image, question, &options, &on_text)
                .await
                .map(|json| JsValue::from_str(&json))
                .map_err(|e| js_error(e).into())
        })
    }
}

/// The `options` of [`Phantom::ask`] as generation settings and a tile limit.
fn parse_options(options: &str) -> Result<(GenerationConfig, usize)> {
    let value: serde_json::Value = if options.trim().is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(options)
            .map_err(|e| WasmError::Input(format!("options are not JSON: {e}")))?
    };
    let number = |key: &str| value.get(key).and_then(serde_json::Value::as_f64);
    let count = |key: &str, default: usize| number(key).map_or(default, |n| n.max(0.0) as usize);
    let config = GenerationConfig {
        max_new_tokens: count("max_new_tokens", 512),
        temperature: number("temperature").map_or(0.0, |n| n as f32),
        top_k: count("top_k", 0),
        top_p: number("top_p").map_or(1.0, |n| n as f32),
        repetition_penalty: number("repetition_penalty").map_or(1.0, |n| n as f32),
        seed: number("seed").map_or(0, |n| n.max(0.0) as u64),
        num_beams: count("num_beams", 1),
        stop_token_ids: Vec::new(),
    };
    config.validate()?;
    Ok((config, count("max_tiles", 6)))
}

async fn load(
    backends: Array,
    config: String,
    tokenizer: Uint8Array,
    weights: Array,
    names: Array,
    on_progress: Function,
) -> Result<Phantom> {
    let started = js_sys::Date::now();
    let config = PhantomConfig::from_json(&config)?;
    let tokenizer = Tokenizer::from_bytes(&tokenizer.to_vec()).map_err(PhantomError::from)?;
    let mut files = Vec::new();
    for (i, buffer) in weights.iter().enumerate() {
        let buffer: FileBytes = buffer
            .dyn_into::<Uint8Array>()
            .map_err(|_| WasmError::Input(format!("weights[{i}] is not a Uint8Array")))?
            .unchecked_into();
        let name = names
            .get(i as u32)
            .as_string()
            .unwrap_or_else(|| format!("weights[{i}]"));
        let header = Header::read(&buffer, &name)?;
        files.push((buffer, header));
    }
    if files.is_empty() {
        return Err(WasmError::Input("no weight files were given".into()));
    }
    let headers: Vec<Header> = files.iter().map(|(_, h)| h.clone()).collect();
    let footprint = Footprint::of(&headers);

    let mut rejected = Vec::new();
    let mut chosen = None;
    for kind in backends.iter() {
        let kind: BackendKind = kind.as_string().unwrap_or_default().parse()?;
        let attempt = match backend::start(kind).await {
            Ok(b) => b.check(&footprint).map(|()| b),
            Err(e) => Err(e),
        };
        match attempt {
            Ok(b) => {
                chosen = Some(b);
                break;
            }
            Err(e) => rejected.push(format!("{kind}: {e}")),
        }
    }
    let Some(backend) = chosen else {
        return Err(if rejected.is_empty() {
            WasmError::Input("no backend was requested".into())
        } else {
            WasmError::Backend(rejected.join("; "))
        });
    };

    let total = footprint.file_bytes as f64;
    let mut done = 0.0;
    let mut loader = WeightLoader::new(config, &backend.device, LoadOptions::default());
    for (buffer, header) in &files {
        for part in header.parts(PART_BYTES) {
            let bytes = header.part_bytes(buffer, part.clone());
            loader.bytes(&header.file, bytes)?;
            done += header.part_data_bytes(part) as f64;
            let _ = on_progress.call2(&JsValue::NULL, &done.into(), &total.into());
        }
    }
    let chat = Chat::new(loader.finish()?, tokenizer)?;
    Ok(Phantom {
        inner: Rc::new(Loaded {
            chat: RefCell::new(chat),
            backend,
            footprint,
            load_ms: js_sys::Date::now() - started,
            rejected,
        }),
    })
}

// One question at a time: a second `ask` while one runs fails on the `try_borrow_mut` with a
// clear error instead of interleaving two generations on one cache.
#[allow(clippy::await_holding_refcell_ref)]
async fn ask(
    loaded: &Loaded,
    image: RgbImage,
    question: String,
    options: &str,
    on_text: &Function,
) -> Result<String> {
    let (config, max_tiles) = parse_options(options)?;
    let tiles = ImageProcessor::new(max_tiles).map_err(PhantomError::from)?;
    let mut chat = loaded
        .chat
        .try_borrow_mut()
        .map_err(|_| WasmError::Input("a question is already being answered".into()))?;
    chat.inputs.images.max_tiles = tiles.max_tiles;
    if loaded.backend.limits.is_none() {
        // WebAssembly memory is the CPU backend's only memory: refuse a picture whose tiles
        // cannot fit rather than running out of memory halfway.
        let count = chat.inputs.images.tile_count(image.width(), image.height());
        memory::check_cpu_question(
            &loaded.footprint,
            &chat.model.config,
            count,
            512 + config.max_new_tokens,
        )?;
    }
    let turns = [Turn::question(question)];
    let (answer, generation) = chat
        .answer_async(&turns, &[image], &config, |piece| {
            match on_text.call1(&JsValue::NULL, &JsValue::from_str(piece)) {
                Ok(v) if v == JsValue::FALSE => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        })
        .await?;
    Ok(serde_json::json!({
        "answer": answer,
        "tokens": generation.sequences.first().cloned().unwrap_or_default(),
        "timings": generation.timings.to_json(),
        "backend": loaded.backend.kind.to_string(),
    })
    .to_string())
}
