//! What `GET /metrics` reports, in Prometheus' text format: requests by outcome, tokens,
//! queue depth, batch size, and request latency.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Counters shared by the handlers and the engine thread.
#[derive(Default)]
pub struct Metrics {
    requests_ok: AtomicU64,
    requests_client_error: AtomicU64,
    requests_server_error: AtomicU64,
    requests_cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    queue_depth: AtomicU64,
    batch_size: AtomicU64,
    decode_steps: AtomicU64,
    vision_runs: AtomicU64,
    vision_hits: AtomicU64,
    latency_count: AtomicU64,
    /// Sum of latencies in microseconds.
    latency_sum_us: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
}

/// How a request ended, for the counters.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    /// Answered.
    Ok,
    /// Refused (4xx).
    ClientError,
    /// Failed (5xx).
    ServerError,
    /// The client went away.
    Cancelled,
}

impl Metrics {
    /// Records a finished request.
    pub fn request(&self, outcome: Outcome, seconds: f64, prompt: usize, completion: usize) {
        let counter = match outcome {
            Outcome::Ok => &self.requests_ok,
            Outcome::ClientError => &self.requests_client_error,
            Outcome::ServerError => &self.requests_server_error,
            Outcome::Cancelled => &self.requests_cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
        if matches!(outcome, Outcome::Ok) {
            self.latency_count.fetch_add(1, Ordering::Relaxed);
            self.latency_sum_us
                .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
            for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
                if seconds <= *bound {
                    bucket.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// A request entered the queue.
    pub fn enqueued(&self) {
        self.queue_depth.fetch_add(1, Ordering::Relaxed);
    }

    /// A request left the queue for the engine.
    pub fn dequeued(&self) {
        let _ = self
            .queue_depth
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some(d.saturating_sub(1))
            });
    }

    /// The engine's current figures.
    pub fn engine(&self, stats: phantom_infer::batch::EngineStats) {
        self.batch_size
            .store(stats.batch_size as u64, Ordering::Relaxed);
        self.decode_steps.store(stats.steps, Ordering::Relaxed);
        self.vision_runs.store(stats.vision_runs, Ordering::Relaxed);
        self.vision_hits.store(stats.vision_hits, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, value) in lines {
                out.push_str(&format!("{name}{labels} {value}\n"));
            }
        };
        metric(
            "phantom_requests_total",
            "counter",
            "Chat completion requests by outcome.",
            vec![
                ("{outcome=\"ok\"}".into(), get(&self.requests_ok)),
                (
                    "{outcome=\"client_error\"}".into(),
                    get(&self.requests_client_error),
                ),
                (
                    "{outcome=\"server_error\"}".into(),
                    get(&self.requests_server_error),
                ),
                (
                    "{outcome=\"cancelled\"}".into(),
                    get(&self.requests_cancelled),
                ),
            ],
        );
        metric(
            "phantom_prompt_tokens_total",
            "counter",
            "Prompt tokens read.",
            vec![(String::new(), get(&self.prompt_tokens))],
        );
        metric(
            "phantom_completion_tokens_total",
            "counter",
            "Tokens generated.",
            vec![(String::new(), get(&self.completion_tokens))],
        );
        metric(
            "phantom_queue_depth",
            "gauge",
            "Requests waiting for the engine.",
            vec![(String::new(), get(&self.queue_depth))],
        );
        metric(
            "phantom_batch_size",
            "gauge",
            "Requests decoding together now.",
            vec![(String::new(), get(&self.batch_size))],
        );
        metric(
            "phantom_decode_steps_total",
            "counter",
            "Batched decode steps run.",
            vec![(String::new(), get(&self.decode_steps))],
        );
        metric(
            "phantom_vision_encodes_total",
            "counter",
            "Pictures through the vision tower, by whether the cache had them.",
            vec![
                ("{cached=\"false\"}".into(), get(&self.vision_runs)),
                ("{cached=\"true\"}".into(), get(&self.vision_hits)),
            ],
        );
        out.push_str(
            "# HELP phantom_request_seconds Latency of answered requests.\n\
             # TYPE phantom_request_seconds histogram\n",
        );
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            out.push_str(&format!(
                "phantom_request_seconds_bucket{{le=\"{bound}\"}} {}\n",
                get(bucket)
            ));
        }
        let count = get(&self.latency_count);
        out.push_str(&format!(
            "phantom_request_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             phantom_request_seconds_sum {}\nphantom_request_seconds_count {count}\n",
            get(&self.latency_sum_us) as f64 / 1e6
        ));
        out
    }
}
