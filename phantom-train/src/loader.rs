//! A Burn `DataLoader` over preference triples whose order is a pure function of the seed and
//! the position in the run.
//!
//! Burn's learner runs "epochs"; here one epoch is one checkpoint interval of
//! `steps_per_epoch` optimizer steps, each of `accumulation` micro-batches. The triples form an
//! endless stream of passes, each pass a fresh seeded shuffle, and epoch `e` reads the next
//! `steps_per_epoch · accumulation` micro-batches of that stream. A run resumed at epoch `e`
//! therefore sees exactly the batches the uninterrupted run would have seen.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::DatasetError;
use burn::prelude::Device;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::batch::{PreferenceBatch, PreferenceItem, TripleEncoder};
use crate::data::Triple;
use crate::error::{Result, TrainError};

/// Triples plus the encoder that turns them into model inputs.
pub struct TripleSource {
    /// The triples, in file order.
    pub triples: Vec<Triple>,
    /// Tokenizer, template and image processor.
    pub encoder: TripleEncoder,
}

impl TripleSource {
    /// Encodes triple `index`, decoding its image.
    pub fn item(&self, index: usize) -> Result<PreferenceItem> {
        let triple = self
            .triples
            .get(index)
            .ok_or_else(|| TrainError::Record(format!("no record {index}")))?;
        // Errors name the record by its place in the file when it is known.
        let named = |e: &dyn std::fmt::Display| {
            let at = triple
                .location
                .map_or_else(|| format!("triple {index}"), |l| l.to_string());
            TrainError::Record(format!("{at}: {e}"))
        };
        let image = match &triple.image {
            Some(path) => Some(
                self.encoder
                    .inputs
                    .images
                    .open(path)
                    .map_err(|e| named(&e))?,
            ),
            None => None,
        };
        self.encoder
            .encode(
                &triple.question,
                &triple.chosen,
                &triple.rejected,
                image.as_ref(),
            )
            .map_err(|e| named(&e))
    }

    /// Checks every triple before training without decoding pixels: the image header is
    /// readable and the longest sequence fits the context. Returns `(index, reason)` per
    /// failing triple; the reason starts with the record's place in its file when known.
    pub fn check(&self) -> Vec<(usize, String)> {
        let processor = &self.encoder.inputs.images;
        let mut bad = Vec::new();
        for (i, t) in self.triples.iter().enumerate() {
            let at = t.location.map(|l| format!("{l}: ")).unwrap_or_default();
            let tiles = match &t.image {
                None => Vec::new(),
                Some(path) => match image::ImageReader::open(path)
                    .and_then(|r| r.with_guessed_format())
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()))
                {
                    Ok((w, h)) => vec![processor.tile_count(w, h)],
                    Err(e) => {
                        bad.push((i, format!("{at}image {}: {e}", path.display())));
                        continue;
                    }
                },
            };
            let lengths = self.encoder.prompt(&t.question, &tiles).and_then(|p| {
                let c = self.encoder.answer(&t.chosen)?.len();
                let r = self.encoder.answer(&t.rejected)?.len();
                Ok(p.len() + c.max(r))
            });
            match lengths {
                Ok(n) if n > self.encoder.max_len => bad.push((
                    i,
                    format!(
                        "{at}{n} tokens, more than the model's context of {}",
                        self.encoder.max_len
                    ),
                )),
                Ok(_) => {}
                Err(e) => bad.push((i, format!("{at}{e}"))),
            }
        }
        bad
    }
}

/// How a loader walks its triples.
#[derive(Clone)]
enum Order {
    /// Training: seeded passes, one checkpoint interval per `iter()` call; the last interval
    /// stops at `total_steps`.
    Stream {
        seed: u64,
        steps_per_epoch: usize,
        total_steps: usize,
        accumulation: usize,
        next_epoch: Arc<AtomicUsize>,
    },
    /// Validation: every triple once, in order.
    Fixed,
}

/// The loader Burn's learner pulls micro-batches from.
#[derive(Clone)]
pub struct TripleLoader {
    source: Arc<TripleSource>,
    batch_size: usize,
    order: Order,
    /// Micro-batches of each epoch this loader serves (a slice for multi-device training).
    slice: Option<Range<usize>>,
}

impl TripleLoader {
    /// A training loader starting at epoch `first_epoch` (1 for a new run, `k + 1` when
    /// resuming from checkpoint `k`).
    pub fn training(
        source: Arc<TripleSource>,
        batch_size: usize,
        accumulation: usize,
        steps_per_epoch: usize,
        total_steps: usize,
        seed: u64,
        first_epoch: usize,
    ) -> Self {
        Self {
            source,
            batch_size: batch_size.max(1),
            order: Order::Stream {
                seed,
                steps_per_epoch,
                total_steps,
                accumulation: accumulation.max(1),
                next_epoch: Arc::new(AtomicUsize::new(first_epoch.max(1))),
            },
            slice: None,
        }
    }

    /// A validation loader over every triple of `source`.
    pub fn validation(source: Arc<TripleSource>, batch_size: usize) -> Self {
        Self {
            source,
            batch_size: batch_size.max(1),
            order: Order::Fixed,
            slice: None,
        }
    }

    /// Micro-batches of a full epoch: the stride between epochs in the stream.
    fn micro_batches(&self) -> usize {
        match &self.order {
            Order::Stream {
                steps_per_epoch,
                accumulation,
                ..
            } => steps_per_epoch * accumulation,
            Order::Fixed => self.source.triples.len().div_ceil(self.batch_size),
        }
    }

    /// Micro-batches of epoch `epoch` (the last one may be short), before slicing.
    fn micro_batches_of(&self, epoch: usize) -> usize {
        match &self.order {
            Order::Stream {
                steps_per_epoch,
                total_steps,
                accumulation,
                ..
            } => {
                let start = (epoch.max(1) - 1) * steps_per_epoch;
                let end = (start + steps_per_epoch).min(*total_steps);
                end.saturating_sub(start) * accumulation
            }
            Order::Fixed => self.micro_batches(),
        }
    }

    fn range_of(&self, epoch: usize) -> Range<usize> {
        let full = 0..self.micro_batches_of(epoch);
        match &self.slice {
            Some(s) => s.start.min(full.end)..s.end.min(full.end),
            None => full,
        }
    }

    fn range(&self) -> Range<usize> {
        self.slice.clone().unwrap_or(0..self.micro_batches())
    }
}

/// Triple indices of one seeded pass over `n` triples.
pub fn pass_order(n: usize, seed: u64, pass: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ (pass as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

struct LoaderIter<'a> {
    loader: &'a TripleLoader,
    epoch: usize,
    next: usize,
    range: Range<usize>,
    pass: Option<(usize, Vec<usize>)>,
}

impl LoaderIter<'_> {
    fn index(&mut self, sample: usize) -> usize {
        let n = self.loader.source.triples.len();
        let Order::Stream { seed, .. } = &self.loader.order else {
            return sample;
        };
        let pass = sample / n;
        if self.pass.as_ref().is_none_or(|(p, _)| *p != pass) {
            self.pass = Some((pass, pass_order(n, *seed, pass)));
        }
        self.pass
            .as_ref()
            .map_or(sample % n, |(_, order)| order[sample % n])
    }

    fn batch(&mut self, micro: usize) -> Result<PreferenceBatch> {
        let b = self.loader.batch_size;
        let n = self.loader.source.triples.len();
        let indices: Vec<usize> = match &self.loader.order {
            Order::Stream { .. } => {
                let first = ((self.epoch - 1) * self.loader.micro_batches() + micro) * b;
                (first..first + b).map(|s| self.index(s)).collect()
            }
            Order::Fixed => (micro * b..((micro + 1) * b).min(n)).collect(),
        };
        let items = indices
            .into_iter()
            .map(|i| self.loader.source.item(i))
            .collect::<Result<Vec<_>>>()?;
        Ok(PreferenceBatch { items })
    }
}

impl Iterator for LoaderIter<'_> {
    type Item = Result<PreferenceBatch, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.range.end {
            return None;
        }
        let micro = self.next;
        self.next += 1;
        Some(self.batch(micro).map_err(DatasetError::new))
    }
}

impl DataLoaderIterator<PreferenceBatch> for LoaderIter<'_> {
    fn progress(&self) -> Progress {
        Progress::new(
            self.next - self.range.start,
            self.range.len(),
            Some("micro-batches".into()),
        )
    }
}

impl DataLoader<PreferenceBatch> for TripleLoader {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<PreferenceBatch> + 'a> {
        let epoch = match &self.order {
            Order::Stream { next_epoch, .. } => next_epoch.fetch_add(1, Ordering::SeqCst),
            Order::Fixed => 1,
        };
        let range = self.range_of(epoch);
        Box::new(LoaderIter {
            loader: self,
            epoch,
            next: range.start,
            range,
            pass: None,
        })
    }

    fn num_items(&self) -> usize {
        self.range().len()
    }

    fn to_device(&self, _device: &Device) -> Arc<dyn DataLoader<PreferenceBatch>> {
        // Batches stay on the host; the step builds its tensors on the model's device.
        Arc::new(self.clone())
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<PreferenceBatch>> {
        let base = self.range();
        let start = (base.start + start).min(base.end);
        let end = (base.start + end).clamp(start, base.end);
        // Each slice is iterated once per epoch, so it counts epochs on its own.
        let order = match &self.order {
            Order::Stream {
                seed,
                steps_per_epoch,
                total_steps,
                accumulation,
                next_epoch,
            } => Order::Stream {
                seed: *seed,
                steps_per_epoch: *steps_per_epoch,
                total_steps: *total_steps,
                accumulation: *accumulation,
                next_epoch: Arc::new(AtomicUsize::new(next_epoch.load(Ordering::SeqCst))),
            },
            Order::Fixed => Order::Fixed,
        };
        Arc::new(Self {
            source: self.source.clone(),
            batch_size: self.batch_size,
            order,
            slice: Some(start..end),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_are_permutations_and_differ() {
        let a = pass_order(50, 7, 0);
        let b = pass_order(50, 7, 1);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, pass_order(50, 7, 0));
    }
}
