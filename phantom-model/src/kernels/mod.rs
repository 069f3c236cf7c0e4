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

pub mod attend;
pub mod dot;
pub mod dpbf16;
pub mod gemm;
pub mod quant;

use burn::prelude::*;
use burn::tensor::DType;
use burn_flex::{Flex, FlexTensor};
use half::{bf16, f16};

pub use dot::MAX_ROWS;

use crate::quantize::{BLOCK, transpose_into};

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
fn for_each_chunk(data: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    #[cfg(feature = "threads")]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
    #[cfg(not(feature = "threads"))]
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        f(i, c);
    }
}

/// Runs `f` on one of the kernels' worker threads (on this thread without threads): a
/// decode step runs a hundred parallel products, and a caller outside the pool would hand
/// each one over and sleep until it is done, paying a wake-up per product.
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
    {
        use rayon::prelude::*;
        (0..count).into_par_iter().for_each(f);
    }
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

/// The codes (`[k, n]`, row-major) and block scales (`[k / 32, n]`) of a quantized weight
/// `w_kn` stored on flex as [`crate::quantize::columns`] lays it out; `None` for any other
/// device, layout or scheme.
fn quantized_codes(w_kn: &Tensor<2>) -> Option<(burn_flex::FlexQTensor, usize, usize)> {
    use burn_dispatch::{BackendTensor, DispatchKindConversion, DispatchTensor};
    if !is_flex(&w_kn.device()) {
        return None;
    }
    let [k, n] = w_kn.dims();
    let DType::QFloat(scheme) = w_kn.dtype() else {
        return None;
    };
    if !k.is_multiple_of(BLOCK) || scheme.tensor_scale().is_some() {
        return None;
    }
    if scheme.block_size()?.as_slice() != [BLOCK as u8, 1] {
        return None;
    }
    let dispatch = w_kn.clone().into_dispatch();
    let BackendTensor::Quantized(q) =
        <DispatchTensor as DispatchKindConversion<Flex>>::try_into_backend(dispatch).ok()?
    else {
        return None;
    };
    let codes = contiguous_values::<i8>(q.tensor())?;
    if codes.len() != n * k || q.scales().len() != n * k / BLOCK {
        return None;
    }
    Some((q, k, n))
}

/// `x · w` for `x` `[m, k]` and a quantized weight `w_kn` seen as `[k, n]` and stored so on a
/// flex device, with blocks of 32 inputs down each column ([`crate::quantize::columns`]);
/// `[m, n]` in `x`'s dtype. `None` for any other device, layout or scheme.
pub fn quantized_rows(x: &Tensor<2>, w_kn: &Tensor<2>) -> Option<Tensor<2>> {
    if !is_flex(&x.device()) {
        return None;
    }
    let [m, k] = x.dims();
    let (q, k_w, n) = quantized_codes(w_kn)?;
    if k != k_w {
        return None;
    }
    let codes = contiguous_values::<i8>(q.tensor())?;
    let out_dtype = x.dtype();
    let xs = activations(x.clone().try_into_primitive::<Flex>().ok()?)?;
    let y = quant::product(&xs, m, k, codes, q.scales(), n);
    Some(flex_tensor(y, [m, n], out_dtype))
}

/// The codes (`[n, k]`) and block scales (`[n, k / 32]`) of a quantized flex weight seen as
/// `[k, n]`, in the checkpoint's order, exactly as stored.
pub fn quantized_parts(w_kn: &Tensor<2>) -> Option<(Vec<i8>, Vec<f32>)> {
    let (q, k, n) = quantized_codes(w_kn)?;
    let codes = contiguous_values::<i8>(q.tensor())?;
    let codes_nk = transpose_into(codes, k, n, Vec::new());
    let scales_nk = transpose_into(q.scales(), k / BLOCK, n, Vec::new());
    Some((codes_nk, scales_nk))
}

fn product<W: dot::Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    if m <= MAX_ROWS {
        dot::matvec(x, m, k, w, n)
    } else {
        gemm::matmul(x, m, k, w, n)
    }
}
