//! Attention of a few new queries over the KV cache, read where it lies.
//!
//! A decode step attends one query per head over every cached key: with Burn's ops that is a
//! strided view of the cache made contiguous (and, in half precision, copied to f32) twice per
//! layer per token, then six more ops. Here each KV head's keys and values are read once,
//! straight from the cache buffers in their own precision: scores by [`dot::matvec_serial`],
//! softmax in f32, values by [`dot::weighted_rows`]. KV heads run in parallel.

use burn::prelude::*;
use burn::tensor::DType;
use burn_flex::{Flex, FlexTensor};
use half::{bf16, f16};

use super::{activations, dot, for_each_chunk, is_flex};

/// Queries per KV head up to which the kernel serves a call (a decode step of a GQA group, or
/// a few tokens fed at once); longer prompts use Burn's batched products.
pub const MAX_QUERY_ROWS: usize = 64;

/// `softmax(q · kᵀ · scale + mask) · v` for queries `q` `[B, H_kv, R, w]` (R = g·t rows: the g
/// query heads of a KV head, each over t new tokens, head-major) against the first `len`
/// positions of cache buffers `k`, `v` `[B, H_kv, capacity, w]`. `hidden` (`[B, 1, 1, t, len]`,
/// true where a key is hidden) is optional. Returns `[B, H_kv, R, w]` in `q`'s dtype, or
/// `None` where the kernel does not apply (not flex, too many rows, another layout or dtype).
pub fn attend(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    len: usize,
    hidden: Option<&Tensor<5, Bool>>,
    scale: f32,
) -> Option<Tensor<4>> {
    let [b, hkv, rows, w] = q.dims();
    let [kb, kh, capacity, kw] = k.dims();
    if !is_flex(&q.device())
        || rows > MAX_QUERY_ROWS
        || (kb, kh, kw) != (b, hkv, w)
        || v.dims() != k.dims()
        || len == 0
        || len > capacity
        || k.dtype() != v.dtype()
    {
        return None;
    }
    let t = match hidden {
        Some(mask) => {
            let [_, _, _, t, s] = mask.dims();
            if s != len || rows % t != 0 {
                return None;
            }
            t
        }
        None => 1,
    };
    let hidden: Option<Vec<bool>> = match hidden {
        Some(mask) => Some(
            mask.clone()
                .into_data()
                .convert::<bool>()
                .try_into_vec::<bool>()
                .ok()?,
        ),
        None => None,
    };
    let out_dtype = q.dtype();
    let q = activations(q.clone().try_into_primitive::<Flex>().ok()?)?;
    let k = k.clone().try_into_primitive::<Flex>().ok()?;
    let v = v.clone().try_into_primitive::<Flex>().ok()?;
    if !k.is_contiguous() || !v.is_contiguous() {
        return None;
    }
    let shape = Shape {
        b,
        hkv,
        rows,
        w,
        capacity,
        len,
        t,
    };
    let out = match k.dtype() {
        DType::F32 => run::<f32>(&q, &k, &v, hidden.as_deref(), scale, shape)?,
        DType::BF16 => run::<bf16>(&q, &k, &v, hidden.as_deref(), scale, shape)?,
        DType::F16 => run::<f16>(&q, &k, &v, hidden.as_deref(), scale, shape)?,
        _ => return None,
    };
    let mut data = TensorData::new(out, [b, hkv, rows, w]);
    if out_dtype != DType::F32 {
        data = data.convert_dtype(out_dtype);
    }
    Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(data)))
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    hkv: usize,
    rows: usize,
    w: usize,
    capacity: usize,
    len: usize,
    t: usize,
}

fn run<W: dot::Weight + burn::tensor::Element + bytemuck::Pod>(
    q: &[f32],
    k: &FlexTensor,
    v: &FlexTensor,
    hidden: Option<&[bool]>,
    scale: f32,
    s: Shape,
) -> Option<Vec<f32>> {
    let keys = super::contiguous_values::<W>(k)?;
    let values = super::contiguous_values::<W>(v)?;
    let mut out = vec![0.0f32; s.b * s.hkv * s.rows * s.w];
    for_each_chunk(&mut out, s.rows * s.w, |pair, out| {
        let batch = pair / s.hkv;
        let cache = pair * s.capacity * s.w;
        let k = &keys[cache..cache + s.len * s.w];
        let v = &values[cache..cache + s.len * s.w];
        let q = &q[pair * s.rows * s.w..(pair + 1) * s.rows * s.w];
        let mut p = dot::matvec_serial(q, s.rows, s.w, k, s.len);
        for (r, row) in p.chunks_exact_mut(s.len).enumerate() {
            let query = r % s.t;
            let mask = hidden.map(|m| &m[(batch * s.t + query) * s.len..][..s.len]);
            softmax_row(row, scale, mask);
        }
        dot::weighted_rows(&p, s.rows, v, s.w, out);
    });
    Some(out)
}

/// `softmax(row · scale)` over the keys not hidden, in place; hidden keys get 0. A row with
/// every key hidden stays all 0 (the callers never produce one: a query sees itself).
fn softmax_row(row: &mut [f32], scale: f32, hidden: Option<&[bool]>) {
    let visible = |i: usize| hidden.is_none_or(|h| !h[i]);
    let mut max = f32::NEG_INFINITY;
    for (i, x) in row.iter_mut().enumerate() {
        *x *= scale;
        if visible(i) && *x > max {
            max = *x;
        }
    }
    let mut total = 0.0f32;
    for (i, x) in row.iter_mut().enumerate() {
        *x = if visible(i) { (*x - max).exp() } else { 0.0 };
        total += *x;
    }
    if total > 0.0 {
        let inv = 1.0 / total;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}
