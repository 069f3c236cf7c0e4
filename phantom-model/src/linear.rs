//! Linear layers laid out for the CPU.
//!
//! Burn keeps a linear weight as `[in, out]`; the checkpoints store `[out, in]`. On Burn's CPU
//! backend (flex) the checkpoints' order is much faster: the GEMM kernel runs a product whose
//! weight is column-major several times faster (prefill and the vision tower: 5× on a 2-core
//! machine), and a matrix–vector product (a decode step) reads each output's weights as one
//! contiguous row instead of a strided column. So on a multi-threaded CPU device [`prepare`]
//! keeps every projection weight in `[out, in]` memory order (Burn sees a transposed view, so
//! the model code and the checkpoint keys are unchanged), and [`linear`] multiplies a few rows
//! as a batch of contiguous row blocks `[p, out/p, in] · xᵀ`, which flex runs one per core
//! (it runs a single matrix–vector product on one thread). Each output is the same dot product.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;

use crate::PhantomModel;

/// Rows up to which a product counts as matrix–vector work (a decode step of a few sequences).
const MAX_ROWS: usize = 4;
/// Smallest weight worth splitting (multiply-adds per row): below this flex runs even a batch
/// on one thread.
const MIN_WEIGHT: usize = 128 * 128 * 128;
/// Flex parallelises inside one product from this many multiply-adds on; below it, it runs
/// the matrices of a batch on separate threads (and above it, from four matrices on).
const FLEX_PARALLEL_OPS: usize = 192 * 192 * 192;

/// Whether `device` is a multi-threaded CPU backend that benefits (flex off the browser).
fn is_threaded_cpu(device: &Device) -> bool {
    !cfg!(target_arch = "wasm32") && format!("{device:?}").starts_with("Device<Flex") && cores() > 1
}

/// Cores of this machine, read once: the lookup touches the OS (cgroup files on Linux) and
/// every linear layer asks.
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// Row blocks to split an `[n, k]` weight into for `rows` input rows, or `None` to use one
/// plain product.
fn blocks(device: &Device, rows: usize, k: usize, n: usize) -> Option<usize> {
    if rows > MAX_ROWS || k * n < MIN_WEIGHT || !is_threaded_cpu(device) {
        return None;
    }
    let cores = cores();
    let p = if k * n / cores < FLEX_PARALLEL_OPS {
        cores
    } else {
        cores.max(4)
    };
    [p, 8, 4, 2]
        .into_iter()
        .find(|&p| n.is_multiple_of(p) && n / p >= 16)
}

/// `weight` (`[k, n]`) stored as its transpose `[n, k]` in memory, seen as `[k, n]` by Burn.
fn column_major(weight: Tensor<2>) -> Tensor<2> {
    let device = weight.device();
    Tensor::<2>::from_data(weight.transpose().into_data(), &device).transpose()
}

/// Re-lays `linear`'s weight, holding at most one extra copy of it at a time (the old weight
/// is released as the new one is built).
fn relayout(linear: &mut Linear) {
    let device = linear.weight.lazy_device();
    let placeholder = Param::from_tensor(Tensor::zeros([1, 1], &device));
    let weight = std::mem::replace(&mut linear.weight, placeholder);
    linear.weight = weight.map(column_major);
}

/// Lays the projection weights of `model` (vision tower, projector, decoder, untied head) out
/// for [`linear`] when it lives on a multi-threaded CPU device; elsewhere it leaves them as
/// they are. Loading and [`PhantomModel::new`] call it.
pub fn prepare(model: &mut PhantomModel) {
    let device = model.language_model.model.embed_tokens.weight.device();
    if !is_threaded_cpu(&device) {
        return;
    }
    for layer in &mut model.vision_model.encoder.layers {
        relayout(&mut layer.attn.qkv);
        relayout(&mut layer.attn.proj);
        relayout(&mut layer.mlp.fc1);
        relayout(&mut layer.mlp.fc2);
    }
    relayout(&mut model.vision_proj.fc1);
    relayout(&mut model.vision_proj.fc2);
    let lm = &mut model.language_model;
    for layer in &mut lm.model.layers {
        let attn = &mut layer.self_attn;
        for l in [
            &mut attn.q_proj,
            &mut attn.k_proj,
            &mut attn.v_proj,
            &mut attn.qkv_proj,
        ]
        .into_iter()
        .flatten()
        {
            relayout(l);
        }
        relayout(&mut attn.o_proj);
        let mlp = &mut layer.mlp;
        for l in [&mut mlp.gate_proj, &mut mlp.up_proj, &mut mlp.gate_up_proj]
            .into_iter()
            .flatten()
        {
            relayout(l);
        }
        relayout(&mut mlp.down_proj);
    }
    if let Some(head) = &mut lm.lm_head {
        relayout(head);
    }
}

/// `[n, k] · x` for `x` of `rows` rows (`[rows, k]`), as `p` contiguous row blocks; `[rows, n]`.
fn blocked_product(weight_t: Tensor<2>, x: Tensor<2>, p: usize) -> Tensor<2> {
    let [n, k] = weight_t.dims();
    let rows = x.dims()[0];
    weight_t
        .reshape([p, n / p, k])
        .matmul(x.transpose().unsqueeze::<3>()) // [p, n/p, rows]
        .reshape([n, rows])
        .transpose()
}

/// `layer.forward(x)`; matrix–vector products run as row blocks on every core.
///
/// The product is always taken on `[rows, k]`: Burn's `Linear` broadcasts its weight to the
/// input's rank first, which copies a weight kept in `[out, in]` order.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    let weight = layer.weight.val();
    let n = weight.dims()[1];
    let x = x.reshape([rows, k]);
    let y = match blocks(&weight.device(), rows, k, n) {
        Some(p) => blocked_product(weight.transpose(), x, p),
        None => x.matmul(weight),
    };
    let y = match &layer.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// Logits `hidden · Eᵀ` (`[rows, V]`) of a head tied to the embedding `E` (`[V, d]`), computed
/// as `(E · hiddenᵀ)ᵀ` so that the embedding stays contiguous and only the small result is
/// transposed; matrix–vector products run as row blocks of `E` on every core.
pub fn tied_head(embedding: Tensor<2>, hidden: Tensor<2>) -> Tensor<2> {
    let [v, d] = embedding.dims();
    let [rows, _] = hidden.dims();
    match blocks(&embedding.device(), rows, d, v) {
        Some(p) => blocked_product(embedding, hidden, p),
        None => embedding.matmul(hidden.transpose()).transpose(),
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::nn::LinearConfig;

    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `x · w + b` in f64 on the host, `x` `[rows, k]`, `w` `[k, n]`.
    fn reference(x: &[f32], w: &[f32], b: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[i * n + j]))
                    .sum();
                out[r * n + j] = (dot + f64::from(b[j])) as f32;
            }
        }
        out
    }

    /// Largest absolute difference.
    fn worst(got: &[f32], want: &[f32]) -> f32 {
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, |m, d| {
                if m.is_nan() || d.is_nan() {
                    f32::NAN
                } else {
                    m.max(d)
                }
            })
    }

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn blocked_products_equal_the_plain_product() {
        let device = Device::flex();
        // Large enough to be split on a multi-core machine; the first two dims give 2 rows.
        let (k, n) = (256, 8192);
        assert!(k * n >= MIN_WEIGHT);
        let w = values(k * n, 1);
        let b = values(n, 2);
        let mut layer = LinearConfig::new(k, n).init(&device);
        layer.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(w.clone(), [k, n]),
            &device,
        ));
        layer.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(b.clone(), [n]),
            &device,
        )));
        for relaid in [false, true] {
            if relaid {
                relayout(&mut layer);
            }
            for rows in [1, 3, 9] {
                let x = values(rows * k, 3 + rows as u64);
                let input =
                    Tensor::<3>::from_data(TensorData::new(x.clone(), [1, rows, k]), &device);
                let got = host(linear(&layer, input).reshape([rows, n]));
                let worst = worst(&got, &reference(&x, &w, &b, rows, k, n));
                assert!(worst < 1e-4, "relaid {relaid}, {rows} rows: off by {worst}");
            }
        }
    }

    #[test]
    fn tied_head_blocks_equal_the_plain_product() {
        let device = Device::flex();
        let (v, d) = (8192, 256);
        let e = values(v * d, 4);
        let embedding = Tensor::<2>::from_data(TensorData::new(e.clone(), [v, d]), &device);
        // Eᵀ as a [d, v] host matrix for the reference.
        let mut et = vec![0.0f32; d * v];
        for i in 0..v {
            for j in 0..d {
                et[j * v + i] = e[i * d + j];
            }
        }
        for rows in [1, 2] {
            let h = values(rows * d, 5);
            let hidden = Tensor::<2>::from_data(TensorData::new(h.clone(), [rows, d]), &device);
            let got = host(tied_head(embedding.clone(), hidden));
            let worst = worst(&got, &reference(&h, &et, &vec![0.0; v], rows, d, v));
            assert!(worst < 1e-4, "{rows} rows: off by {worst}");
        }
    }

    #[test]
    fn blocks_split_only_small_batches_of_large_weights() {
        let device = Device::flex();
        let threaded = std::thread::available_parallelism().map_or(1, usize::from) > 1;
        let p = blocks(&device, 1, 896, 4864);
        assert_eq!(p.is_some(), threaded);
        if let Some(p) = p {
            assert_eq!(4864 % p, 0);
        }
        assert_eq!(
            blocks(&device, 128, 896, 4864),
            None,
            "prefill is one product"
        );
        assert_eq!(
            blocks(&device, 1, 64, 64),
            None,
            "small weights are one product"
        );
    }
}
