//! A quantized table laid out row-major, `[n, k]`, blocks of 32 along each row, one scale (f16
//! or f32) per block (`[n, k / 32]`): the token embedding of a quantized model, which a tied LM head
//! reads as its weight (`n` = vocabulary, `k` = hidden size).
//!
//! A decode step ([`matvec`]) takes each output as a dot product of one code row with the
//! activations: the 32 codes of a block are widened to f32 in registers, multiplied and summed,
//! and the block's sum weighted by its scale; the rows are split between the cores. In
//! WebAssembly, whose one thread is bound by arithmetic rather than memory, the activations are
//! quantized per block ([`super::activations`]) and each block's sum taken in integers instead:
//! four `i32x4.dot_i16x8_s` per block where the float path converts and multiplies 32 values. Larger
//! batches dequantize panels of rows for the f32 GEMM ([`super::quant::by_panels`]);
//! [`gather`] reads whole rows, as an embedding lookup does.

use super::dot::MAX_ROWS;
use crate::packed::Codes;
use crate::quantize::{BLOCK, Scale, nibble_code};

/// Table rows whose scales a kernel widens to f32 at a time: a few KiB, in cache, and one
/// conversion per stretch rather than per row. (The walk over them is written out in each
/// kernel: a closure would not be compiled for the kernel's instruction set.)
const SCALE_ROWS: usize = 64;

/// Lanes of one accumulator: an AVX-512 register, two AVX2 ones.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
const LANES: usize = 16;

/// `a·b + c`, fused where the build has FMA.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Block `b` of a code row (`row`: one byte per code, or with `HALVES` a block's two halves
/// to a byte, [`Codes::HalfBlocks`]) widened to f32.
#[inline(always)]
fn widen_block<const HALVES: bool>(row: &[u8], b: usize) -> [f32; BLOCK] {
    if HALVES {
        let c: &[u8; BLOCK / 2] = row[b * BLOCK / 2..(b + 1) * BLOCK / 2]
            .try_into()
            .expect("a whole block");
        let mut w = [0.0f32; BLOCK];
        let (low, high) = w.split_at_mut(BLOCK / 2);
        for ((l, h), &byte) in low.iter_mut().zip(high).zip(c) {
            *l = f32::from(nibble_code(byte));
            *h = f32::from(nibble_code(byte >> 4));
        }
        w
    } else {
        let c: &[u8; BLOCK] = row[b * BLOCK..(b + 1) * BLOCK]
            .try_into()
            .expect("a whole block");
        std::array::from_fn(|t| f32::from(c[t] as i8))
    }
}

/// The dot products of one code row (`row`, `k` codes as [`widen_block`] reads them, with
/// its `scales`) with the activation rows `x` (each `k` values).
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
#[inline(always)]
fn dot_row<const R: usize, const FMA: bool, const HALVES: bool>(
    x: [&[f32]; R],
    row: &[u8],
    scales: &[f32],
) -> [f32; R] {
    let mut acc = [[0.0f32; LANES]; R];
    for (b, &s) in scales.iter().enumerate() {
        let w = widen_block::<HALVES>(row, b);
        for (r, xr) in x.iter().enumerate() {
            let xb: &[f32; BLOCK] = xr[b * BLOCK..(b + 1) * BLOCK]
                .try_into()
                .expect("a whole block");
            let mut part = [0.0f32; LANES];
            for t in 0..LANES {
                part[t] = madd::<FMA>(w[t + LANES], xb[t + LANES], w[t] * xb[t]);
            }
            for t in 0..LANES {
                acc[r][t] = madd::<FMA>(part[t], s, acc[r][t]);
            }
        }
    }
    // A loop, not `array::from_fn`, whose closure is left a call outside the caller's
    // instruction set.
    let mut sums = [0.0f32; R];
    for (sum, acc) in sums.iter_mut().zip(&acc) {
        *sum = acc.iter().sum();
    }
    sums
}

/// Fills `out` (`[rows, m]`: each output row's `m` products in turn) for the code rows
/// starting at `j0`.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
#[inline(always)]
fn rows_body<S: Scale, const FMA: bool, const HALVES: bool>(
    x: &[f32],
    m: usize,
    k: usize,
    (codes, scales): (&[u8], &[S]),
    j0: usize,
    out: &mut [f32],
) {
    let blocks = k / BLOCK;
    let stride = if HALVES { k / 2 } else { k };
    let mut widened = Vec::new();
    for (c, stretch) in out.chunks_mut(SCALE_ROWS * m).enumerate() {
        let first = j0 + c * SCALE_ROWS;
        let count = stretch.len() / m;
        let stretch_scales = S::widen(
            &scales[first * blocks..(first + count) * blocks],
            &mut widened,
        );
        for (t, o) in stretch.chunks_exact_mut(m).enumerate() {
            let j = first + t;
            let c = &codes[j * stride..(j + 1) * stride];
            let s = &stretch_scales[t * blocks..(t + 1) * blocks];
            let mut r0 = 0;
            while r0 < m {
                let xr = |r: usize| &x[(r0 + r) * k..(r0 + r + 1) * k];
                let take = (m - r0).min(4);
                let o = &mut o[r0..r0 + take];
                match take {
                    1 => o.copy_from_slice(&dot_row::<1, FMA, HALVES>([xr(0)], c, s)),
                    2 => o.copy_from_slice(&dot_row::<2, FMA, HALVES>([xr(0), xr(1)], c, s)),
                    3 => o.copy_from_slice(&dot_row::<3, FMA, HALVES>([xr(0), xr(1), xr(2)], c, s)),
                    _ => o.copy_from_slice(&dot_row::<4, FMA, HALVES>(
                        [xr(0), xr(1), xr(2), xr(3)],
                        c,
                        s,
                    )),
                }
                r0 += take;
            }
        }
    }
}

/// [`rows_body`] for the codes' layout.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
#[inline(always)]
fn rows_any<S: Scale, const FMA: bool>(
    x: &[f32],
    m: usize,
    k: usize,
    (codes, scales): (Codes<'_>, &[S]),
    j0: usize,
    out: &mut [f32],
) {
    match codes {
        Codes::HalfBlocks(halves) => rows_body::<S, FMA, true>(x, m, k, (halves, scales), j0, out),
        Codes::Bytes(codes) => {
            let codes: &[u8] = bytemuck::cast_slice(codes);
            rows_body::<S, FMA, false>(x, m, k, (codes, scales), j0, out)
        }
        // A linear weight's layouts, which `matvec` turns away.
        Codes::RowPairs(_) | Codes::Panels(_) | Codes::PanelNibbles(_) => {}
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows_avx512<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    weight: (Codes<'_>, &[S]),
    j0: usize,
    out: &mut [f32],
) {
    rows_any::<S, true>(x, m, k, weight, j0, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    weight: (Codes<'_>, &[S]),
    j0: usize,
    out: &mut [f32],
) {
    rows_any::<S, true>(x, m, k, weight, j0, out);
}

/// `y = x · (c·s)ᵀ` for `x` `[m, k]` (f32, row-major), codes `[n, k]` (one byte each, or a
/// block's two halves to a byte) and scales `[n, k / 32]`: `y` is `[m, n]`. `k` must be a
/// multiple of 32. Each code row is read once, whatever `m`; in integers where the processor
/// has the VNNI products ([`super::vnni::table_rows`]).
pub fn matvec<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: Codes<'_>,
    scales: &[S],
    n: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if let Some(y) = super::vnni::table_rows(x, m, k, codes, scales, n) {
        return y;
    }
    widened_matvec(x, m, k, codes, scales, n)
}

/// [`matvec`] with each block's codes widened to f32 (in WebAssembly, summed in integers).
fn widened_matvec<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: Codes<'_>,
    scales: &[S],
    n: usize,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(codes.count(), n * k);
    debug_assert_eq!(scales.len(), n * k / BLOCK);
    debug_assert!(k.is_multiple_of(BLOCK));
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let unpacked;
    let codes = match codes {
        // A linear weight's layouts: read one byte per code.
        Codes::RowPairs(_) | Codes::Panels(_) | Codes::PanelNibbles(_) => {
            unpacked = codes.bytes(k);
            Codes::Bytes(&unpacked)
        }
        codes => codes,
    };
    let per_task = super::dot::rows_per_task(n, k);
    // Each task's outputs `[rows, m]`, transposed to `[m, n]` at the end.
    let mut by_row = vec![0.0f32; n * m];
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        let a = super::activations::quantize_activations(x, m, k);
        let widened = wasm::widen(&a.codes);
        let codes = codes.bytes(k);
        super::for_each_chunk(&mut by_row, per_task * m, |task, out| {
            let codes = (&codes[..], scales);
            wasm::rows((&widened, &a.scales), m, k, codes, task * per_task, out);
        });
    }
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    super::for_each_chunk(&mut by_row, per_task * m, |task, out| {
        let j0 = task * per_task;
        use super::dot::{Isa, isa};
        match isa() {
            // SAFETY: `isa()` chose these only after detecting every feature they enable.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { rows_avx512(x, m, k, (codes, scales), j0, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { rows_avx2(x, m, k, (codes, scales), j0, out) },
            Isa::Portable => rows_any::<S, false>(x, m, k, (codes, scales), j0, out),
        }
    });
    super::dot::row_major(by_row, m, n)
}

/// [`matvec`]'s integer row products in WebAssembly SIMD.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    use core::arch::wasm32::*;

    use super::SCALE_ROWS;
    use crate::quantize::{BLOCK, Scale};

    /// Activation codes widened to i16, eight to a vector (four vectors a block).
    pub(super) fn widen(codes: &[i8]) -> Vec<v128> {
        codes
            .chunks_exact(16)
            .flat_map(|c| {
                // SAFETY: `c` holds 16 bytes.
                let v = unsafe { v128_load(c.as_ptr().cast()) };
                [i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v)]
            })
            .collect()
    }

    /// Fills `out` (`[rows, m]`) with the products of the code rows from `j0` (codes `[n, k]`,
    /// scales `[n, k / 32]`) and the `m` quantized activation rows `(x, x_scales)` ([`widen`]
    /// codes, `[m, k / 32]` scales): per block, four pair products of i16 into i32 lanes, an
    /// exact sum weighted by both scales.
    pub(super) fn rows<S: Scale>(
        (x, x_scales): (&[v128], &[f32]),
        m: usize,
        k: usize,
        (codes, scales): (&[i8], &[S]),
        j0: usize,
        out: &mut [f32],
    ) {
        let blocks = k / BLOCK;
        let mut widened = Vec::new();
        for (c, stretch) in out.chunks_mut(SCALE_ROWS * m).enumerate() {
            let first = j0 + c * SCALE_ROWS;
            let count = stretch.len() / m;
            let stretch_scales = S::widen(
                &scales[first * blocks..(first + count) * blocks],
                &mut widened,
            );
            for (t, o) in stretch.chunks_exact_mut(m).enumerate() {
                let j = first + t;
                let c = &codes[j * k..(j + 1) * k];
                let s = &stretch_scales[t * blocks..(t + 1) * blocks];
                for (r, o) in o.iter_mut().enumerate() {
                    let xr = &x[r * k / 8..(r + 1) * k / 8];
                    let xs = &x_scales[r * blocks..(r + 1) * blocks];
                    let mut acc = f32x4_splat(0.0);
                    for ((block, xb), (&s, &xs)) in c
                        .chunks_exact(BLOCK)
                        .zip(xr.chunks_exact(4))
                        .zip(s.iter().zip(xs))
                    {
                        // SAFETY: a block holds 32 codes, read 16 at a time.
                        let (c0, c1) = unsafe {
                            (
                                v128_load(block.as_ptr().cast()),
                                v128_load(block.as_ptr().add(16).cast()),
                            )
                        };
                        let low = i32x4_add(
                            i32x4_dot_i16x8(i16x8_extend_low_i8x16(c0), xb[0]),
                            i32x4_dot_i16x8(i16x8_extend_high_i8x16(c0), xb[1]),
                        );
                        let high = i32x4_add(
                            i32x4_dot_i16x8(i16x8_extend_low_i8x16(c1), xb[2]),
                            i32x4_dot_i16x8(i16x8_extend_high_i8x16(c1), xb[3]),
                        );
                        let sum = f32x4_convert_i32x4(i32x4_add(low, high));
                        acc = f32x4_add(acc, f32x4_mul(sum, f32x4_splat(s * xs)));
                    }
                    *o = (f32x4_extract_lane::<0>(acc) + f32x4_extract_lane::<1>(acc))
                        + (f32x4_extract_lane::<2>(acc) + f32x4_extract_lane::<3>(acc));
                }
            }
        }
    }
}

/// [`matvec`] up to [`MAX_ROWS`] rows; beyond, panels of rows dequantized for the GEMM.
pub fn product<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: Codes<'_>,
    scales: &[S],
    n: usize,
) -> Vec<f32> {
    if m <= MAX_ROWS {
        return matvec(x, m, k, codes, scales, n);
    }
    super::quant::by_panels(x, m, k, n, |j, row| {
        dequantize_row(codes, scales, k, j, row)
    })
}

/// Row `j` of the table (codes and scales, rows of `k`) as f32 values in `out`.
fn dequantize_row<S: Scale>(codes: Codes<'_>, scales: &[S], k: usize, j: usize, out: &mut [f32]) {
    let blocks = k / BLOCK;
    let scales = &scales[j * blocks..(j + 1) * blocks];
    let (row, halves): (&[u8], bool) = match codes {
        Codes::Bytes(codes) => (bytemuck::cast_slice(&codes[j * k..(j + 1) * k]), false),
        Codes::HalfBlocks(halves) => (&halves[j * k / 2..(j + 1) * k / 2], true),
        Codes::RowPairs(_) | Codes::Panels(_) | Codes::PanelNibbles(_) => {
            return out.fill(f32::NAN);
        }
    };
    for (b, (o, s)) in out.chunks_exact_mut(BLOCK).zip(scales).enumerate() {
        let s = s.get();
        let w = if halves {
            widen_block::<true>(row, b)
        } else {
            widen_block::<false>(row, b)
        };
        for (o, w) in o.iter_mut().zip(w) {
            *o = w * s;
        }
    }
}

/// The rows `ids` of the table (codes `[n, k]`, scales `[n, k / 32]`) dequantized,
/// `[ids.len(), k]`; `None` if an id is not below `n`, or for a linear weight's layout.
pub fn gather<S: Scale>(
    codes: Codes<'_>,
    scales: &[S],
    k: usize,
    ids: &[usize],
) -> Option<Vec<f32>> {
    if matches!(
        codes,
        Codes::RowPairs(_) | Codes::Panels(_) | Codes::PanelNibbles(_)
    ) {
        return None;
    }
    let n = codes.count() / k.max(1);
    if ids.iter().any(|&id| id >= n) {
        return None;
    }
    let mut out = vec![0.0f32; ids.len() * k];
    for (o, &id) in out.chunks_exact_mut(k.max(1)).zip(ids) {
        dequantize_row(codes, scales, k, id, o);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::pack_half_blocks;
    use crate::quantize::{Quantization, dequantize_host, quantize_host};
    use crate::testing::{quantized_weight, values, worst, x_wt};

    #[test]
    fn row_products_equal_the_product_with_dequantized_weights() {
        // Past one task's rows, odd output counts, one to many activation rows.
        for (m, k, n) in [
            (1, 32, 1),
            (1, 64, 3),
            (2, 96, 33),
            (3, 896, 129),
            (4, 64, 1000),
            (5, 160, 7),
            (8, 256, 61),
            (9, 128, 5),
            (40, 224, 530),
        ] {
            let x = values(m * k, 3 + k as u64);
            for scheme in [Quantization::Q8, Quantization::Q4] {
                let w = quantized_weight(n, k, 4 + n as u64, scheme);
                let want = x_wt(&x, m, k, &w.dequantized, n);
                let tol = 1e-5 * (k as f32).sqrt() + 1e-6;
                let halves = pack_half_blocks(&w.codes);
                let mut layouts = vec![("bytes", Codes::Bytes(&w.codes))];
                if scheme == Quantization::Q4 {
                    layouts.push(("half blocks", Codes::HalfBlocks(&halves)));
                }
                for (layout, codes) in layouts {
                    let what = format!("{scheme} {layout} {m}x{k}x{n}");
                    if m <= MAX_ROWS {
                        let e = worst(&widened_matvec(&x, m, k, codes, &w.scales, n), &want);
                        assert!(e <= tol, "{what}: widened, off by {e}");
                    }
                    // What the model runs: a decode step with 4-bit codes may quantize the
                    // activations (`vnni.rs` checks those products exactly).
                    let integer = matches!(codes, Codes::HalfBlocks(_))
                        && m <= MAX_ROWS
                        && super::super::quant::quantizes_activations();
                    let tol = if integer {
                        0.02 * (k as f32).sqrt()
                    } else {
                        tol
                    };
                    let e = worst(&product(&x, m, k, codes, &w.scales, n), &want);
                    assert!(e <= tol, "{what}: off by {e}");
                }
            }
        }
    }

    #[test]
    fn gathered_rows_are_the_dequantized_rows() {
        let (n, k) = (50, 64);
        let (codes, scales) = quantize_host(&values(n * k, 9), k, Quantization::Q4);
        let table = dequantize_host(&codes, &scales, k);
        let ids = [3, 0, 49, 3];
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&id| table[id * k..(id + 1) * k].to_vec())
            .collect();
        let halves = pack_half_blocks(&codes);
        for codes in [Codes::Bytes(&codes), Codes::HalfBlocks(&halves)] {
            let got = gather(codes, &scales, k, &ids).expect("ids in range");
            assert_eq!(got, want, "{codes:?}");
            assert!(gather(codes, &scales, k, &[50]).is_none());
        }
    }

    #[test]
    fn a_nan_scale_reaches_its_output() {
        let (m, k, n) = (2, 64, 3);
        let (codes, mut scales) = quantize_host(&values(n * k, 5), k, Quantization::Q8);
        scales[2] = f32::NAN; // row 1, block 0
        let y = product(&values(m * k, 6), m, k, Codes::Bytes(&codes), &scales, n);
        assert!(y[1].is_nan() && y[n + 1].is_nan(), "{y:?}");
        assert!(y[0].is_finite() && y[2].is_finite());
    }
}
