//! Products with quantized weights ([`crate::quantize`]) laid out as Burn sees a linear weight:
//! codes `[k, n]` as i8, one f32 scale per block of 32 inputs down each column (`[k / 32, n]`).
//!
//! A decode step ([`matvec`]) streams the codes once, one byte per weight: each core takes a
//! contiguous stretch of code rows, widens each row to f32 times its scales in registers and
//! adds it, weighted by the activation, into outputs that stay in cache; the cores' partial
//! sums are added at the end.
//! Larger batches ([`matmul`]) dequantize a panel of columns at a time into a buffer of a few
//! MiB and run the f32 GEMM on it, so no float copy of the whole weight ever exists.

use super::dot::{Isa, MAX_ROWS, isa};
use crate::quantize::BLOCK;

/// Output columns widened at a time: one code row of them fits a few vector registers.
const TILE: usize = 64;

/// `a·b + c`, fused where the build has FMA.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `R` activation rows times one block of 32 code rows (from `i0`) and the [`TILE`] columns
/// from `t0`, added into `out` (rows `n` apart) times the block's scales: the sums over the
/// block stay in registers and the scales multiply once per block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_tile<const R: usize, const FMA: bool>(
    x: &[&[f32]; R],
    codes: &[i8],
    scales: &[f32],
    n: usize,
    i0: usize,
    t0: usize,
    out: &mut [f32],
    r0: usize,
) {
    let mut acc = [[0.0f32; TILE]; R];
    for ii in 0..BLOCK {
        let i = i0 + ii;
        let c: &[i8; TILE] = codes[i * n + t0..i * n + t0 + TILE]
            .try_into()
            .expect("a full tile");
        let w: [f32; TILE] = std::array::from_fn(|t| f32::from(c[t]));
        for r in 0..R {
            let xv = x[r][i];
            for t in 0..TILE {
                acc[r][t] = madd::<FMA>(xv, w[t], acc[r][t]);
            }
        }
    }
    let s: &[f32; TILE] = scales[(i0 / BLOCK) * n + t0..(i0 / BLOCK) * n + t0 + TILE]
        .try_into()
        .expect("a full tile");
    for r in 0..R {
        let o: &mut [f32; TILE] = (&mut out[(r0 + r) * n + t0..(r0 + r) * n + t0 + TILE])
            .try_into()
            .expect("a full tile");
        for t in 0..TILE {
            o[t] = madd::<FMA>(acc[r][t], s[t], o[t]);
        }
    }
}

/// Adds the products of the code rows `i0..i1` (whole blocks, all `n` columns) into `out`
/// (`[m, n]`), a block of rows and a [`TILE`] of columns at a time, four activation rows at a
/// time; the columns past the last whole tile go one by one.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_body<const FMA: bool>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[f32],
    n: usize,
    (i0, i1): (usize, usize),
    out: &mut [f32],
) {
    let full = n / TILE * TILE;
    for b0 in (i0..i1).step_by(BLOCK) {
        for t0 in (0..full).step_by(TILE) {
            let mut r0 = 0;
            while r0 < m {
                let row = |r: usize| &x[(r0 + r) * k..(r0 + r + 1) * k];
                let take = (m - r0).min(4);
                match take {
                    1 => block_tile::<1, FMA>(&[row(0)], codes, scales, n, b0, t0, out, r0),
                    2 => block_tile::<2, FMA>(&[row(0), row(1)], codes, scales, n, b0, t0, out, r0),
                    3 => block_tile::<3, FMA>(
                        &[row(0), row(1), row(2)],
                        codes,
                        scales,
                        n,
                        b0,
                        t0,
                        out,
                        r0,
                    ),
                    _ => block_tile::<4, FMA>(
                        &[row(0), row(1), row(2), row(3)],
                        codes,
                        scales,
                        n,
                        b0,
                        t0,
                        out,
                        r0,
                    ),
                }
                r0 += take;
            }
        }
        for t in full..n {
            let s = scales[(b0 / BLOCK) * n + t];
            for r in 0..m {
                let mut sum = 0.0f32;
                for i in b0..b0 + BLOCK {
                    sum = madd::<FMA>(x[r * k + i], f32::from(codes[i * n + t]), sum);
                }
                out[r * n + t] = madd::<FMA>(sum, s, out[r * n + t]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[f32],
    n: usize,
    range: (usize, usize),
    out: &mut [f32],
) {
    rows_body::<true>(x, m, k, codes, scales, n, range, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[f32],
    n: usize,
    range: (usize, usize),
    out: &mut [f32],
) {
    rows_body::<true>(x, m, k, codes, scales, n, range, out);
}

/// One range of code rows on the best instruction set.
#[allow(clippy::too_many_arguments)]
fn rows(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[f32],
    n: usize,
    range: (usize, usize),
    out: &mut [f32],
) {
    match isa() {
        // SAFETY: `isa()` chose these only after detecting every feature they enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { rows_avx512(x, m, k, codes, scales, n, range, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { rows_avx2(x, m, k, codes, scales, n, range, out) },
        Isa::Portable => rows_body::<false>(x, m, k, codes, scales, n, range, out),
    }
}

/// `y = x · (c·s)` for `x` `[m, k]` (f32, row-major), codes `[k, n]` and scales `[k / 32, n]`:
/// `y` is `[m, n]`. `k` must be a multiple of 32. The code rows are split between the cores
/// (each streams one contiguous stretch of the weight) and their partial sums added.
pub fn matvec(x: &[f32], m: usize, k: usize, codes: &[i8], scales: &[f32], n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(codes.len(), n * k);
    debug_assert_eq!(scales.len(), n * k / BLOCK);
    debug_assert!(k.is_multiple_of(BLOCK));
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    // Whole blocks per task; one task per core, fewer for a small weight.
    let blocks = k / BLOCK;
    let tasks = super::threads()
        .min(blocks)
        .min((k * n / (64 * 1024)).max(1));
    let per_task = blocks.div_ceil(tasks) * BLOCK;
    let tasks = k.div_ceil(per_task);
    let mut partial = vec![0.0f32; tasks * m * n];
    super::for_each_chunk(&mut partial, m * n, |p, out| {
        let range = (p * per_task, ((p + 1) * per_task).min(k));
        rows(x, m, k, codes, scales, n, range, out);
    });
    let mut parts = partial.chunks_exact(m * n);
    let mut y = parts.next().map(<[f32]>::to_vec).unwrap_or_default();
    for part in parts {
        for (a, b) in y.iter_mut().zip(part) {
            *a += b;
        }
    }
    y
}

/// Output columns dequantized at a time for [`matmul`]: a panel of a few MiB, wide enough for
/// the GEMM to split between the cores.
fn columns_per_panel(k: usize) -> usize {
    ((2 << 20) / (4 * k.max(1))).clamp(64, 1024) / 32 * 32
}

/// `y = x · (c·s)` like [`matvec`], for many activation rows: the weight is dequantized a panel
/// of columns at a time, as rows of `[width, k]` (the order the f32 GEMM reads), and each
/// panel is multiplied by the GEMM on every core.
pub fn matmul(x: &[f32], m: usize, k: usize, codes: &[i8], scales: &[f32], n: usize) -> Vec<f32> {
    debug_assert_eq!(codes.len(), n * k);
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let panel = columns_per_panel(k);
    let mut y = vec![0.0f32; m * n];
    let mut w = vec![0.0f32; panel.min(n) * k];
    for j0 in (0..n).step_by(panel) {
        let width = panel.min(n - j0);
        let w = &mut w[..width * k];
        // Column t of the panel becomes row t of `w`; each thread fills whole rows.
        super::for_each_chunk(w, k, |t, row| {
            let j = j0 + t;
            for (b, block) in row.chunks_exact_mut(BLOCK).enumerate() {
                let s = scales[b * n + j];
                for (ii, v) in block.iter_mut().enumerate() {
                    *v = f32::from(codes[(b * BLOCK + ii) * n + j]) * s;
                }
            }
        });
        let part = super::gemm::matmul(x, m, k, w, width);
        for r in 0..m {
            y[r * n + j0..r * n + j0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
    y
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
                let dequantized = dequantize_host(&codes, &scales, k);
                let want = reference(&x, m, k, &dequantized, n);
                // The kernels read the transposed layout, [k, n] codes and [k / 32, n] scales.
                let blocks = k / BLOCK;
                let codes_kn: Vec<i8> = (0..k * n).map(|e| codes[(e % n) * k + e / n]).collect();
                let scales_kn: Vec<f32> = (0..blocks * n)
                    .map(|e| scales[(e % n) * blocks + e / n])
                    .collect();
                let tol = 1e-5 * (k as f32).sqrt() + 1e-6;
                let e = worst(&product(&x, m, k, &codes_kn, &scales_kn, n), &want);
                assert!(e <= tol, "{scheme} {m}x{k}x{n}: off by {e}");
            }
        }
    }
}
