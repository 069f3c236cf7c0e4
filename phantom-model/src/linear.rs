//! Linear layers, with their weights laid out for the CPU.
//!
//! Burn keeps a linear weight as `[in, out]`; the checkpoints store `[out, in]`. On Burn's CPU
//! backend (flex) the checkpoints' order is the fast one: [`crate::kernels`] streams each
//! output's weights as one contiguous row for a decode step, and the GEMM of a prompt or a
//! vision tile runs several times faster with a column-major weight. So on flex [`prepare`]
//! keeps every projection weight in `[out, in]` memory order (Burn sees a transposed view, so
//! the model code and the checkpoint keys are unchanged), and [`linear`] hands the product to
//! the kernels where they apply.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;

use crate::PhantomModel;

/// Whether `device` is the flex CPU backend, whose weights [`prepare`] lays out `[out, in]`.
fn wants_out_in(device: &Device) -> bool {
    #[cfg(feature = "cpu-kernels")]
    {
        crate::kernels::is_flex(device)
    }
    #[cfg(not(feature = "cpu-kernels"))]
    {
        let _ = device;
        false
    }
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
/// for [`linear`] when it lives on flex; elsewhere it leaves them as they are. Loading and
/// [`PhantomModel::new`] call it.
pub fn prepare(model: &mut PhantomModel) {
    let device = model.language_model.model.embed_tokens.weight.lazy_device();
    if !wants_out_in(&device) {
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
        attn.qkv.linears_mut().into_iter().for_each(relayout);
        relayout(&mut attn.o_proj);
        let mlp = &mut layer.mlp;
        mlp.gate_up.linears_mut().into_iter().for_each(relayout);
        relayout(&mut mlp.down_proj);
    }
    if let Some(head) = &mut lm.lm_head {
        relayout(head);
    }
}

/// `x · wᵀ` for `x` `[rows, k]` and `w_nk` seen as `[n, k]`: the CPU kernels where they apply,
/// Burn's matmul otherwise.
fn product(x: Tensor<2>, w_nk: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "cpu-kernels")]
    if let Some(y) = crate::kernels::linear_rows(&x, &w_nk) {
        return y;
    }
    x.matmul(w_nk.transpose())
}

/// `layer.forward(x)`, through the CPU kernels where they apply.
///
/// The product is always taken on `[rows, k]`: Burn's `Linear` broadcasts its weight to the
/// input's rank first, which copies a weight kept in `[out, in]` order.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    let n = layer.weight.dims()[1];
    let x = x.reshape([rows, k]);
    // A quantized weight is read as it lies: transposing it would re-quantize it. It is
    // borrowed, not taken by `val()`: cloning a quantized flex tensor copies its scales.
    #[cfg(feature = "cpu-kernels")]
    let quantized = crate::kernels::quantized_rows(&x, &layer.weight);
    #[cfg(not(feature = "cpu-kernels"))]
    let quantized: Option<Tensor<2>> = None;
    let y = match quantized {
        Some(y) => y,
        // `val()`: the weight with its reparameterization (a LoRA adapter) applied.
        None => product(x, layer.weight.val().transpose()),
    };
    let y = match &layer.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// Logits `hidden · Eᵀ` (`[rows, V]`) of a head tied to the embedding `E` (`[V, d]`), with the
/// embedding read as it is stored (quantized or float).
pub fn tied_head(embedding: &Param<Tensor<2>>, hidden: Tensor<2>) -> Tensor<2> {
    // Borrowed while quantized (see `linear`).
    #[cfg(feature = "cpu-kernels")]
    if let Some(y) = crate::kernels::quantized_table_product(&hidden, embedding) {
        return y;
    }
    let embedding = embedding.val();
    #[cfg(feature = "cpu-kernels")]
    if let Some(y) = crate::kernels::linear_rows(&hidden, &embedding) {
        return y;
    }
    embedding.matmul(hidden.transpose()).transpose()
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::nn::LinearConfig;

    use super::*;
    use crate::testing::{values, worst, x_wt};

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

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn kernel_products_equal_the_plain_product() {
        let device = Device::flex();
        let (k, n) = (256, 520);
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
            // 1–8 rows go through the kernels once relaid; 9 and 40 through the GEMM.
            for rows in [1, 3, 8, 9, 40] {
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
    fn tied_head_equals_the_plain_product() {
        let device = Device::flex();
        let (v, d) = (1000, 64);
        let e = values(v * d, 4);
        let embedding = Param::from_tensor(Tensor::<2>::from_data(
            TensorData::new(e.clone(), [v, d]),
            &device,
        ));
        for rows in [1, 2, 12] {
            let h = values(rows * d, 5);
            let hidden = Tensor::<2>::from_data(TensorData::new(h.clone(), [rows, d]), &device);
            let got = host(tied_head(&embedding, hidden));
            let worst = worst(&got, &x_wt(&h, rows, d, &e, v));
            assert!(worst < 1e-4, "{rows} rows: off by {worst}");
        }
    }
}
