//! `phantom-infer serve`: an OpenAI-compatible HTTP server for a Phantom model, with images,
//! streaming and continuous batching, that also serves the web page and its model folder.
//!
//! Handlers parse and check a request, turn its pictures into tiles and its conversation into
//! ids (the shared [`InputProcessor`] path), and queue it; one engine thread runs the
//! [`Engine`]: requests join the decoding batch between steps and leave when done or when
//! their client goes away. Tokens come back to the handler, which turns them into text, stops
//! at the client's stop sequences, and answers in one piece or as server-sent events.

mod metrics;
mod openai;
mod remote;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use phantom_infer::GenerationConfig;
use phantom_infer::batch::{Engine, FinishReason, Job, JobEvent};
use phantom_model::processor::image::{ImageProcessor, RgbImage};
use phantom_model::processor::inputs::InputProcessor;
use phantom_model::processor::tokenizer::Tokenizer;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use self::metrics::{Metrics, Outcome};
use self::openai::{ApiError, ChatRequest, ImageSource, Limits};
use super::ModelArgs;

/// Arguments of `serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on: loopback by default; anything else is the user's explicit choice.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Tokenizer file (default: tokenizer.json in the model folder).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Most requests decoding together.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most requests waiting for the engine; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// New tokens per answer when a request does not say.
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 32)]
    max_body_mib: usize,
    /// Largest picture, in MiB (encoded).
    #[arg(long, default_value_t = 16)]
    max_image_mib: usize,
    /// Largest picture, in decoded megapixels (refused before any pixel is decoded).
    #[arg(long, default_value_t = 40)]
    max_megapixels: u64,
    /// Most pictures per request.
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// Most messages per request.
    #[arg(long, default_value_t = 256)]
    max_messages: usize,
    /// Memory kept for vision tokens of pictures seen before, in MiB.
    #[arg(long, default_value_t = 512)]
    vision_cache_mib: usize,
    /// Fetch `http(s)` image URLs (public addresses only, size and time limited).
    #[arg(long)]
    allow_remote_images: bool,
    /// The web page's folder (`phantom-wasm/web`, built by `cargo xtask wasm`): served at `/`,
    /// with the model folder at `/model/`.
    #[arg(long)]
    web: Option<PathBuf>,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_s: u64,
}

/// What every handler shares.
struct AppState {
    inputs: InputProcessor,
    model_name: String,
    context: usize,
    created: u64,
    stop_ids: Vec<u32>,
    queue: SyncSender<Job>,
    metrics: Arc<Metrics>,
    limits: Limits,
    max_body: usize,
    max_pixels: u64,
    default_max_tokens: usize,
    allow_remote_images: bool,
    /// Requests taken so far; numbers the completion ids.
    served: AtomicU64,
}

type Shared = Arc<AppState>;

/// `phantom-infer serve`.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.model.join(phantom_infer::chat::TOKENIZER_FILE));
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .with_context(|| format!("loading the tokenizer {}", tokenizer_path.display()))?;
    let model = args.model.load()?;
    let inputs = InputProcessor::new(&model.config, tokenizer)?;
    let mut stop_ids = model.config.eos_token_ids.clone();
    if let Ok(end) = inputs.end_token_id()
        && !stop_ids.contains(&end)
    {
        stop_ids.push(end);
    }
    let model_name = args
        .model
        .model
        .file_name()
        .map_or_else(|| "phantom".into(), |n| n.to_string_lossy().to_string());
    let metrics = Arc::new(Metrics::default());
    let (queue, jobs) = std::sync::mpsc::sync_channel::<Job>(args.queue.max(1));
    let state = Arc::new(AppState {
        inputs,
        model_name,
        context: model.config.llm.max_context(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        stop_ids,
        queue,
        metrics: metrics.clone(),
        limits: Limits {
            max_messages: args.max_messages,
            max_images: args.max_images,
            max_image_bytes: args.max_image_mib << 20,
        },
        max_body: args.max_body_mib << 20,
        max_pixels: args.max_megapixels * 1_000_000,
        default_max_tokens: args.default_max_tokens,
        allow_remote_images: args.allow_remote_images,
        served: AtomicU64::new(0),
    });

    let max_batch = args.max_batch.max(1);
    let cache_bytes = args.vision_cache_mib << 20;
    let engine = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run_engine(&model, jobs, max_batch, cache_bytes, &metrics))
        .context("starting the engine thread")?;

    let app = router(state, &args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let grace = Duration::from_secs(args.shutdown_grace_s);
    runtime.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", args.host, args.port)
            .parse()
            .or_else(|_| {
                std::net::ToSocketAddrs::to_socket_addrs(&(args.host.as_str(), args.port))
                    .map_err(anyhow::Error::from)
                    .and_then(|mut a| a.next().context("the host resolves to no address"))
            })
            .with_context(|| format!("listen address {}:{}", args.host, args.port))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!("serving on http://{local}/ (OpenAI API at /v1, page at /)");
        // Tests read the address from here.
        println!("listening on http://{local}");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown(grace))
            .await
            .context("serving")
    })?;
    drop(engine);
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C; then in-flight requests get `grace` before the process
/// exits regardless.
async fn shutdown(grace: Duration) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: no new connections; in-flight requests have {grace:?}");
    std::thread::spawn(move || {
        std::thread::sleep(grace);
        eprintln!("shutdown grace over; exiting");
        std::process::exit(0);
    });
}

/// The engine thread: admits queued requests between decode steps, up to `max_batch` at once.
fn run_engine(
    model: &phantom_model::PhantomModel,
    jobs: Receiver<Job>,
    max_batch: usize,
    cache_bytes: usize,
    metrics: &Metrics,
) {
    let mut engine = Engine::new(model, cache_bytes);
    loop {
        // Everything waiting joins now, prefilled together; an idle engine waits for work.
        let mut arrived = Vec::new();
        if engine.is_idle() {
            match jobs.recv() {
                Ok(job) => arrived.push(job),
                // Every sender is gone: the server has stopped.
                Err(_) => return,
            }
        }
        while engine.batch_size() + arrived.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => arrived.push(job),
                Err(_) => break,
            }
        }
        for _ in &arrived {
            metrics.dequeued();
        }
        if !arrived.is_empty() {
            engine.admit_all(arrived);
        }
        metrics.engine(engine.stats());
        engine.step();
        if engine.is_idle() {
            metrics.engine(engine.stats());
        }
    }
}

fn router(state: Shared, args: &ServeArgs) -> anyhow::Result<Router> {
    let mut app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/{*rest}", axum::routing::any(not_found))
        .with_state(state);
    // The page's model folder: the files a model folder holds, nothing else.
    let model_dir = args.model.model.clone();
    let tokenizer = args.tokenizer.clone();
    app = app.route(
        "/model/{file}",
        get(
            move |axum::extract::Path(file): axum::extract::Path<String>| {
                let model_dir = model_dir.clone();
                let tokenizer = tokenizer.clone();
                async move { model_file(&model_dir, tokenizer.as_deref(), &file).await }
            },
        ),
    );
    if let Some(web) = &args.web {
        if !web.join("index.html").is_file() {
            anyhow::bail!("{} holds no index.html (the page's folder)", web.display());
        }
        if !web.join("pkg").is_dir() {
            eprintln!(
                "warning: {} has no pkg/; build the page with `cargo xtask wasm`",
                web.display()
            );
        }
        app = app.fallback_service(tower_http::services::ServeDir::new(web));
    }
    Ok(app)
}

/// A file of the model folder for the page: config, tokenizer and weights only.
async fn model_file(dir: &Path, tokenizer: Option<&Path>, file: &str) -> Response {
    let allowed = file == "config.json"
        || file == "tokenizer.json"
        || file == phantom_model::weights::INDEX_FILE
        || (file.ends_with(".safetensors")
            && !file.contains(['/', '\\'])
            && !file.starts_with('.'));
    if !allowed {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = match (file, tokenizer) {
        ("tokenizer.json", Some(t)) => t.to_path_buf(),
        _ => dir.join(file),
    };
    match tokio::fs::File::open(&path).await {
        Ok(f) => {
            let kind = if file.ends_with(".json") {
                "application/json"
            } else {
                "application/octet-stream"
            };
            let stream = tokio_util::io::ReaderStream::new(f);
            ([(header::CONTENT_TYPE, kind)], Body::from_stream(stream)).into_response()
        }
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn metrics_text(State(state): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn models(State(state): State<Shared>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "phantom-rs",
        }],
    }))
}

/// A request checked and turned into a job's inputs.
struct Prepared {
    ids: Vec<u32>,
    pixels: Option<phantom_model::processor::image::PixelValues>,
    config: GenerationConfig,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    model: String,
}

async fn chat_completions(State(state): State<Shared>, request: Request) -> Response {
    let start = Instant::now();
    let prepared = match prepare(&state, request).await {
        Ok(p) => p,
        Err(e) => {
            let outcome = if e.status.is_server_error() {
                Outcome::ServerError
            } else {
                Outcome::ClientError
            };
            state.metrics.request(outcome, 0.0, 0, 0);
            return e.into_response();
        }
    };
    let (tx, rx) = unbounded_channel::<JobEvent>();
    let job = Job {
        input: prepared.ids.clone(),
        pixels: prepared.pixels.clone(),
        config: prepared.config.clone(),
        sink: Box::new(move |event| {
            if tx.send(event).is_ok() {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        }),
    };
    state.metrics.enqueued();
    match state.queue.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            state.metrics.dequeued();
            state.metrics.request(Outcome::ServerError, 0.0, 0, 0);
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                "the server is busy; retry shortly",
            )
            .into_response();
        }
        Err(TrySendError::Disconnected(_)) => {
            state.metrics.dequeued();
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            )
            .into_response();
        }
    }
    let serial = state.served.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-{:x}-{serial}", state.created);
    if prepared.stream {
        stream_answer(state, prepared, rx, id, start).into_response()
    } else {
        whole_answer(state, prepared, rx, id, start).await
    }
}

/// Widest beam search a request may ask for (the paper evaluates with 3).
const MAX_BEAMS: usize = 8;

/// Reads, parses and checks a request, and prepares its pictures and ids.
async fn prepare(state: &Shared, request: Request) -> Result<Prepared, ApiError> {
    let body = axum::body::to_bytes(request.into_body(), state.max_body)
        .await
        .map_err(|_| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the request body is larger than the limit of {} bytes",
                state.max_body
            ),
            param: None,
            code: "request_too_large",
        })?;
    let req: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is served"));
    }
    let max_tiles = req.max_tiles.unwrap_or(6);
    let processor = ImageProcessor {
        max_tiles: ImageProcessor::new(max_tiles)
            .map_err(|e| ApiError::invalid("max_tiles", e.to_string()))?
            .max_tiles,
        max_pixels: state.max_pixels,
        ..state.inputs.images.clone()
    };
    let conversation = openai::conversation(req.messages, state.limits)?;
    // Pictures: fetched (when allowed) and decoded off the async threads.
    let mut images: Vec<RgbImage> = Vec::with_capacity(conversation.images.len());
    for (i, source) in conversation.images.into_iter().enumerate() {
        let bytes = match source {
            ImageSource::Bytes(bytes) => bytes,
            ImageSource::Remote(url) => {
                if !state.allow_remote_images {
                    return Err(ApiError::invalid(
                        "messages",
                        "remote image URLs are disabled on this server (it was not started \
                         with --allow-remote-images); send the picture as a data URL",
                    ));
                }
                let limit = state.limits.max_image_bytes;
                tokio::task::spawn_blocking(move || remote::fetch(&url, limit))
                    .await
                    .map_err(|e| {
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                    })?
                    .map_err(|why| ApiError::invalid("messages", why))?
            }
        };
        let processor = processor.clone();
        let image = tokio::task::spawn_blocking(move || processor.decode(&bytes))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
            .map_err(|e| ApiError::invalid("messages", format!("image {i}: {e}")))?;
        images.push(image);
    }
    let state2 = state.clone();
    let system = conversation.system;
    let turns = conversation.turns;
    let (ids, pixels) = tokio::task::spawn_blocking(move || {
        let pictures = state2.inputs.pictures_with(&processor, &images);
        let ids = state2
            .inputs
            .encode_with_system(system.as_deref(), &turns, &pictures);
        ids.map(|ids| (ids, pictures.pixels))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| ApiError::invalid("messages", e.to_string()))?;

    let room = state.context.saturating_sub(ids.len());
    if room == 0 {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the prompt has {} tokens, as many as the model's context of {}",
                ids.len(),
                state.context
            ),
        ));
    }
    let asked = req.max_completion_tokens.or(req.max_tokens);
    let max_new_tokens = match asked {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        Some(n) if n > room => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "the prompt has {} tokens; {n} more exceed the model's context of {} \
                     (at most {room})",
                    ids.len(),
                    state.context
                ),
            ));
        }
        Some(n) => n,
        None => state.default_max_tokens.min(room),
    };
    let config = GenerationConfig {
        max_new_tokens,
        temperature: req.temperature.unwrap_or(0.0),
        top_k: req.top_k.unwrap_or(0),
        top_p: req.top_p.unwrap_or(1.0),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        seed: req.seed.unwrap_or(0),
        num_beams: req.num_beams.unwrap_or(1),
        stop_token_ids: if req.ignore_eos {
            Vec::new()
        } else {
            state.stop_ids.clone()
        },
    };
    config.validate().map_err(|e| {
        let text = e.to_string();
        let param = ["temperature", "top_p", "repetition_penalty", "num_beams"]
            .into_iter()
            .find(|p| text.contains(p))
            .unwrap_or("messages");
        ApiError::invalid(param, text)
    })?;
    if config.num_beams > MAX_BEAMS {
        // Each beam is a row of the KV cache: the width is bounded like any other request size.
        return Err(ApiError::invalid(
            "num_beams",
            format!("num_beams must be at most {MAX_BEAMS}"),
        ));
    }
    let stops = req.stop.map(openai::Stop::into_vec).unwrap_or_default();
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "up to 4 non-empty stop sequences",
        ));
    }
    Ok(Prepared {
        ids,
        pixels,
        config,
        stops,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        model: req.model.unwrap_or_else(|| state.model_name.clone()),
    })
}

/// Turns a request's tokens into text as they come, holding back what might be the start of a
/// stop sequence or of a character whose bytes are not all there yet.
struct Text {
    ids: Vec<u32>,
    text: String,
    sent: usize,
    stops: Vec<String>,
    /// Set once a stop sequence is met: the answer ends before it.
    stopped: bool,
}

impl Text {
    fn new(stops: Vec<String>) -> Self {
        Self {
            ids: Vec::new(),
            text: String::new(),
            sent: 0,
            stops,
            stopped: false,
        }
    }

    /// Adds a token; returns the text that can be sent now.
    fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        if self.stopped {
            return String::new();
        }
        self.ids.push(token);
        let Ok(text) = tokenizer.decode_skip_special(&self.ids) else {
            return String::new();
        };
        self.text = text;
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            self.stopped = true;
            return self.flush();
        }
        // Hold back an unfinished character and any tail that could begin a stop sequence.
        let mut end = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        for stop in &self.stops {
            for k in (1..stop.len()).rev() {
                if stop.is_char_boundary(k) && self.text[..end].ends_with(&stop[..k]) {
                    end = end.min(self.text.len() - k);
                    break;
                }
            }
        }
        self.take(end)
    }

    fn take(&mut self, end: usize) -> String {
        if end <= self.sent || !self.text.is_char_boundary(end) {
            return String::new();
        }
        let piece = self.text[self.sent..end].to_string();
        self.sent = end;
        piece
    }

    /// Everything not sent yet.
    fn flush(&mut self) -> String {
        let end = self.text.len();
        self.take(end)
    }
}

fn finish_reason(reason: FinishReason, text: &Text) -> &'static str {
    match reason {
        _ if text.stopped => "stop",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "stop",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

async fn whole_answer(
    state: Shared,
    prepared: Prepared,
    mut rx: UnboundedReceiver<JobEvent>,
    id: String,
    start: Instant,
) -> Response {
    /// Counts the request as cancelled when its client goes away first (axum drops the future).
    struct Pending<'a>(&'a Shared, Instant, bool);
    impl Drop for Pending<'_> {
        fn drop(&mut self) {
            if !self.2 {
                let seconds = self.1.elapsed().as_secs_f64();
                self.0.metrics.request(Outcome::Cancelled, seconds, 0, 0);
            }
        }
    }
    let mut pending = Pending(&state, start, false);
    let mut text = Text::new(prepared.stops);
    let tokenizer = &state.inputs.tokenizer;
    let mut produced = 0;
    while let Some(event) = rx.recv().await {
        match event {
            JobEvent::Token(token) => {
                produced += 1;
                text.push(tokenizer, token);
                if text.stopped {
                    break;
                }
            }
            JobEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                pending.2 = true;
                text.flush();
                return respond_whole(
                    &state,
                    &prepared.model,
                    &id,
                    &text,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    start,
                );
            }
            JobEvent::Failed(why) => {
                pending.2 = true;
                state.metrics.request(Outcome::ServerError, 0.0, 0, 0);
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", why)
                    .into_response();
            }
        }
    }
    // A stop sequence ended the answer: the engine lets the row go at its next step.
    pending.2 = true;
    drop(rx);
    respond_whole(
        &state,
        &prepared.model,
        &id,
        &text,
        FinishReason::Stop,
        prepared.ids.len(),
        produced,
        start,
    )
}

#[allow(clippy::too_many_arguments)]
fn respond_whole(
    state: &Shared,
    model: &str,
    id: &str,
    text: &Text,
    reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
    start: Instant,
) -> Response {
    state.metrics.request(
        Outcome::Ok,
        start.elapsed().as_secs_f64(),
        prompt_tokens,
        completion_tokens,
    );
    axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text.text},
            "logprobs": null,
            "finish_reason": finish_reason(reason, text),
        }],
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response()
}

/// The answer as server-sent events: a first chunk with the role, one per piece of text, one
/// with the finish reason, the usage when asked, then `[DONE]`.
fn stream_answer(
    state: Shared,
    prepared: Prepared,
    rx: UnboundedReceiver<JobEvent>,
    id: String,
    start: Instant,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    struct Streaming {
        state: Shared,
        rx: Option<UnboundedReceiver<JobEvent>>,
        text: Text,
        id: String,
        model: String,
        created: u64,
        include_usage: bool,
        prompt_tokens: usize,
        produced: usize,
        start: Instant,
        queued: std::collections::VecDeque<Event>,
        done: bool,
    }
    impl Drop for Streaming {
        fn drop(&mut self) {
            // The client went away before the end: its row is let go at the next step.
            if !self.done {
                let seconds = self.start.elapsed().as_secs_f64();
                self.state
                    .metrics
                    .request(Outcome::Cancelled, seconds, 0, 0);
            }
        }
    }
    impl Streaming {
        fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
            Event::default().data(
                json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                 "finish_reason": finish}],
                })
                .to_string(),
            )
        }

        fn end(&mut self, reason: FinishReason, prompt: usize, completion: usize) {
            let rest = self.text.flush();
            if !rest.is_empty() {
                let chunk = self.chunk(json!({"content": rest}), None);
                self.queued.push_back(chunk);
            }
            let finish = finish_reason(reason, &self.text);
            let chunk = self.chunk(json!({}), Some(finish));
            self.queued.push_back(chunk);
            if self.include_usage {
                let data = json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage(prompt, completion),
                });
                self.queued
                    .push_back(Event::default().data(data.to_string()));
            }
            self.queued.push_back(Event::default().data("[DONE]"));
            self.state.metrics.request(
                Outcome::Ok,
                self.start.elapsed().as_secs_f64(),
                prompt,
                completion,
            );
            self.done = true;
            // Dropping the receiver tells the engine to let the row go (after a stop sequence).
            self.rx = None;
        }
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut streaming = Streaming {
        state,
        rx: Some(rx),
        text: Text::new(prepared.stops),
        id,
        model: prepared.model,
        created,
        include_usage: prepared.include_usage,
        prompt_tokens: prepared.ids.len(),
        produced: 0,
        start,
        queued: std::collections::VecDeque::new(),
        done: false,
    };
    let first = streaming.chunk(json!({"role": "assistant", "content": ""}), None);
    streaming.queued.push_back(first);
    let stream = futures_util::stream::unfold(streaming, |mut s| async move {
        loop {
            if let Some(event) = s.queued.pop_front() {
                return Some((Ok(event), s));
            }
            if s.done {
                return None;
            }
            let event = match s.rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => None,
            };
            match event {
                Some(JobEvent::Token(token)) => {
                    s.produced += 1;
                    let tokenizer = &s.state.inputs.tokenizer;
                    let piece = s.text.push(tokenizer, token);
                    if !piece.is_empty() {
                        let chunk = s.chunk(json!({"content": piece}), None);
                        s.queued.push_back(chunk);
                    }
                    if s.text.stopped {
                        let (prompt, produced) = (s.prompt_tokens, s.produced);
                        s.end(FinishReason::Stop, prompt, produced);
                    }
                }
                Some(JobEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => s.end(reason, prompt_tokens, completion_tokens),
                Some(JobEvent::Failed(why)) => {
                    let error =
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", why);
                    s.state.metrics.request(Outcome::ServerError, 0.0, 0, 0);
                    s.queued
                        .push_back(Event::default().data(error.body().to_string()));
                    s.queued.push_back(Event::default().data("[DONE]"));
                    s.done = true;
                    s.rx = None;
                }
                None => {
                    // The engine let the request go without a last word (it stopped running).
                    return None;
                }
            }
        }
    });
    Sse::new(stream)
}
