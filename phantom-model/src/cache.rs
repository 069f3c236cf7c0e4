//! The KV cache of a batch of sequences: per layer the widened keys and values, and each
//! sequence's phantom vectors; per row the key padding mask and the next RoPE position.
//!
//! Keys and values live in buffers with room to spare: a step writes its tokens in place, so
//! decoding does not copy the whole cache on every token. A full buffer doubles (one copy,
//! amortised over as many steps as it held).

use burn::prelude::*;

use crate::phantom::PhantomVectors;

/// Positions a new buffer has room for beyond what it must hold, at the least.
const HEADROOM: usize = 256;

/// One layer's cached state.
#[derive(Clone, Debug)]
pub struct LayerCache {
    /// Widened keys `[B, H_kv, capacity, 2d]` (post-RoPE plain half ‖ phantom half); the first
    /// `len` positions are in use.
    k: Tensor<4>,
    /// Widened values `[B, H_kv, capacity, 2d]`.
    v: Tensor<4>,
    /// Positions in use.
    len: usize,
    /// The phantom vectors taken at prefill.
    pub phantom: PhantomVectors,
}

impl LayerCache {
    /// A cache holding `k` and `v` (`[B, H_kv, T, 2d]`), with room for `reserve` positions in
    /// all when given (at least `T`), else for `T` plus some headroom.
    pub fn new(k: Tensor<4>, v: Tensor<4>, phantom: PhantomVectors, reserve: usize) -> Self {
        let [b, h, t, w] = k.dims();
        // A known length (a generation, a training step) gets exactly its room.
        let capacity = if reserve > 0 {
            reserve.max(t)
        } else {
            t + HEADROOM
        };
        let buffer = |like: &Tensor<4>| {
            Tensor::<4>::zeros([b, h, capacity, w], (&like.device(), like.dtype()))
        };
        Self {
            k: buffer(&k),
            v: buffer(&v),
            len: 0,
            phantom,
        }
        .append(k, v)
    }

    /// Appends `[B, H_kv, t, 2d]` keys and values, growing the buffers if they are full.
    ///
    /// Takes the cache by value: the buffers are then not shared while they are written, so
    /// the write happens in place.
    pub fn append(self, k: Tensor<4>, v: Tensor<4>) -> Self {
        let t = k.dims()[2];
        let end = self.len + t;
        let mut cache = if end > self.capacity() {
            let capacity = (2 * self.capacity()).max(end + HEADROOM);
            self.grow(capacity)
        } else {
            self
        };
        let [b, h, _, w] = k.dims();
        let range = [0..b, 0..h, cache.len..end, 0..w];
        cache.k = cache.k.slice_assign(range.clone(), k);
        cache.v = cache.v.slice_assign(range, v);
        cache.len = end;
        cache
    }

    /// Keys in use, `[B, H_kv, len, 2d]` (a view of the buffer).
    pub fn keys(&self) -> Tensor<4> {
        self.k.clone().narrow(2, 0, self.len)
    }

    /// Values in use, `[B, H_kv, len, 2d]`.
    pub fn values(&self) -> Tensor<4> {
        self.v.clone().narrow(2, 0, self.len)
    }

    /// The whole key and value buffers, `[B, H_kv, capacity, 2d]` each; the first
    /// [`LayerCache::len`] positions are in use.
    pub fn buffers(&self) -> (&Tensor<4>, &Tensor<4>) {
        (&self.k, &self.v)
    }

    /// Positions in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// Forgets the positions from `len` on (the buffers keep their size).
    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The same cache in buffers of `capacity` positions.
    fn grow(self, capacity: usize) -> Self {
        let [b, h, _, w] = self.k.dims();
        let len = self.len;
        let resize = |old: Tensor<4>| {
            let fresh = Tensor::<4>::zeros([b, h, capacity, w], (&old.device(), old.dtype()));
            fresh.slice_assign([0..b, 0..h, 0..len, 0..w], old.narrow(2, 0, len))
        };
        Self {
            k: resize(self.k),
            v: resize(self.v),
            len,
            phantom: self.phantom,
        }
    }

    /// Keeps the batch rows listed in `index` (in that order, repeats allowed).
    fn select_rows(&mut self, index: Tensor<1, Int>) {
        self.k = self.k.clone().select(0, index.clone());
        self.v = self.v.clone().select(0, index.clone());
        self.phantom = self.phantom.select_rows(index);
    }
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
    /// Positions the layers' buffers are first sized for (0: what the prefill needs plus some
    /// headroom).
    pub reserve: usize,
}

impl KvCache {
    /// An empty cache for `batch` rows of a model with `layers` decoder layers.
    pub fn new(layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![None; layers],
            key_mask: vec![Vec::new(); batch],
            next_position: vec![0; batch],
            reserve: 0,
        }
    }

    /// Sizes the buffers for `positions` in all (prompt plus new tokens), so that a generation
    /// of known length never grows them. Takes effect at the prefill.
    pub fn reserve(&mut self, positions: usize) {
        self.reserve = positions;
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

    /// Whether some row has padding among its cached keys.
    pub fn has_padding(&self) -> bool {
        self.key_mask
            .iter()
            .any(|row| row.iter().any(|&real| !real))
    }

    /// One cache holding the rows of every cache in `caches`, in order: each is left-padded
    /// (with hidden positions) to the longest, so that rows of different lengths decode
    /// together. Every cache must have run its prefill.
    ///
    /// # Errors
    ///
    /// When a cache has not run its prefill, or the caches come from different models.
    pub fn concat(caches: &[&KvCache]) -> crate::Result<KvCache> {
        let bad = |why: String| Err(crate::PhantomError::Input(why));
        let Some(first) = caches.first() else {
            return bad("no cache to join".into());
        };
        let layers = first.layers.len();
        let len = caches.iter().map(|c| c.len()).max().unwrap_or(0);
        if caches
            .iter()
            .any(|c| c.layers.len() != layers || c.layers.iter().any(Option::is_none))
        {
            return bad(
                "only caches of the same model that ran their prefill can be joined".into(),
            );
        }
        let reserve = caches.iter().map(|c| c.reserve).max().unwrap_or(0);
        let mut joined = KvCache::new(layers, 0);
        joined.reserve = reserve;
        for layer in 0..layers {
            let mut keys = Vec::with_capacity(caches.len());
            let mut values = Vec::with_capacity(caches.len());
            let mut phantoms = Vec::with_capacity(caches.len());
            for cache in caches {
                let Some(l) = &cache.layers[layer] else {
                    return bad("a cache lost a layer".into());
                };
                let pad = len - l.len();
                let left = |t: Tensor<4>| {
                    if pad == 0 {
                        return t;
                    }
                    let [b, h, _, w] = t.dims();
                    let zeros = Tensor::<4>::zeros([b, h, pad, w], (&t.device(), t.dtype()));
                    Tensor::cat(vec![zeros, t], 2)
                };
                keys.push(left(l.keys()));
                values.push(left(l.values()));
                phantoms.push(l.phantom.clone());
            }
            let phantom = PhantomVectors::cat(phantoms);
            let k = Tensor::cat(keys, 0);
            let v = Tensor::cat(values, 0);
            joined.layers[layer] = Some(LayerCache::new(k, v, phantom, reserve));
        }
        for cache in caches {
            let pad = len - cache.len();
            for (mask, &next) in cache.key_mask.iter().zip(&cache.next_position) {
                let mut row = vec![false; pad];
                row.extend_from_slice(mask);
                joined.key_mask.push(row);
                joined.next_position.push(next);
            }
        }
        Ok(joined)
    }

    /// Drops the leading positions that every row holds as padding (left behind when the
    /// longest rows of a joined batch have left it), when there are at least `min` of them.
    pub fn trim_common_padding(&mut self, min: usize) {
        let common = self
            .key_mask
            .iter()
            .map(|row| row.iter().take_while(|&&real| !real).count())
            .min()
            .unwrap_or(0);
        if common < min.max(1) {
            return;
        }
        for row in &mut self.key_mask {
            row.drain(..common);
        }
        for layer in self.layers.iter_mut() {
            if let Some(l) = layer.take() {
                let len = l.len();
                let k = l.keys().narrow(2, common, len - common);
                let v = l.values().narrow(2, common, len - common);
                *layer = Some(LayerCache::new(k, v, l.phantom, self.reserve));
            }
        }
    }

    /// Forgets every cached position from `len` on, keeping the phantom vectors taken at the
    /// prefill: the rows continue as if only their first `len` positions had been fed.
    ///
    /// # Errors
    ///
    /// When a row would keep no real token: its phantom token would be gone.
    pub fn truncate(&mut self, len: usize) -> crate::Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        if let Some(row) = self
            .key_mask
            .iter()
            .position(|row| !row[..len].contains(&true))
        {
            return Err(crate::PhantomError::Input(format!(
                "cannot truncate the cache to {len} positions: row {row} would keep no real token"
            )));
        }
        for (row, next) in self.key_mask.iter_mut().zip(&mut self.next_position) {
            row.truncate(len);
            *next = row.iter().filter(|&&real| real).count() as i64;
        }
        for layer in self.layers.iter_mut().flatten() {
            layer.truncate(len);
        }
        Ok(())
    }

    /// Keeps the rows listed in `rows` (in that order, repeats allowed): beam search reorders
    /// its hypotheses this way, and finished rows can be dropped.
    pub fn select_rows(&mut self, rows: &[usize]) {
        if let Some(device) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|layer| layer.k.device())
        {
            let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let index = Tensor::<1, Int>::from_data(TensorData::new(index, [rows.len()]), &device);
            for layer in self.layers.iter_mut().flatten() {
                layer.select_rows(index.clone());
            }
        }
        self.key_mask = rows.iter().map(|&r| self.key_mask[r].clone()).collect();
        self.next_position = rows.iter().map(|&r| self.next_position[r]).collect();
    }
}
