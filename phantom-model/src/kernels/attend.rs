//! Attention of a few new queries over the KV cache, read where it lies.
//!
//! A decode step attends one query per head over every cached key: with Burn's ops that is a
//! strided view of the cache made contiguous (and, in half precision, copied to f32) twice per
//! layer per token, then six more ops. Here each KV head's keys and values are read straight
//! from the cache buffers in their own precision. A few queries take the scores by
//! [`dot::matvec_serial`] and the values by [`dot::weighted_rows`]; a prompt's (or a vision
//! tile's) many queries go through the blocked GEMM a block of rows at a time, so the scores
//! never exceed a few megabytes, each block over only the keys one of its rows sees (a causal
//! prompt's block of early queries skips the later keys). Softmax is in f32; KV heads run in parallel.

use burn::prelude::*;
use burn::tensor::DType;
use burn_flex::{Flex, FlexTensor};
use half::{bf16, f16};

use super::pointwise::exp;
use super::{activations, contiguous, dot, for_each_chunk, gemm, is_flex};

/// Queries per KV head up to which the scores are taken row by row; more go through the GEMM.
const FEW_ROWS: usize = 16;

/// Query rows of a GEMM block: their scores over 2,000 keys take 2 MB.
const ROW_BLOCK: usize = 256;

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
    let reach = hidden.as_deref().map(|m| reach(m, len));
    let out_dtype = q.dtype();
    let q = activations(q.clone().try_into_primitive::<Flex>().ok()?)?;
    let k = contiguous(k.clone().try_into_primitive::<Flex>().ok()?);
    let v = contiguous(v.clone().try_into_primitive::<Flex>().ok()?);
    let shape = Shape {
        b,
        hkv,
        rows,
        w,
        capacity,
        len,
        t,
    };
    let mask = hidden.as_deref().zip(reach.as_deref());
    let out = match k.dtype() {
        DType::F32 => run::<f32>(&q, &k, &v, mask, scale, shape)?,
        DType::BF16 => run::<bf16>(&q, &k, &v, mask, scale, shape)?,
        DType::F16 => run::<f16>(&q, &k, &v, mask, scale, shape)?,
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

/// For each mask row (`[B·t, len]`, true where hidden), one past the last key it sees: a
/// causal prompt's query sees only the keys up to its own.
fn reach(hidden: &[bool], len: usize) -> Vec<usize> {
    hidden
        .chunks_exact(len)
        .map(|row| row.iter().rposition(|&h| !h).map_or(0, |i| i + 1))
        .collect()
}

/// `hidden` is the mask with its [`reach`], if any.
fn run<W: dot::Weight + burn::tensor::Element + bytemuck::Pod>(
    q: &[f32],
    k: &FlexTensor,
    v: &FlexTensor,
    hidden: Option<(&[bool], &[usize])>,
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
        // The scores of rows from `first_row`, over the first `keys` keys.
        let softmax = |p: &mut [f32], first_row: usize, keys: usize| {
            if keys == 0 {
                return;
            }
            for (r, row) in p.chunks_exact_mut(keys).enumerate() {
                let query = (first_row + r) % s.t;
                let mask = hidden.map(|(m, _)| &m[(batch * s.t + query) * s.len..][..keys]);
                softmax_row(row, scale, mask);
            }
        };
        if s.rows <= FEW_ROWS {
            let mut p = dot::matvec_serial(q, s.rows, s.w, k, s.len);
            softmax(&mut p, 0, s.len);
            dot::weighted_rows(&p, s.rows, v, s.w, out);
            return;
        }
        // The values transposed ([w, len], f32): the second product reads them as a weight.
        let mut v_t = vec![0.0f32; s.w * s.len];
        let mut widened = vec![0.0f32; s.w];
        for (key, row) in v.chunks_exact(s.w).enumerate() {
            W::widen(row, &mut widened);
            for (i, &x) in widened.iter().enumerate() {
                v_t[i * s.len + key] = x;
            }
        }
        let mut p = vec![0.0f32; ROW_BLOCK.min(s.rows) * s.len];
        for r0 in (0..s.rows).step_by(ROW_BLOCK) {
            let rows = ROW_BLOCK.min(s.rows - r0);
            // The keys that no row of the block sees (a causal prompt's later keys) are left
            // out of both products.
            let keys = match hidden {
                Some((_, reach)) => (r0..r0 + rows)
                    .map(|r| reach[batch * s.t + r % s.t])
                    .max()
                    .unwrap_or(0),
                None => s.len,
            };
            let p = &mut p[..rows * keys];
            let q = &q[r0 * s.w..(r0 + rows) * s.w];
            gemm::matmul_serial(q, rows, s.w, (&k[..keys * s.w], s.w), keys, p);
            softmax(p, r0, keys);
            let o = &mut out[r0 * s.w..(r0 + rows) * s.w];
            gemm::matmul_serial(p, rows, keys, (&v_t, s.len), s.w, o);
        }
    });
    Some(out)
}

/// `softmax(row · scale)` over the keys not hidden, in place; hidden keys get 0. A row with
/// every key hidden stays all 0 (the callers never produce one: a query sees itself).
fn softmax_row(row: &mut [f32], scale: f32, hidden: Option<&[bool]>) {
    match dot::isa() {
        // SAFETY: `isa()` chose these only after detecting every feature they enable.
        #[cfg(target_arch = "x86_64")]
        dot::Isa::Avx512 => unsafe { softmax_avx512(row, scale, hidden) },
        #[cfg(target_arch = "x86_64")]
        dot::Isa::Avx2 => unsafe { softmax_avx2(row, scale, hidden) },
        dot::Isa::Portable => softmax_body(row, scale, hidden),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_avx512(row: &mut [f32], scale: f32, hidden: Option<&[bool]>) {
    softmax_body(row, scale, hidden);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32], scale: f32, hidden: Option<&[bool]>) {
    softmax_body(row, scale, hidden);
}

/// Lanes of the running maximum and sum, so that the reductions vectorise.
const LANES: usize = 16;

#[inline(always)]
fn softmax_body(row: &mut [f32], scale: f32, hidden: Option<&[bool]>) {
    if let Some(hidden) = hidden {
        for (x, &h) in row.iter_mut().zip(hidden) {
            *x = if h { f32::NEG_INFINITY } else { *x * scale };
        }
    } else {
        row.iter_mut().for_each(|x| *x *= scale);
    }
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = m.max(x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sums = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk.iter_mut()) {
            *x = exp(*x - max);
            *s += *x;
        }
    }
    let mut total: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        total += *x;
    }
    let inv = 1.0 / total;
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_hides_masked_keys_and_sums_to_one() {
        let mut row = vec![1.0f32, 2.0, 3.0, 4.0];
        softmax_row(&mut row, 0.5, Some(&[false, true, false, false]));
        assert_eq!(row[1], 0.0);
        let total: f32 = row.iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        let e = |v: f32| (0.5 * v).exp();
        let want = e(3.0) / (e(1.0) + e(3.0) + e(4.0));
        assert!((row[2] - want).abs() < 1e-6);
    }
}
