//! Products with quantized weights ([`crate::quantize`]) laid out as Burn sees a linear weight:
//! codes `[k, n]` as i8, one f32 scale per block of 32 inputs down each column (`[k / 32, n]`).
//!
//! A decode step ([`matvec`]) streams the codes once, one byte per weight: each task owns a
//! tile of 64 output columns, widens one code row of the tile at a time to f32 times its
//! scales in registers and adds it, weighted by the activation, into the tile's accumulators.
//! Larger batches ([`matmul`]) dequantize a panel of columns at a time into a buffer that stays
//! in cache and run the f32 GEMM on it, so no float copy of the weight ever exists.

use super::dot::{Isa, MAX_ROWS, isa};
use crate::quantize::BLOCK;

/// Inputs per scale.
pub const BLOCK_SIZE: usize = BLOCK;

/// Output columns a task accumulates in registers.
const TILE: usize = 64;

/// `a·b + c`, fused where the build has FMA.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `R` activation rows times the `TILE` columns from `c0` of the weight.
#[inline(always)]
fn tile_dots<const R: usize, const FMA: bool>(
    x: &[&[f32]; R],
    k: usize,
    codes: &[i8],
    scales: &[f32],
    n: usize,
    c0: usize,
) -> [[f32; TILE]; R] {
    let mut acc = [[0.0f32; TILE]; R];
    for b in 0..k / BLOCK {
        let s: &[f32; TILE] = scales[b * n + c0..b * n + c0 + TILE]
            .try_into()
            .expect("a full tile");
        for i in b * BLOCK..(b + 1) * BLOCK {
            let c: &[i8; TILE] = codes[i * n + c0..i * n + c0 + TILE]
                .try_into()
                .expect("a full tile");
            let w: [f32; TILE] = std::array::from_fn(|t| f32::from(c[t]) * s[t]);
            for r in 0..R {
                let xv = x[r][i];
                for t in 0..TILE {
                    acc[r][t] = madd::<FMA>(xv, w[t], acc[r][t]);
                }
            }
        }
    }
    acc
}

/// The outputs `[m, width]` of the columns `c0..c0 + width` (`width` ≤ [`TILE`]), rows four at
/// a time; a last, narrower tile goes column by column.
#[inline(always)]
fn tile_body<const FMA: bool>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[f32],
    n: usize,
    c0: usize,
    out: &mut [f32],
) {
    let width = out.len() / m;
    if width < TILE {
        for r in 0..m {
            for t in 0..width {
                let j = c0 + t;
                let mut sum = 0.0f32;
                for i in 0..k {
                    let w = f32::from(codes[i * n + j]) * scales[(i / BLOCK) * n + j];
                    sum = madd::<FMA>(x[r * k + i], w, sum);
                }
                out[r * width + t] = sum;
            }
        }
        return;
    }
    let mut r0 = 0;
    while r0 < m {
        let row = |r: usize| &x[(r0 + r) * k..(r0 + r + 1) * k];
        let take = (m - r0).min(4);
        let mut put = |r: usize, values: &[f32; TILE]| {
            out[(r0 + r) * TILE..(r0 + r + 1) * TILE].copy_from_slice(values);
        };
        match take {
            1 => {
                let [a] = tile_dots::<1, FMA>(&[row(0)], k, codes, scales, n, c0);
                put(0, &a);
            }
            2 => {
                let d = tile_dots::<2, FMA>(&[row(0), row(1)], k, codes, scales, n, c0);
                d.iter().enumerate().for_each(|(r, v)| put(r, v));
            }
            3 => {
                let d = tile_dots::<3, FMA>(&[row(0), row(1), row(2)], k, codes, scales, n, c0);
                d.iter().enumerate().for_each(|(r, v)| put(r, v));
            }
            _ => {
                let d = tile_dots::<4, FMA>(
                    &[row(0), row(1), row(2), row(3)],
                    k,
                    codes,
                    scales,
                    n,
                    c0,
                );
                d.iter().enumerate().for_each(|(r, v)| put(r, v));
            }
        }
        r0 += take;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[f32],
    n: usize,
    c0: usize,
    out: &mut [f32],
) {
    tile_body::<true>(x, m, k, codes, scales, n, c0, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx2(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[f32],
    n: usize,
    c0: usize,
    out: &mut [f32],
) {
    tile_body::<true>(x, m, k, codes, scales, n, c0, out);
}

/// One tile of output columns on the best instruction set.
#[allow(clippy::too_many_arguments)]
fn tile(x: &[f32], m: usize, k: usize, codes: &[i8], scales: &[f32], n: usize, c0: usize, out: &mut [f32]) {
    match isa() {
        // SAFETY: `isa()` chose these only after detecting every feature they enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { tile_avx512(x, m, k, codes, scales, n, c0, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { tile_avx2(x, m, k, codes, scales, n, c0, out) },
        Isa::Portable => tile_body::<false>(x, m, k, codes, scales, n, c0, out),
    }
}

/// Scatters outputs computed in column groups of `group` (`[n / group][m, group]`) to `[m, n]`.
fn gather_columns(parts: &[f32], m: usize, n: usize, group: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for (p, part) in parts.chunks(group * m).enumerate() {
        let j0 = p * group;
        let width = part.len() / m;
        for r in 0..m {
            y[r * n + j0..r * n + j0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
    y
}

/// `y = x · (c·s)` for `x` `[m, k]` (f32, row-major), codes `[k, n]` and scales `[k / 32, n]`:
/// `y` is `[m, n]`. `k` must be a multiple of 32.
pub fn matvec(x: &[f32], m: usize, k: usize, codes: &[i8], scales: &[f32], n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(codes.len(), n * k);
    debug_assert_eq!(scales.len(), n * k / BLOCK);
    debug_assert!(k.is_multiple_of(BLOCK));
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let mut parts = vec![0.0f32; m * n];
    super::for_each_chunk(&mut parts, TILE * m, |p, out| {
        tile(x, m, k, codes, scales, n, p * TILE, out);
    });
    gather_columns(&parts, m, n, TILE)
}

/// Output columns dequantized at a time for [`matmul`]: a panel of about 256 KiB.
fn columns_per_panel(k: usize) -> usize {
    (64 * 1024 / k.max(1)).clamp(16, 512)
}

/// `y = x · (c·s)` like [`matvec`], for many activation rows: the weight is dequantized a
/// panel of columns at a time and multiplied by the f32 GEMM; the panels are split over the
/// cores.
pub fn matmul(x: &[f32], m: usize, k: usize, codes: &[i8], scales: &[f32], n: usize) -> Vec<f32> {
    debug_assert_eq!(codes.len(), n * k);
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let panel = columns_per_panel(k);
    let mut parts = vec![0.0f32; m * n];
    super::for_each_chunk(&mut parts, panel * m, |p, out| {
        let j0 = p * panel;
        let width = out.len() / m;
        // The panel's columns as rows of an [width, k] weight, as the GEMM reads it.
        let mut w = vec![0.0f32; width * k];
        for i in 0..k {
            let c = &codes[i * n + j0..i * n + j0 + width];
            let s = &scales[(i / BLOCK) * n + j0..(i / BLOCK) * n + j0 + width];
            for t in 0..width {
                w[t * k + i] = f32::from(c[t]) * s[t];
            }
        }
        super::gemm::matmul_serial(x, m, k, &w, width, out);
    });
    gather_columns(&parts, m, n, panel)
}

/// [`matvec`] up to [`MAX_ROWS`] rows, [`matmul`] beyond.
pub fn product(x: &[f32], m: usize, k: usize, codes: &[i8], scales: &[f32], n: usize) -> Vec<f32> {
    if m <= MAX_ROWS {
        matvec(x, m, k, codes, scales, n)
    } else {
        matmul(x, m, k, codes, scales, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::{Quantization, dequantize_host, quantize_host};
    use crate::testing::{values, worst, x_wt as reference};

    #[test]
    fn quantized_products_equal_the_product_with_dequantized_weights() {
        // Odd row counts and output sizes; k a multiple of the block.
        for (m, k, n) in [
            (1, 32, 1),
            (1, 64, 3),
            (2, 96, 33),
            (3, 896, 129),
            (5, 160, 7),
            (8, 256, 61),
            (9, 128, 5),
            (40, 224, 530),
            (3, 64, 200),
            (12, 96, 64),
        ] {
            let x = values(m * k, 1 + k as u64);
            let w = values(n * k, 2 + n as u64);
            for scheme in [Quantization::Q8, Quantization::Q4] {
                let (codes, scales) = quantize_host(&w, k, scheme);
                let scales: Vec<f32> = scales.iter().map(|s| s.to_f32()).collect();
                let dequantized = dequantize_host(&codes, &scales, k);
                let want = reference(&x, m, k, &dequantized, n);
                // The kernels read the transposed layout, [k, n] codes and [k / 32, n] scales.
                let blocks = k / BLOCK;
                let codes_kn: Vec<i8> = (0..k * n).map(|e| codes[(e % n) * k + e / n]).collect();
                let scales_kn: Vec<f32> =
                    (0..blocks * n).map(|e| scales[(e % n) * blocks + e / n]).collect();
                let tol = 1e-5 * (k as f32).sqrt() + 1e-6;
                let e = worst(&product(&x, m, k, &codes_kn, &scales_kn, n), &want);
                assert!(e <= tol, "{scheme} {m}x{k}x{n}: off by {e}");
            }
        }
    }
}
