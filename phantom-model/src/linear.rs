//! Linear layers and the token embedding, with their weights laid out for the CPU.
//!
//! Burn keeps a linear weight as `[in, out]`; the checkpoints store `[out, in]`. On Burn's CPU
//! backend (flex) the checkpoints' order is the fast one: [`crate::kernels`] streams each
//! output's weights as one contiguous row for a decode step, and the GEMM of a prompt or a
//! vision tile runs several times faster with a column-major weight. So on flex [`prepare`]
//! keeps every projection weight in `[out, in]` memory order (Burn sees a transposed view, so
//! the model code and the checkpoint keys are unchanged), and [`linear`] hands the product to
//! the kernels where they apply. A quantized weight on flex is held packed beside its
//! parameter ([`crate::packed`]) and read from there.

use burn::module::{Param, ParamId};
use burn::prelude::*;

use crate::PhantomModel;
use crate::packed::{PackedWeight, PackedWeights};

/// `y = x·W + b` with `W` `[in, out]` as Burn sees it (the checkpoints' `weight` is its
/// transpose), the same parameters as Burn's own linear layer.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[in, out]`; on flex stored `[out, in]` in memory ([`prepare`]), or a lazy stand-in
    /// for [`Linear::packed`].
    pub weight: Param<Tensor<2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// The quantized weight as the CPU kernels read it, where the loader packed it.
    #[module(skip)]
    pub packed: Option<PackedWeight>,
}

impl Linear {
    /// `layer(x)` over the last dimension of `x` ([`linear`]).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(self, x)
    }

    /// The packed weight, while the parameter still stands in for it (a mapper that
    /// replaced the parameter leaves the packed codes behind).
    fn packed_weight(&self) -> Option<&PackedWeight> {
        packed_while_lazy(self.packed.as_ref(), &self.weight)
    }
}

/// `packed` while `param` is still the lazy stand-in for it.
fn packed_while_lazy<'a>(
    packed: Option<&'a PackedWeight>,
    param: &Param<Tensor<2>>,
) -> Option<&'a PackedWeight> {
    packed.filter(|_| !param.is_initialized())
}

/// The shape of a [`Linear`]: inputs, outputs, bias.
#[derive(Clone, Copy, Debug)]
pub struct LinearConfig {
    d_input: usize,
    d_output: usize,
    bias: bool,
}

impl LinearConfig {
    /// `d_input → d_output`, with a bias.
    pub fn new(d_input: usize, d_output: usize) -> Self {
        Self {
            d_input,
            d_output,
            bias: true,
        }
    }

    /// This shape with or without a bias.
    pub fn with_bias(self, bias: bool) -> Self {
        Self { bias, ..self }
    }

    /// A layer on `device`, initialised as Burn's own (drawn on first use).
    pub fn init(self, device: &Device) -> Linear {
        let burn::nn::Linear { weight, bias } =
            burn::nn::LinearConfig::new(self.d_input, self.d_output)
                .with_bias(self.bias)
                .init(device);
        Linear {
            weight,
            bias,
            packed: None,
        }
    }
}

/// Token embeddings: rows of a `[V, d]` table, the parameters of Burn's own embedding.
#[derive(Module, Debug)]
pub struct Embedding {
    /// `[V, d]`, or a lazy stand-in for [`Embedding::packed`].
    pub weight: Param<Tensor<2>>,
    /// The quantized table as the CPU kernels read it, where the loader packed it.
    #[module(skip)]
    pub packed: Option<PackedWeight>,
}

impl Embedding {
    /// A `[vocabulary, width]` table on `device`, initialised as Burn's own.
    pub fn new(vocabulary: usize, width: usize, device: &Device) -> Self {
        let burn::nn::Embedding { weight } =
            burn::nn::EmbeddingConfig::new(vocabulary, width).init(device);
        Self {
            weight,
            packed: None,
        }
    }

    /// Rows `ids` (`[B, T]` → `[B, T, d]`).
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        #[cfg(feature = "cpu-kernels")]
        if let Some(table) = self.packed_weight() {
            let [b, t] = ids.dims();
            let flat: Vec<usize> = ids
                .to_data()
                .convert::<i64>()
                .iter::<i64>()
                .map(|id| usize::try_from(id).unwrap_or(usize::MAX))
                .collect();
            if let Some(rows) = crate::kernels::packed_gather(table, &flat, &ids.device()) {
                let d = rows.dims()[1];
                return rows.reshape([b, t, d]);
            }
        }
        burn::tensor::module::embedding(self.weight.val(), ids)
    }

    /// `[V, d]` without drawing or materializing the table.
    pub fn shape(&self) -> [usize; 2] {
        self.weight.lazy_shape().dims::<2>()
    }

    /// The packed table, while the parameter still stands in for it.
    fn packed_weight(&self) -> Option<&PackedWeight> {
        packed_while_lazy(self.packed.as_ref(), &self.weight)
    }
}

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
    if linear.packed_weight().is_some() {
        return;
    }
    let device = linear.weight.lazy_device();
    let placeholder = Param::from_tensor(Tensor::zeros([1, 1], &device));
    let weight = std::mem::replace(&mut linear.weight, placeholder);
    linear.weight = weight.map(column_major);
}

/// Lays every linear weight of `model` ([`every_linear`]) out for [`linear`] when it lives on
/// flex; elsewhere it leaves them as they are. Loading and [`PhantomModel::new`] call it.
pub fn prepare(model: &mut PhantomModel) {
    let device = model.language_model.model.embed_tokens.weight.lazy_device();
    if wants_out_in(&device) {
        every_linear(model).into_iter().for_each(relayout);
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
/// The product is always taken on `[rows, k]`: Burn's linear layer broadcasts its weight to
/// the input's rank first, which copies a weight kept in `[out, in]` order.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    // The lazy shape: asking a packed weight's stand-in for its value would unpack it.
    let n = layer.weight.lazy_shape().dims::<2>()[1];
    let x = x.reshape([rows, k]);
    let y = match quantized_product(layer, &x) {
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

/// `x · W` by the quantized kernels, for a packed weight or a quantized flex tensor (read as
/// it lies: transposing it would re-quantize it).
fn quantized_product(layer: &Linear, x: &Tensor<2>) -> Option<Tensor<2>> {
    #[cfg(feature = "cpu-kernels")]
    {
        if let Some(w) = layer.packed_weight() {
            return crate::kernels::packed_product(x, w);
        }
        crate::kernels::quantized_rows(x, &layer.weight)
    }
    #[cfg(not(feature = "cpu-kernels"))]
    {
        let _ = (layer, x);
        None
    }
}

/// Logits `hidden · Eᵀ` (`[rows, V]`) of a head tied to the embedding `E` (`[V, d]`), with the
/// table read as it is stored (packed, quantized or float).
pub fn tied_head(embedding: &Embedding, hidden: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "cpu-kernels")]
    {
        if let Some(table) = embedding.packed_weight()
            && let Some(y) = crate::kernels::packed_product(&hidden, table)
        {
            return y;
        }
        if let Some(y) = crate::kernels::quantized_table_product(&hidden, &embedding.weight) {
            return y;
        }
    }
    let embedding = embedding.weight.val();
    #[cfg(feature = "cpu-kernels")]
    if let Some(y) = crate::kernels::linear_rows(&hidden, &embedding) {
        return y;
    }
    embedding.matmul(hidden.transpose()).transpose()
}

/// Every linear layer of `model`: the vision tower's, the projector's, the decoder's (the
/// phantom modules and gates included) and an untied head's.
fn every_linear(model: &mut PhantomModel) -> Vec<&mut Linear> {
    let mut all = Vec::new();
    for layer in &mut model.vision_model.encoder.layers {
        all.extend([
            &mut layer.attn.qkv,
            &mut layer.attn.proj,
            &mut layer.mlp.fc1,
            &mut layer.mlp.fc2,
        ]);
    }
    all.extend([&mut model.vision_proj.fc1, &mut model.vision_proj.fc2]);
    let lm = &mut model.language_model;
    for layer in &mut lm.model.layers {
        let attn = &mut layer.self_attn;
        all.extend(attn.qkv.linears_mut());
        all.push(&mut attn.o_proj);
        all.extend(attn.phantom.linears_mut());
        all.extend(layer.mlp.gate_up.linears_mut());
        all.push(&mut layer.mlp.down_proj);
    }
    all.extend(lm.lm_head.as_mut());
    all
}

/// Hands each layer of `model` the packed weight its parameter stands in for (taken out of
/// `packed`, by the parameter's id), and keeps them all in the model for saving.
pub(crate) fn attach(model: &mut PhantomModel, mut packed: PackedWeights) {
    if packed.is_empty() {
        return;
    }
    let mut attached = PackedWeights::new();
    let mut hand = |id: ParamId, slot: &mut Option<PackedWeight>| {
        if let Some(w) = packed.remove(&id) {
            attached.insert(id, w.clone());
            *slot = Some(w);
        }
    };
    let embedding = &mut model.language_model.model.embed_tokens;
    hand(embedding.weight.id, &mut embedding.packed);
    for layer in every_linear(model) {
        hand(layer.weight.id, &mut layer.packed);
    }
    model.packed.extend(attached);
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use crate::quantize::{Quantization, dequantize_host, quantize_host};
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
        let embedding = Embedding {
            weight: Param::from_tensor(Tensor::<2>::from_data(
                TensorData::new(e.clone(), [v, d]),
                &device,
            )),
            packed: None,
        };
        for rows in [1, 2, 12] {
            let h = values(rows * d, 5);
            let hidden = Tensor::<2>::from_data(TensorData::new(h.clone(), [rows, d]), &device);
            let got = host(tied_head(&embedding, hidden));
            let worst = worst(&got, &x_wt(&h, rows, d, &e, v));
            assert!(worst < 1e-4, "{rows} rows: off by {worst}");
        }
    }

    #[test]
    fn a_packed_weight_stands_in_until_its_value_is_asked_for() {
        let device = Device::flex();
        let (k, n) = (96, 70);
        for scheme in [Quantization::Q8, Quantization::Q4] {
            let (codes, scales) = quantize_host(&values(n * k, 6), k, scheme);
            // `W` as Burn sees it, `[k, n]`, from the dequantized `[n, k]` rows.
            let w_nk = dequantize_host(&codes, &scales, k);
            let packed =
                PackedWeight::columns(&codes, &crate::quantize::f16_scales(&scales), n, k, scheme);
            let id = ParamId::new();
            let layer = Linear {
                weight: packed.param(id, &device),
                bias: None,
                packed: Some(packed),
            };
            let x = values(3 * k, 7);
            let input = || Tensor::<2>::from_data(TensorData::new(x.clone(), [3, k]), &device);
            let want = x_wt(&x, 3, k, &w_nk, n);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let from_packed = host(linear(&layer, input()));
            assert!(
                !layer.weight.is_initialized(),
                "{scheme}: the product unpacked the weight"
            );
            // The activations may be quantized per block: within a percent of the outputs.
            let e = worst(&from_packed, &want);
            assert!(e < 1e-2 * scale, "{scheme}: off by {e} of {scale}");
            // Asked for its value, the stand-in becomes the same weight as Burn's quantized
            // tensor, and the layer reads that instead, with the same result.
            let value = layer.weight.val();
            assert!(
                matches!(value.dtype(), burn::tensor::DType::QFloat(_)),
                "{scheme}"
            );
            let back = host(value.dequantize().transpose());
            assert_eq!(worst(&back, &w_nk), 0.0, "{scheme}: materialized values");
            assert_eq!(host(linear(&layer, input())), from_packed, "{scheme}");
        }
    }
}
