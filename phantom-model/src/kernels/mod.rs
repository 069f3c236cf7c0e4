//! CPU kernels for the products that dominate a Phantom model on Burn's flex backend.
//!
//! Decoding a token multiplies a few activation rows by every weight of the model once, so its
//! speed is the speed at which the weights stream from memory. [`dot`] reads a weight stored
//! row-major as `[out, in]` (the checkpoints' order) in its own precision — f32, f16 or bf16 —
//! widens it in registers, accumulates in f32 and splits the output rows over the cores. Larger
//! batches (a prompt, the vision tower) run a register-blocked GEMM ([`gemm`]) that widens the
//! weight into its packed blocks, never as a whole. On processors with AVX512-BF16, bf16
//! weights are multiplied by its pair products instead ([`dpbf16`]), their activations in
//! bf16.
//!
//! [`linear_rows`] is the entry point: it works on flex tensors (not autodiff ones, whose
//! products must be recorded) and answers `None` for anything else, so callers fall back to
//! Burn's matmul.

pub mod activations;
pub mod attend;
pub mod dot;
pub mod dpbf16;
pub mod gemm;
pub mod pointwise;
#[cfg(feature = "threads")]
mod pool;
pub mod quant;
pub mod quant_rows;
#[cfg(target_arch = "x86_64")]
pub mod vnni;

use burn::prelude::*;
use burn::tensor::DType;
use burn_flex::{Flex, FlexTensor};
use half::{bf16, f16};

pub use dot::MAX_ROWS;

use crate::packed::{Blocks, Codes, PackedWeight, checkpoint_order};
use crate::quantize::{BLOCK, Scale};

/// Threads the kernels split work over.
fn threads() -> usize {
    #[cfg(feature = "threads")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "threads"))]
    {
        1
    }
}

/// Runs `f(index, chunk)` over the `chunk`-sized pieces of `data`, on every core when threads
/// are compiled in.
fn for_each_chunk<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let chunk = chunk.max(1);
    #[cfg(feature = "threads")]
    {
        /// The start of `data`, shared by the tasks, each of which writes its own chunk.
        struct Start<T>(*mut T);
        // SAFETY: the tasks write disjoint chunks, each claimed by one task, and `T: Send`.
        unsafe impl<T: Send> Sync for Start<T> {}
        let len = data.len();
        let start = Start(data.as_mut_ptr());
        let start = &start;
        pool::run(threads(), len.div_ceil(chunk), &move |i| {
            let from = i * chunk;
            // SAFETY: chunk `i` lies within `data`, and no other task touches it.
            let c =
                unsafe { std::slice::from_raw_parts_mut(start.0.add(from), chunk.min(len - from)) };
            f(i, c);
        });
    }
    #[cfg(not(feature = "threads"))]
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        f(i, c);
    }
}

/// Runs `f` on one of rayon's worker threads (on this thread without threads): Burn's flex
/// ops split their work with rayon, and a caller outside rayon's pool would hand each op over
/// and sleep until it is done, paying a wake-up per op. (The kernels' own products run on
/// [`pool`], whose caller takes part in them.)
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "threads")]
    {
        rayon::scope(|_| f())
    }
    #[cfg(not(feature = "threads"))]
    {
        f()
    }
}

/// Runs `f(i)` for `i` in `0..count`, on every core when threads are compiled in.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn for_each_index(count: usize, f: impl Fn(usize) + Sync + Send) {
    #[cfg(feature = "threads")]
    pool::run(threads(), count, &f);
    #[cfg(not(feature = "threads"))]
    (0..count).for_each(f);
}

/// Whether `device` is a plain (not autodiff) flex device, the one these kernels serve.
pub fn is_flex(device: &Device) -> bool {
    matches!(device.as_dispatch(), burn_dispatch::DispatchDevice::Flex(_))
}

/// The contiguous values of a flex tensor, as a slice of its storage.
fn contiguous_values<E: burn::tensor::Element + bytemuck::Pod>(t: &FlexTensor) -> Option<&[E]> {
    let layout = t.layout();
    if !layout.is_contiguous() {
        return None;
    }
    let start = layout.start_offset();
    t.storage::<E>().get(start..start + layout.num_elements())
}

/// `t` with its values contiguous in memory (itself when they already are).
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The activations `[m, k]` as f32 values.
fn activations(x: FlexTensor) -> Option<Vec<f32>> {
    let x = contiguous(x);
    Some(match x.dtype() {
        DType::F32 => contiguous_values::<f32>(&x)?.to_vec(),
        DType::BF16 => contiguous_values::<bf16>(&x)?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        DType::F16 => contiguous_values::<f16>(&x)?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        _ => return None,
    })
}

/// `x · wᵀ` for `x` `[m, k]` and a weight `w_nk` that Burn sees as `[n, k]` and that is stored
/// row-major in that order, on a flex device; `[m, n]` in `x`'s dtype. Up to [`MAX_ROWS`]
/// rows stream the weight once ([`dot`]); more run the blocked product ([`gemm`]); a bf16
/// weight goes to the pair products where the processor has them ([`dpbf16`]). `None`
/// where the kernels do not apply: another device, an autodiff tensor, a strided weight or an
/// unsupported dtype.
pub fn linear_rows(x: &Tensor<2>, w_nk: &Tensor<2>) -> Option<Tensor<2>> {
    if !is_flex(&x.device()) || !is_flex(&w_nk.device()) {
        return None;
    }
    let [m, k] = x.dims();
    let [n, k_w] = w_nk.dims();
    if k != k_w {
        return None;
    }
    let weight_dtype = w_nk.dtype();
    let out_dtype = x.dtype();
    let w = w_nk.clone().try_into_primitive::<Flex>().ok()?;
    // The weight must already sit row-major as [n, k]: the kernels never copy a weight.
    if !w.is_contiguous() {
        return None;
    }
    let x = contiguous(x.clone().try_into_primitive::<Flex>().ok()?);
    if let Some(y) = pair_product(&x, &w, m, k, n) {
        return Some(flex_tensor(y, [m, n], out_dtype));
    }
    let xs = activations(x)?;
    let y = match weight_dtype {
        DType::F32 => product(&xs, m, k, contiguous_values::<f32>(&w)?, n),
        DType::BF16 => product(&xs, m, k, contiguous_values::<bf16>(&w)?, n),
        DType::F16 => product(&xs, m, k, contiguous_values::<f16>(&w)?, n),
        _ => return None,
    };
    Some(flex_tensor(y, [m, n], out_dtype))
}

/// `x · wᵀ` (`x` `[m, k]`, `w` `[n, k]`, contiguous) by the AVX512-BF16 pair products, for a
/// bf16 weight on a processor that has them. Activations in f32 are rounded to bf16 first, as
/// a model computing in bf16 throughout (the official code, PyTorch) rounds them; the sums
/// stay in f32.
fn pair_product(x: &FlexTensor, w: &FlexTensor, m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    if w.dtype() != DType::BF16 || !dpbf16::available() {
        return None;
    }
    let rounded: Vec<bf16>;
    let xs = match x.dtype() {
        DType::BF16 => contiguous_values::<bf16>(x)?,
        DType::F32 => {
            rounded = contiguous_values::<f32>(x)?
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            &rounded
        }
        _ => return None,
    };
    let ws = contiguous_values::<bf16>(w)?;
    if m <= MAX_ROWS {
        dpbf16::matvec(xs, m, k, ws, n)
    } else {
        gemm::matmul_bf16(xs, m, k, ws, n)
    }
}

/// A flex tensor of `values` in `dtype`.
fn flex_tensor(values: Vec<f32>, shape: [usize; 2], dtype: DType) -> Tensor<2> {
    let mut data = TensorData::new(values, shape);
    if dtype != DType::F32 {
        data = data.convert_dtype(dtype);
    }
    Tensor::from_primitive::<Flex>(FlexTensor::from_data(data))
}

/// The flex quantized tensor behind `w` (codes row-major as Burn sees `w`, one scale per block
/// in the blocks' row-major order) and how its blocks lie; `None` for any other device or
/// scheme.
fn quantized_codes(w: &Tensor<2>) -> Option<(burn_flex::FlexQTensor, Blocks)> {
    use burn_dispatch::{BackendTensor, DispatchKindConversion, DispatchTensor};
    if !is_flex(&w.device()) {
        return None;
    }
    let [rows, cols] = w.dims();
    let DType::QFloat(scheme) = w.dtype() else {
        return None;
    };
    if scheme.tensor_scale().is_some() {
        return None;
    }
    // Burn drops leading unit dimensions of a block size: `as_dim` restores them.
    let blocks = match scheme.block_size()?.as_dim::<2>() {
        [b, 1] if b as usize == BLOCK && rows.is_multiple_of(BLOCK) => Blocks::DownColumns,
        [1, b] if b as usize == BLOCK && cols.is_multiple_of(BLOCK) => Blocks::AlongRows,
        _ => return None,
    };
    let dispatch = w.clone().into_dispatch();
    let BackendTensor::Quantized(q) =
        <DispatchTensor as DispatchKindConversion<Flex>>::try_into_backend(dispatch).ok()?
    else {
        return None;
    };
    let codes = contiguous_values::<i8>(q.tensor())?;
    if codes.len() != rows * cols || q.scales().len() != rows * cols / BLOCK {
        return None;
    }
    Some((q, blocks))
}

/// `x · w` for `x` `[m, k]` and a quantized weight `w_kn` seen as `[k, n]` and stored so on a
/// flex device, with blocks of 32 inputs down each column; `[m, n]` in `x`'s dtype. `None`
/// for any other device, layout or scheme.
pub fn quantized_rows(x: &Tensor<2>, w_kn: &Tensor<2>) -> Option<Tensor<2>> {
    quantized_tensor_product(x, w_kn, Blocks::DownColumns)
}

/// `x · tᵀ` for `x` `[m, k]` and a quantized table `t_nk` `[n, k]` with blocks along its rows:
/// the logits of a head tied to a quantized embedding, `[m, n]` in `x`'s dtype. `None` for
/// any other device, layout or scheme.
pub fn quantized_table_product(x: &Tensor<2>, t_nk: &Tensor<2>) -> Option<Tensor<2>> {
    quantized_tensor_product(x, t_nk, Blocks::AlongRows)
}

/// The product of `x` `[m, k]` with the quantized flex tensor `w` laid out as `blocks` says.
fn quantized_tensor_product(x: &Tensor<2>, w: &Tensor<2>, blocks: Blocks) -> Option<Tensor<2>> {
    let (q, stored) = quantized_codes(w)?;
    if stored != blocks {
        return None;
    }
    let codes = contiguous_values::<i8>(q.tensor())?;
    quantized_product(x, Codes::Bytes(codes), q.scales(), w.dims(), blocks)
}

/// The product of `x` `[m, k]` with a packed weight: `x · W` for a linear weight (`[k, n]`,
/// blocks down the columns), `x · Tᵀ` for a table (`[n, k]`, blocks along the rows); `[m, n]`
/// in `x`'s dtype. `None` off flex or for mismatched widths.
pub fn packed_product(x: &Tensor<2>, w: &PackedWeight) -> Option<Tensor<2>> {
    quantized_product(x, w.codes(), w.scales(), w.shape(), w.blocks())
}

/// The product of `x` `[m, k]` with the codes and scales of a `[rows, cols]` matrix laid out
/// as `blocks` says (`[k, n]` down columns, `[n, k]` along rows), by that layout's kernels.
fn quantized_product<S: Scale>(
    x: &Tensor<2>,
    codes: Codes<'_>,
    scales: &[S],
    [rows, cols]: [usize; 2],
    blocks: Blocks,
) -> Option<Tensor<2>> {
    if !is_flex(&x.device()) {
        return None;
    }
    let [m, k] = x.dims();
    let (k_w, n) = match blocks {
        Blocks::DownColumns => (rows, cols),
        Blocks::AlongRows => (cols, rows),
    };
    let count = codes.count();
    if k != k_w || count != rows * cols || scales.len() * BLOCK != count {
        return None;
    }
    let out_dtype = x.dtype();
    let xs = activations(x.clone().try_into_primitive::<Flex>().ok()?)?;
    let y = match blocks {
        Blocks::DownColumns => quant::product(&xs, m, k, codes, scales, n),
        Blocks::AlongRows => quant_rows::product(&xs, m, k, codes, scales, n),
    };
    Some(flex_tensor(y, [m, n], out_dtype))
}

/// Rows `ids` of a packed table `[n, k]` (blocks along its rows), dequantized to f32
/// (`[ids.len(), k]`) on `device`: an embedding lookup. `None` off flex, for a linear weight,
/// or for an id not below `n`.
pub fn packed_gather(t: &PackedWeight, ids: &[usize], device: &Device) -> Option<Tensor<2>> {
    if !is_flex(device) || t.blocks() != Blocks::AlongRows {
        return None;
    }
    let [_, k] = t.shape();
    let rows = quant_rows::gather(t.codes(), t.scales(), k, ids)?;
    Some(flex_tensor(rows, [ids.len(), k], DType::F32))
}

/// The codes and block scales of a quantized flex weight in the checkpoint's order, exactly as
/// stored: `[n, k]` and `[n, k / 32]` for a linear weight seen as `[k, n]`, the table as it
/// lies for an embedding.
pub fn quantized_parts(w: &Tensor<2>) -> Option<(Vec<i8>, Vec<f32>)> {
    let (q, blocks) = quantized_codes(w)?;
    let codes = contiguous_values::<i8>(q.tensor())?;
    Some(checkpoint_order(codes, q.scales(), w.dims(), blocks))
}

fn product<W: dot::Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    if m <= MAX_ROWS {
        dot::matvec(x, m, k, w, n)
    } else {
        gemm::matmul(x, m, k, w, n)
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use crate::quantize::{Quantization, dequantize_host, quantize_host};
    use crate::testing::{values, worst, x_wt};

    #[test]
    fn a_quantized_table_is_gathered_and_multiplied_by_the_kernels() {
        let device = Device::flex();
        let (n, k) = (300, 96);
        for scheme in [Quantization::Q8, Quantization::Q4] {
            let (codes, scales) = quantize_host(&values(n * k, 7), k, scheme);
            let dense = dequantize_host(&codes, &scales, k);
            let stored = std::borrow::Cow::Owned(scheme.pack(&codes));
            let packed =
                PackedWeight::rows(stored, crate::quantize::f16_scales(&scales), n, k, scheme);
            // The same table as Burn's quantized tensor, as a packed weight turns into when
            // something asks for its value.
            let table = Tensor::<2>::from_data(packed.data(), &device);
            let ids = [5, 299, 0, 5];
            let rows =
                gather_values(packed_gather(&packed, &ids, &device).expect("the kernel path"));
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&id| dense[id * k..(id + 1) * k].to_vec())
                .collect();
            assert_eq!(rows, want, "{scheme} gather");
            assert!(
                packed_gather(&packed, &[n], &device).is_none(),
                "an id past the table"
            );
            for m in [1, 3, 12] {
                let x = values(m * k, 8 + m as u64);
                let hidden = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
                let want = x_wt(&x, m, k, &dense, n);
                // A decode step with a packed table may quantize the activations (`vnni.rs`
                // checks those products exactly).
                let integer = m <= MAX_ROWS && quant::quantizes_activations();
                for (path, y) in [
                    ("packed", packed_product(&hidden, &packed)),
                    ("tensor", quantized_table_product(&hidden, &table)),
                ] {
                    let tol = if integer && path == "packed" {
                        0.02 * (k as f32).sqrt()
                    } else {
                        1e-4
                    };
                    let e = worst(&gather_values(y.expect("the kernel path")), &want);
                    assert!(e < tol, "{scheme} head ({path}), {m} rows: off by {e}");
                }
            }
        }
    }

    fn gather_values(t: Tensor<2>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32")
    }
}
