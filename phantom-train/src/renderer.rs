//! Progress lines for runs whose output is not a terminal (CI logs, files, pipes), where Burn's
//! full-screen dashboard cannot draw.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::Instant;

use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{MetricDefinition, MetricId};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};

/// Prints the current metric values every `every` micro-batches and at the end of each split.
pub struct PlainRenderer {
    every: usize,
    names: HashMap<MetricId, String>,
    order: Vec<String>,
    train: BTreeMap<String, f64>,
    valid: BTreeMap<String, f64>,
    epoch: usize,
    split: String,
    items: usize,
    total: usize,
    steps_per_epoch: usize,
    total_steps: usize,
    accumulation: usize,
    start: Instant,
}

impl PlainRenderer {
    /// A renderer printing every `every` optimizer steps; `steps_per_epoch` and `accumulation`
    /// turn micro-batch counts into optimizer steps in the printed lines.
    pub fn new(
        every: usize,
        steps_per_epoch: usize,
        total_steps: usize,
        accumulation: usize,
    ) -> Self {
        Self {
            every: every.max(1),
            names: HashMap::new(),
            order: Vec::new(),
            train: BTreeMap::new(),
            valid: BTreeMap::new(),
            epoch: 0,
            split: String::new(),
            items: 0,
            total: 0,
            steps_per_epoch,
            total_steps,
            accumulation: accumulation.max(1),
            start: Instant::now(),
        }
    }

    fn record(&mut self, state: MetricState, valid: bool) {
        if let MetricState::Numeric(entry, Some(value)) = state
            && let Some(name) = self.names.get(&entry.metric_id)
        {
            let target = if valid {
                &mut self.valid
            } else {
                &mut self.train
            };
            target.insert(name.clone(), value.current());
        }
    }

    fn line(&self, values: &BTreeMap<String, f64>) -> String {
        self.order
            .iter()
            .filter_map(|name| values.get(name).map(|v| (name, v)))
            .filter(|(_, v)| v.is_finite())
            .map(|(name, v)| {
                if name == "learning_rate" {
                    format!("{name} {v:.2e}")
                } else {
                    format!("{name} {v:.4}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    }

    fn print_train(&self) {
        let step = (self.epoch.saturating_sub(1)) * self.steps_per_epoch
            + self.items.div_ceil(self.accumulation);
        println!(
            "[{:>6.1}s] step {step}/{}  {}",
            self.start.elapsed().as_secs_f64(),
            self.total_steps,
            self.line(&self.train)
        );
        let _ = std::io::stdout().flush();
    }
}

impl MetricsRendererTraining for PlainRenderer {
    fn update_train(&mut self, state: MetricState) {
        self.record(state, false);
    }

    fn update_valid(&mut self, state: MetricState) {
        self.record(state, true);
    }
}

impl MetricsRendererEvaluation for PlainRenderer {
    fn update_test(&mut self, _name: EvaluationName, state: MetricState) {
        self.record(state, true);
    }
}

impl TrainingProgressLogger for PlainRenderer {
    fn start(
        &mut self,
        _total_epochs: usize,
        starting_epoch: usize,
        _total_items: Option<usize>,
        label: Option<&str>,
    ) {
        self.epoch = starting_epoch;
        self.start = Instant::now();
        println!(
            "{}: {} optimizer steps, from step {}",
            label.unwrap_or("training"),
            self.total_steps,
            starting_epoch.saturating_sub(1) * self.steps_per_epoch
        );
    }

    fn update_epoch(&mut self, epoch: usize) {
        self.epoch = epoch + 1;
    }

    fn start_split(&mut self, split: &str, total_items: usize) {
        self.split = split.to_string();
        self.items = 0;
        self.total = total_items;
        if split != "train" {
            self.valid.clear();
        }
    }

    fn update_split(&mut self, items_processed: usize) {
        self.items = items_processed;
        if self.split == "train" && items_processed.is_multiple_of(self.every * self.accumulation) {
            self.print_train();
        }
    }

    fn end_split(&mut self) {
        if self.split != "train" && !self.valid.is_empty() {
            println!(
                "[{:>6.1}s] held-out  {}",
                self.start.elapsed().as_secs_f64(),
                self.line(&self.valid)
            );
        }
    }

    fn end(&mut self) {}

    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for PlainRenderer {
    fn start_global_progress(&mut self, _total_tests: usize) {}
    fn start_test(&mut self, _name: &str, _total_items: usize) {}
    fn update_test_progress(&mut self, _items_processed: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRenderer for PlainRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        let name = definition.name.to_string();
        if !self.order.contains(&name) {
            self.order.push(name.clone());
        }
        self.names.insert(definition.metric_id, name);
    }
}
