//! The KV cache of a batch of sequences: per layer the widened keys and values, and each
//! sequence's phantom vectors; per row the key padding mask and the next RoPE position.

use burn::prelude::*;

use crate::phantom::PhantomVectors;

/// One layer's cached state.
#[derive(Clone, Debug)]
pub struct LayerCache {
    /// Widened keys `[B, H_kv, S, 2d]` (post-RoPE plain half ‖ phantom half).
    pub k: Tensor<4>,
    /// Widened values `[B, H_kv, S, 2d]`.
    pub v: Tensor<4>,
    /// The phantom vectors taken at prefill.
    pub phantom: PhantomVectors,
}

/// The cache of a batch: everything a decode step needs to continue the sequences.
#[derive(Clone, Debug)]
pub struct KvCache {
    /// Per layer, `None` until the prefill has run.
    pub layers: Vec<Option<LayerCache>>,
    /// Per row, whether each cached key is a real token (false on left padding).
    pub key_mask: Vec<Vec<bool>>,
    /// Per row, the RoPE position of the next real token.
    pub next_position: Vec<i64>,
}

impl KvCache {
    /// An empty cache for `batch` rows of a model with `layers` decoder layers.
    pub fn new(layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![None; layers],
            key_mask: vec![Vec::new(); batch],
            next_position: vec![0; batch],
        }
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.key_mask.len()
    }

    /// Keys cached so far (the same for every row).
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the rows listed in `rows` (in that order, repeats allowed): beam search reorders
    /// its hypotheses this way, and finished rows can be dropped.
    pub fn select_rows(&mut self, rows: &[usize]) {
        let Some(device) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|layer| layer.k.device())
        else {
            self.key_mask = rows.iter().map(|&r| self.key_mask[r].clone()).collect();
            self.next_position = rows.iter().map(|&r| self.next_position[r]).collect();
            return;
        };
        let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [rows.len()]), &device);
        for layer in self.layers.iter_mut().flatten() {
            layer.k = layer.k.clone().select(0, index.clone());
            layer.v = layer.v.clone().select(0, index.clone());
            layer.phantom = layer.phantom.select_rows(index.clone());
        }
        self.key_mask = rows.iter().map(|&r| self.key_mask[r].clone()).collect();
        self.next_position = rows.iter().map(|&r| self.next_position[r]).collect();
    }
}
