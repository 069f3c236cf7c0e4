//! Attention of a few new queries over the KV cache, read where it lies.
//!
//! A decode step attends one query per head over every cached key: with Burn's ops that is a
//! strided view of the cache made contiguous (and, in half precision, copied to f32) twice per
//! layer per token, then six more ops. Here each KV head's keys and values are read straight
//! from the cache buffers in their own precision. A few queries take the scores and the
//! values by AVX-512 kernels where the processor has it (sixteen keys a step, output rows held
//! in registers), by [`dot::matvec_serial`] and [`dot::weighted_rows`] elsewhere; a prompt's
//! (or a vision tile's) many queries go through the blocked GEMM a block of rows at a time, so
//! the scores never exceed a few megabytes, each block over only the keys one of its rows sees
//! (a causal prompt's block of early queries skips the later keys). Softmax is in f32; KV heads
//! run in parallel.

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
fn run<W: Cached + burn::tensor::Element + bytemuck::Pod>(
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
            let mut p = scores(q, s.rows, s.w, k, s.len);
            softmax(&mut p, 0, s.len);
            weigh(&p, s.rows, v, s.w, out);
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

/// A cache element: f32, bf16 or f16, which the AVX-512 kernels widen sixteen at a time.
trait Cached: dot::Weight {
    /// How sixteen of them become f32 lanes.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const FORMAT: Format;
}

/// The element formats of [`Cached`].
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Format {
    F32,
    Bf16,
    F16,
}

impl Cached for f32 {
    const FORMAT: Format = Format::F32;
}
impl Cached for bf16 {
    const FORMAT: Format = Format::Bf16;
}
impl Cached for f16 {
    const FORMAT: Format = Format::F16;
}

/// The scores `q · kᵀ` (`[rows, len]`) of a few query rows `q` (`[rows, w]`) over the keys
/// `k` (`[len, w]`).
fn scores<W: Cached>(q: &[f32], rows: usize, w: usize, k: &[W], len: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if w.is_multiple_of(16) && matches!(dot::isa(), dot::Isa::Avx512) {
        let mut p = vec![0.0f32; rows * len];
        // SAFETY: `isa()` detected AVX-512; `w` is a multiple of 16.
        unsafe { avx512::scores(q, rows, w, k, len, &mut p) };
        return p;
    }
    dot::matvec_serial(q, rows, w, k, len)
}

/// `out [rows, w] += p [rows, len] · v [len, w]`: the probabilities times the values.
fn weigh<W: Cached>(p: &[f32], rows: usize, v: &[W], w: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if w.is_multiple_of(16) && matches!(dot::isa(), dot::Isa::Avx512) {
        // SAFETY: `isa()` detected AVX-512; `w` is a multiple of 16.
        unsafe { avx512::weigh(p, rows, v, w, out) };
        return;
    }
    dot::weighted_rows(p, rows, v, w, out);
}

/// A decode step's attention products with AVX-512, for head widths that are a multiple of
/// 16. The scores take sixteen keys at a time: each query row's sixteen dot products are
/// summed lane-wise in registers and folded into one register of sixteen scores by a
/// shuffle tree (45 operations where a sum per score takes 9 each). The values go into
/// output rows held in registers, 32 columns at a time.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Cached, Format};

    /// Keys of one step of [`scores`].
    const KEYS: usize = 16;
    /// Output rows [`weigh`] holds in registers at a time (two registers each).
    const ROWS: usize = 8;

    /// Sixteen cache elements at `p` as f32 lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<W: Cached>(p: *const W) -> __m512 {
        // SAFETY: the caller's sixteen elements at `p`.
        unsafe {
            match W::FORMAT {
                Format::F32 => _mm512_loadu_ps(p.cast()),
                // bf16 is the upper half of an f32.
                Format::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
                )),
                Format::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            }
        }
    }

    /// Sixteen registers folded into one whose lane `j` is the sum of register `j`'s lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn fold(acc: [__m512; KEYS]) -> __m512 {
        // Pairs: each 128-bit lane holds two partial sums of each register of the pair.
        let pairs: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (acc[2 * i], acc[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Quads: each 128-bit lane holds one sum of each of four registers.
        let quads: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (pairs[2 * i], pairs[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xEE>(a, b),
            )
        });
        // Then across the 128-bit lanes.
        let halves: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (quads[2 * i], quads[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            )
        });
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(halves[0], halves[1]),
            _mm512_shuffle_f32x4::<0xDD>(halves[0], halves[1]),
        )
    }

    /// `p [rows, len] = q [rows, w] · k [len, w]ᵀ`; `w` a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores<W: Cached>(
        q: &[f32],
        rows: usize,
        w: usize,
        k: &[W],
        len: usize,
        p: &mut [f32],
    ) {
        debug_assert!(q.len() >= rows * w && k.len() >= len * w && p.len() >= rows * len);
        // Sixteen keys widened to f32, read once per query row from the first level cache.
        let mut block = vec![0.0f32; KEYS * w];
        for key0 in (0..len).step_by(KEYS) {
            let keys = KEYS.min(len - key0);
            for j in 0..keys {
                for c in (0..w).step_by(16) {
                    // SAFETY: key `key0 + j` has `w` elements; the block holds `KEYS · w`.
                    unsafe {
                        let x = load16(k.as_ptr().add((key0 + j) * w + c));
                        _mm512_storeu_ps(block.as_mut_ptr().add(j * w + c), x);
                    }
                }
            }
            // Keys past `len` in the last block keep stale values; their lanes are not stored.
            let mask = ((1u32 << keys) - 1) as __mmask16;
            for r in 0..rows {
                let mut acc = [_mm512_setzero_ps(); KEYS];
                for c in (0..w).step_by(16) {
                    // SAFETY: row `r` of `q` and each key row of the block hold `w` floats.
                    unsafe {
                        let x = _mm512_loadu_ps(q.as_ptr().add(r * w + c));
                        for (j, a) in acc.iter_mut().enumerate() {
                            let kv = _mm512_loadu_ps(block.as_ptr().add(j * w + c));
                            *a = _mm512_fmadd_ps(x, kv, *a);
                        }
                    }
                }
                // SAFETY: `keys` scores of row `r` from `key0`, within `p`.
                unsafe {
                    _mm512_mask_storeu_ps(p.as_mut_ptr().add(r * len + key0), mask, fold(acc))
                };
            }
        }
    }

    /// `out [rows, w] += p [rows, len] · v [len, w]`; `w` a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weigh<W: Cached>(
        p: &[f32],
        rows: usize,
        v: &[W],
        w: usize,
        out: &mut [f32],
    ) {
        let len = v.len() / w;
        debug_assert!(p.len() >= rows * len && out.len() >= rows * w);
        for r0 in (0..rows).step_by(ROWS) {
            let (p, out) = (&p[r0 * len..], &mut out[r0 * w..]);
            // SAFETY: as this function's.
            unsafe {
                match ROWS.min(rows - r0) {
                    1 => weigh_rows::<W, 1>(p, v, w, out),
                    2 => weigh_rows::<W, 2>(p, v, w, out),
                    3 => weigh_rows::<W, 3>(p, v, w, out),
                    4 => weigh_rows::<W, 4>(p, v, w, out),
                    5 => weigh_rows::<W, 5>(p, v, w, out),
                    6 => weigh_rows::<W, 6>(p, v, w, out),
                    7 => weigh_rows::<W, 7>(p, v, w, out),
                    _ => weigh_rows::<W, ROWS>(p, v, w, out),
                }
            }
        }
    }

    /// [`weigh`] for `R` rows, whose sums stay in registers.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn weigh_rows<W: Cached, const R: usize>(p: &[f32], v: &[W], w: usize, out: &mut [f32]) {
        let len = v.len() / w;
        debug_assert!(p.len() >= R * len && out.len() >= R * w);
        for c in (0..w).step_by(32) {
            // One register of columns where `w` leaves 16 at the end.
            let wide = c + 32 <= w;
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for s in 0..len {
                // SAFETY: value row `s` has `w` elements from `c` (32, or 16 at the end); row
                // `r` of `p` has `len` weights.
                unsafe {
                    let at = v.as_ptr().add(s * w + c);
                    let v0 = load16(at);
                    let v1 = if wide {
                        load16(at.add(16))
                    } else {
                        _mm512_setzero_ps()
                    };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let weight = _mm512_set1_ps(*p.get_unchecked(r * len + s));
                        a[0] = _mm512_fmadd_ps(weight, v0, a[0]);
                        a[1] = _mm512_fmadd_ps(weight, v1, a[1]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: row `r` of `out` has `w` floats from `c`.
                unsafe {
                    let o = out.as_mut_ptr().add(r * w + c);
                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[0]));
                    if wide {
                        let o = o.add(16);
                        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[1]));
                    }
                }
            }
        }
    }
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
    use crate::testing::{values, worst, x_wt};

    /// Both products of a few rows against the f64-summed reference, in every cache format,
    /// for head widths with and without a 32-column tail and key counts around the 16 of a
    /// step.
    #[test]
    fn few_row_products_equal_the_reference_in_every_format() {
        fn check<W: Cached>(narrow: fn(f32) -> W) {
            for (rows, w, len) in [
                (1, 16, 1),
                (7, 64, 1000),
                (3, 48, 17),
                (16, 128, 33),
                (9, 96, 15),
                (2, 20, 5),
            ] {
                let q = values(rows * w, 30 + w as u64);
                let cache: Vec<W> = values(len * w, 31 + len as u64)
                    .into_iter()
                    .map(narrow)
                    .collect();
                let wide: Vec<f32> = cache.iter().map(|v| v.to_f32()).collect();
                let tol = 1e-5 * (w.max(len) as f32).sqrt();
                let p = scores(&q, rows, w, &cache, len);
                let e = worst(&p, &x_wt(&q, rows, w, &wide, len));
                assert!(e <= tol, "scores {rows}x{w}x{len}: off by {e}");
                // `out += softmax(p) · v`, from a non-zero start.
                let mut p = p;
                for row in p.chunks_exact_mut(len) {
                    softmax_row(row, 0.125, None);
                }
                let start = values(rows * w, 32);
                let mut out = start.clone();
                weigh(&p, rows, &cache, w, &mut out);
                let v_t: Vec<f32> = (0..w * len)
                    .map(|i| wide[(i % len) * w + i / len])
                    .collect();
                let want: Vec<f32> = x_wt(&p, rows, len, &v_t, w)
                    .iter()
                    .zip(&start)
                    .map(|(a, b)| a + b)
                    .collect();
                let e = worst(&out, &want);
                assert!(e <= tol, "values {rows}x{w}x{len}: off by {e}");
            }
        }
        check::<f32>(|v| v);
        check::<bf16>(bf16::from_f32);
        check::<f16>(f16::from_f32);
    }

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
