//! The metrics preference trainers report, as Burn metrics over [`StepStats`], and a JSON Lines
//! metric logger.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::TensorReadError;
use burn::train::logger::MetricLogger;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricDefinition, MetricId, MetricMetadata, MetricName,
    Numeric, NumericAttributes, NumericEntry, SerializedEntry,
};

use crate::step::StepStats;

impl Adaptor<StepStats> for StepStats {
    fn adapt(&self) -> StepStats {
        self.clone()
    }
}

/// Where a metric's value comes from.
#[derive(Clone, Copy, Debug)]
enum Source {
    Stat(fn(&StepStats) -> Option<f64>),
    LearningRate,
    TokensPerSecond,
}

/// One named number of a step, averaged over the items of an epoch.
#[derive(Clone)]
pub struct StatMetric {
    name: MetricName,
    source: Source,
    higher_is_better: bool,
    precision: usize,
    state: NumericMetricState,
    last: Option<Instant>,
}

impl StatMetric {
    fn new(name: &str, source: Source, higher_is_better: bool, precision: usize) -> Self {
        Self {
            name: Arc::new(name.to_string()),
            source,
            higher_is_better,
            precision,
            state: NumericMetricState::default(),
            last: None,
        }
    }

    /// The metrics of a run, named as in the widely used preference trainers.
    pub fn all() -> Vec<Self> {
        use Source::Stat;
        vec![
            Self::new("loss", Stat(|s| Some(s.loss)), false, 4),
            Self::new("sft_loss", Stat(|s| Some(s.sft_loss)), false, 4),
            Self::new("pref_loss", Stat(|s| s.pref_loss), false, 4),
            Self::new("rewards/chosen", Stat(|s| Some(s.reward_chosen)), true, 4),
            Self::new("rewards/rejected", Stat(|s| s.reward_rejected), false, 4),
            Self::new("rewards/margins", Stat(|s| s.reward_margin), true, 4),
            Self::new("rewards/accuracies", Stat(|s| s.reward_accuracy), true, 3),
            Self::new("logps/chosen", Stat(|s| Some(s.logp_chosen)), true, 4),
            Self::new("logps/rejected", Stat(|s| s.logp_rejected), false, 4),
            Self::new("grad_norm", Stat(|s| s.grad_norm), false, 4),
            Self::new("learning_rate", Source::LearningRate, true, 8),
            Self::new("tokens/s", Source::TokensPerSecond, true, 1),
        ]
    }

    /// The metrics that make sense on held-out data (no optimizer involved).
    pub fn validation() -> Vec<Self> {
        Self::all()
            .into_iter()
            .filter(|m| !matches!(m.name.as_str(), "grad_norm" | "learning_rate" | "tokens/s"))
            .collect()
    }
}

impl Metric for StatMetric {
    type Input = StepStats;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: self.higher_is_better,
        }
        .into()
    }

    fn update(
        &mut self,
        item: &StepStats,
        metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        let value = match self.source {
            Source::Stat(pick) => pick(item),
            Source::LearningRate => metadata.lr.as_ref().map(|lr| lr.base()),
            Source::TokensPerSecond => {
                let now = Instant::now();
                let rate = self.last.map(|last| {
                    item.tokens as f64 / now.duration_since(last).as_secs_f64().max(1e-9)
                });
                self.last = Some(now);
                rate
            }
        };
        let format = FormatOptions::new(self.name.clone()).precision(self.precision);
        match value {
            Some(v) => {
                self.state.update(v, item.triples.max(1));
                Ok(self.state.compute_update(format))
            }
            None => Ok(SerializedEntry::not_available(None)),
        }
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        let format = FormatOptions::new(self.name.clone()).precision(self.precision);
        Ok(self.state.compute_final(format))
    }

    fn clear(&mut self) {
        self.state.reset();
        self.last = None;
    }
}

impl Numeric for StatMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}

/// Writes one JSON object per processed item to `metrics.jsonl`,
/// `{"split":"train","epoch":1,"kind":"item","item":3,"loss":…,…}`, and one with the means
/// of each epoch (`"kind":"epoch"`).
pub struct JsonlMetricLogger {
    out: BufWriter<File>,
    names: HashMap<MetricId, String>,
    items: HashMap<String, usize>,
}

impl JsonlMetricLogger {
    /// Appends to `path` (a resumed run continues the same file).
    pub fn new(path: &Path) -> std::io::Result<Self> {
        let file = File::options().create(true).append(true).open(path)?;
        Ok(Self {
            out: BufWriter::new(file),
            names: HashMap::new(),
            items: HashMap::new(),
        })
    }
}

fn split_name(split: &Split) -> String {
    match split {
        Split::Train => "train".into(),
        Split::Valid => "valid".into(),
        Split::Test(Some(tag)) => format!("test/{tag}"),
        Split::Test(None) => "test".into(),
    }
}

impl MetricLogger for JsonlMetricLogger {
    fn log(&mut self, update: MetricsUpdate, epoch: usize, split: &Split) {
        let split = split_name(split);
        // The learner logs each item, then the epoch's means as `Final` entries.
        let summary = update
            .entries_numeric
            .iter()
            .any(|n| matches!(n.numeric_entry, Some(NumericEntry::Final(_))));
        let mut line = serde_json::Map::new();
        line.insert("split".into(), split.clone().into());
        line.insert("epoch".into(), epoch.into());
        if summary {
            line.insert("kind".into(), "epoch".into());
        } else {
            let item = self.items.entry(format!("{split}/{epoch}")).or_insert(0);
            *item += 1;
            line.insert("kind".into(), "item".into());
            line.insert("item".into(), (*item).into());
        }
        for numeric in &update.entries_numeric {
            let Some(name) = self.names.get(&numeric.entry.metric_id) else {
                continue;
            };
            if let Some(value) = &numeric.numeric_entry {
                let v = value.current();
                if v.is_finite() {
                    line.insert(name.clone(), v.into());
                }
            }
        }
        // Metrics are best effort: a full disk must not kill the run, the checkpoints matter.
        let _ = writeln!(self.out, "{}", serde_json::Value::Object(line));
        let _ = self.out.flush();
    }

    fn read_numeric(
        &mut self,
        name: &str,
        _epoch: usize,
        _split: &Split,
    ) -> Result<Vec<NumericEntry>, String> {
        Err(format!("metric `{name}` is only written, not read back"))
    }

    fn log_metric_definition(&mut self, definition: MetricDefinition) {
        self.names
            .insert(definition.metric_id.clone(), definition.name.to_string());
    }

    fn log_epoch_summary(&mut self, _summary: EpochSummary) {}
}
