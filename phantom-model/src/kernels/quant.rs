//! Products with quantized weights ([`crate::quantize`]) laid out as Burn sees a linear weight:
//! codes `[k, n]` as i8, one scale (f16 or f32) per block of 32 inputs down each column (`[k / 32, n]`).
//!
//! A decode step ([`matvec`]) streams the codes once, one byte per weight, in memory order:
//! each core takes a contiguous stretch of code rows, widens each row to f32 in registers and
//! adds it, weighted by the activation, into sums over the block that stay in cache; each
//! block's sums are scaled into the outputs once, and the cores' partial outputs added at the
//! end. (Reading a block's 32 rows a tile of columns at a time instead keeps the sums in
//! registers but opens 32 streams `n` bytes apart, which waits on memory.)
//! Larger batches ([`matmul`]) dequantize a panel of columns at a time into a buffer of a few
//! MiB and run the f32 GEMM on it, so no float copy of the whole weight ever exists.
//! In WebAssembly, whose one thread is bound by arithmetic rather than memory, [`matvec`]
//! quantizes the activations per block ([`super::activations`]) and sums each block in
//! integers instead: two code rows interleaved as i16 pairs, `i32x4.dot_i16x8_s` against a
//! pair of activation codes.

use super::dot::MAX_ROWS;
use crate::packed::Codes;
use crate::quantize::{BLOCK, Scale};

/// Codes of each of the [`ROWS`] rows widened at a time with AVX-512 (32 registers): the
/// widened tile takes sixteen of them.
#[cfg(target_arch = "x86_64")]
const WIDE_TILE: usize = 64;
/// [`WIDE_TILE`] for AVX2, WebAssembly and the portable code (16 registers).
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
const NARROW_TILE: usize = 16;

/// `a·b + c`, fused where the build has FMA.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Code rows added together: their products share one pass over the block sums (four
/// streams a row of codes apart, which the prefetchers follow).
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
const ROWS: usize = 4;

/// Code rows between a pass's rows and the rows [`add_rows`] prefetches.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
const AHEAD: usize = 2 * ROWS;

/// Asks for the cache line at `p` in the second-level cache, where the processor can.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
#[inline(always)]
fn prefetch(p: *const i8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing and never faults; SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Adds [`ROWS`] code rows (`n` codes each), widened to f32 `TILE` at a time, times the
/// activations `x[r]` of their inputs into the rows `r0..r0 + R` of the block sums `acc`
/// (`[m, n]`). The rows [`AHEAD`] rows on (`ahead`, when they belong to the same stretch) are
/// prefetched a cache line per tile as they go: the streams are a row of codes apart, which
/// the processor's own prefetchers follow too late.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
#[inline(always)]
fn add_rows<const R: usize, const FMA: bool, const TILE: usize>(
    x: [[f32; ROWS]; R],
    rows: [&[i8]; ROWS],
    ahead: Option<[&[i8]; ROWS]>,
    acc: &mut [f32],
    n: usize,
    r0: usize,
) {
    let full = n / TILE * TILE;
    for t0 in (0..full).step_by(TILE) {
        if let Some(ahead) = ahead
            && t0 % 64 == 0
        {
            for row in ahead {
                prefetch(row[t0..].as_ptr());
            }
        }
        let w: [[f32; TILE]; ROWS] = std::array::from_fn(|q| {
            let c: &[i8; TILE] = rows[q][t0..t0 + TILE].try_into().expect("a full tile");
            std::array::from_fn(|t| f32::from(c[t]))
        });
        for (r, xr) in x.iter().enumerate() {
            let a: &mut [f32; TILE] = (&mut acc[(r0 + r) * n + t0..(r0 + r) * n + t0 + TILE])
                .try_into()
                .expect("a full tile");
            for t in 0..TILE {
                let mut v = a[t];
                for q in 0..ROWS {
                    v = madd::<FMA>(xr[q], w[q][t], v);
                }
                a[t] = v;
            }
        }
    }
    for t in full..n {
        for (r, xr) in x.iter().enumerate() {
            let a = &mut acc[(r0 + r) * n + t];
            for q in 0..ROWS {
                *a = madd::<FMA>(xr[q], f32::from(rows[q][t]), *a);
            }
        }
    }
}

/// Adds the products of the code rows `i0..i1` (whole blocks) into `out` (`[m, n]`), reading
/// the codes in memory order: each code row is widened and added, weighted by the activations
/// (four rows at a time), into the block sums `acc` (`[m, n]`, in cache), which are scaled
/// into `out` once per block.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_body<S: Scale, const FMA: bool, const TILE: usize>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[S],
    n: usize,
    (i0, i1): (usize, usize),
    out: &mut [f32],
) {
    let mut acc = vec![0.0f32; m * n];
    let mut widened = Vec::new();
    for b0 in (i0..i1).step_by(BLOCK) {
        acc.fill(0.0);
        for i in (b0..b0 + BLOCK).step_by(ROWS) {
            let rows: [&[i8]; ROWS] = std::array::from_fn(|q| &codes[(i + q) * n..(i + q + 1) * n]);
            let ahead = (i + AHEAD < i1).then(|| {
                let i = i + AHEAD;
                std::array::from_fn(|q| &codes[(i + q) * n..(i + q + 1) * n])
            });
            let xv = |r: usize| -> [f32; ROWS] { std::array::from_fn(|q| x[r * k + i + q]) };
            let mut r0 = 0;
            while r0 < m {
                let take = (m - r0).min(4);
                match take {
                    1 => add_rows::<1, FMA, TILE>([xv(r0)], rows, ahead, &mut acc, n, r0),
                    2 => {
                        add_rows::<2, FMA, TILE>([xv(r0), xv(r0 + 1)], rows, ahead, &mut acc, n, r0)
                    }
                    3 => add_rows::<3, FMA, TILE>(
                        [xv(r0), xv(r0 + 1), xv(r0 + 2)],
                        rows,
                        ahead,
                        &mut acc,
                        n,
                        r0,
                    ),
                    _ => add_rows::<4, FMA, TILE>(
                        [xv(r0), xv(r0 + 1), xv(r0 + 2), xv(r0 + 3)],
                        rows,
                        ahead,
                        &mut acc,
                        n,
                        r0,
                    ),
                }
                r0 += take;
            }
        }
        let s = S::widen(
            &scales[(b0 / BLOCK) * n..(b0 / BLOCK + 1) * n],
            &mut widened,
        );
        for (o, a) in out.chunks_exact_mut(n).zip(acc.chunks_exact(n)) {
            for ((o, &a), &s) in o.iter_mut().zip(a).zip(s) {
                *o = madd::<FMA>(a, s, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[S],
    n: usize,
    range: (usize, usize),
    out: &mut [f32],
) {
    rows_body::<S, true, WIDE_TILE>(x, m, k, codes, scales, n, range, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[S],
    n: usize,
    range: (usize, usize),
    out: &mut [f32],
) {
    rows_body::<S, true, NARROW_TILE>(x, m, k, codes, scales, n, range, out);
}

/// One range of code rows on the best instruction set.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128"),
    allow(dead_code)
)]
#[allow(clippy::too_many_arguments)]
fn rows<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[S],
    n: usize,
    range: (usize, usize),
    out: &mut [f32],
) {
    use super::dot::{Isa, isa};
    match isa() {
        // SAFETY: `isa()` chose these only after detecting every feature they enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { rows_avx512(x, m, k, codes, scales, n, range, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { rows_avx2(x, m, k, codes, scales, n, range, out) },
        Isa::Portable => rows_body::<S, false, NARROW_TILE>(x, m, k, codes, scales, n, range, out),
    }
}

/// `y = x · (c·s)` for `x` `[m, k]` (f32, row-major), codes `[k, n]` and scales `[k / 32, n]`:
/// `y` is `[m, n]`. `k` must be a multiple of 32. The code rows are split between the cores
/// (each streams one contiguous stretch of the weight) and their partial sums added.
pub fn matvec<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[S],
    n: usize,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(codes.len(), n * k);
    debug_assert_eq!(scales.len(), n * k / BLOCK);
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        let a = super::activations::quantize_activations(x, m, k);
        let pairs = wasm::pairs(&a.codes);
        by_code_rows(m, k, n, |range, out| {
            wasm::code_rows(&a, &pairs, m, k, (codes, scales, n), range, out)
        })
    }
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    by_code_rows(m, k, n, |range, out| {
        rows(x, m, k, codes, scales, n, range, out)
    })
}

/// [`matvec`]'s integer products in WebAssembly SIMD.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    use core::arch::wasm32::*;

    use crate::kernels::activations::Activations;
    use crate::quantize::{BLOCK, Scale};

    /// Columns of one step: sixteen codes of each row, one vector.
    const TILE: usize = 16;

    /// Each activation row's codes two at a time, as `i32x4.dot_i16x8_s` pairs them with two
    /// interleaved code rows: input `2p` in the low half, `2p + 1` in the high (`[m, k / 2]`).
    pub(super) fn pairs(codes: &[i8]) -> Vec<i32> {
        codes
            .chunks_exact(2)
            .map(|p| (i32::from(p[0]) & 0xffff) | (i32::from(p[1]) << 16))
            .collect()
    }

    /// Two code rows of sixteen codes as four vectors of i16 pairs, columns in order: vector
    /// `q` holds columns `4q..4q + 4`, each as its (first row, second row) codes.
    #[inline(always)]
    fn interleave(r0: v128, r1: v128) -> [v128; 4] {
        let lo = i8x16_shuffle::<0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23>(r0, r1);
        let hi =
            i8x16_shuffle::<8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31>(r0, r1);
        [
            i16x8_extend_low_i8x16(lo),
            i16x8_extend_high_i8x16(lo),
            i16x8_extend_low_i8x16(hi),
            i16x8_extend_high_i8x16(hi),
        ]
    }

    /// Adds the products of code rows `i0..i1` (whole blocks) of the weight `(codes, scales,
    /// n)` with the quantized activations `a` (`m` rows; `pairs` from [`pairs`]) into `out`
    /// (`[m, n]`): per block, integer sums `[m, n]` to which each pass adds four code rows,
    /// sixteen columns at a time (the columns past the last whole tile one at a time), then
    /// weighted by both scales into `out`.
    pub(super) fn code_rows<S: Scale>(
        a: &Activations,
        pairs: &[i32],
        m: usize,
        k: usize,
        (codes, scales, n): (&[i8], &[S], usize),
        (i0, i1): (usize, usize),
        out: &mut [f32],
    ) {
        let blocks = k / BLOCK;
        let full = n / TILE * TILE;
        let mut sums = vec![0i32; m * n];
        let mut widened = Vec::new();
        for b0 in (i0..i1).step_by(BLOCK) {
            let b = b0 / BLOCK;
            sums.fill(0);
            for i in (b0..b0 + BLOCK).step_by(4) {
                for t0 in (0..full).step_by(TILE) {
                    // SAFETY: code rows `i..i + 4` hold `n ≥ t0 + 16` codes each.
                    let row = |q: usize| unsafe {
                        v128_load(codes.as_ptr().add((i + q) * n + t0).cast())
                    };
                    let w = [interleave(row(0), row(1)), interleave(row(2), row(3))];
                    for r in 0..m {
                        let at = (r * k + i) / 2;
                        let x = [i32x4_splat(pairs[at]), i32x4_splat(pairs[at + 1])];
                        let s = &mut sums[r * n + t0..r * n + t0 + TILE];
                        for (q, (w0, w1)) in w[0].iter().zip(&w[1]).enumerate() {
                            let dot =
                                i32x4_add(i32x4_dot_i16x8(*w0, x[0]), i32x4_dot_i16x8(*w1, x[1]));
                            // SAFETY: sums `4q..4q + 4` lie within the tile.
                            unsafe {
                                let p = s.as_mut_ptr().add(4 * q).cast::<v128>();
                                v128_store(p, i32x4_add(v128_load(p), dot));
                            }
                        }
                    }
                }
                for j in full..n {
                    for r in 0..m {
                        let dot: i32 = (0..4)
                            .map(|q| {
                                i32::from(codes[(i + q) * n + j])
                                    * i32::from(a.codes[r * k + i + q])
                            })
                            .sum();
                        sums[r * n + j] += dot;
                    }
                }
            }
            let s = S::widen(&scales[b * n..(b + 1) * n], &mut widened);
            for r in 0..m {
                let x_scale = a.scales[r * blocks + b];
                let row = &mut out[r * n..(r + 1) * n];
                for ((o, &sum), &s) in row.iter_mut().zip(&sums[r * n..(r + 1) * n]).zip(s) {
                    *o += sum as f32 * (x_scale * s);
                }
            }
        }
    }
}

/// `[m, n]` outputs of a product with codes `[k, n]` (`k` a multiple of 32), one contiguous
/// stretch of whole blocks of code rows per core: `rows((i0, i1), out)` adds the products of
/// code rows `i0..i1` into `out` (`[m, n]`, zeroed), and the cores' partial outputs are added.
pub(super) fn by_code_rows(
    m: usize,
    k: usize,
    n: usize,
    rows: impl Fn((usize, usize), &mut [f32]) + Sync + Send,
) -> Vec<f32> {
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
        rows((p * per_task, ((p + 1) * per_task).min(k)), out);
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
pub fn matmul<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[S],
    n: usize,
) -> Vec<f32> {
    debug_assert_eq!(codes.len(), n * k);
    by_panels(x, m, k, n, |j, row| {
        for (b, block) in row.chunks_exact_mut(BLOCK).enumerate() {
            let s = scales[b * n + j].get();
            for (ii, v) in block.iter_mut().enumerate() {
                *v = f32::from(codes[(b * BLOCK + ii) * n + j]) * s;
            }
        }
    })
}

/// `y = x · wᵀ` (`x` `[m, k]`, `y` `[m, n]`) for a quantized weight whose row `j` (`k` values)
/// `weight_row(j, row)` writes in f32: a panel of a few MiB of rows at a time, each multiplied
/// by the f32 GEMM on every core, so no float copy of the whole weight ever exists.
pub(super) fn by_panels(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    weight_row: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let panel = columns_per_panel(k);
    let mut y = vec![0.0f32; m * n];
    let mut w = vec![0.0f32; panel.min(n) * k];
    for j0 in (0..n).step_by(panel) {
        let width = panel.min(n - j0);
        let w = &mut w[..width * k];
        // Each thread fills whole rows.
        super::for_each_chunk(w, k, |t, row| weight_row(j0 + t, row));
        let part = super::gemm::matmul(x, m, k, w, width);
        for r in 0..m {
            y[r * n + j0..r * n + j0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
    y
}

/// The integer products of [`super::vnni`] where the processor has them (activations
/// quantized per block); else [`matvec`] up to [`MAX_ROWS`] rows and [`matmul`] beyond.
///
/// Codes in panels ([`Codes::Panels`], [`Codes::PanelNibbles`], with their f16 scales panel
/// by panel) and 4-bit codes two rows to a byte ([`Codes::RowPairs`]) are read so by the
/// integer products; the other kernels unpack them first.
pub fn product<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: Codes<'_>,
    scales: &[S],
    n: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        let integer = if m <= MAX_ROWS {
            super::vnni::matvec(x, m, k, codes, scales, n)
        } else {
            super::vnni::matmul(x, m, k, codes, scales, n)
        };
        if let Some(y) = integer {
            return y;
        }
    }
    let bytes = codes.bytes(n);
    if let Codes::Panels(_) | Codes::PanelNibbles(_) = codes {
        // Panels carry their scales panel by panel; these kernels read them row-major.
        let scales = crate::packed::unpanel_scales(scales, n);
        return portable_product(x, m, k, &bytes, &scales, n);
    }
    portable_product(x, m, k, &bytes, scales, n)
}

/// [`matvec`] up to [`MAX_ROWS`] rows, [`matmul`] beyond.
fn portable_product<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: &[i8],
    scales: &[S],
    n: usize,
) -> Vec<f32> {
    if m <= MAX_ROWS {
        matvec(x, m, k, codes, scales, n)
    } else {
        matmul(x, m, k, codes, scales, n)
    }
}

/// Whether every product of quantized linear weights, and a decode step's product with a
/// 4-bit tied head, quantizes its activations per block ([`super::vnni`]) on this processor.
/// (In WebAssembly only the decode products do, which this does not report: the tests that
/// read it run natively.)
pub fn quantizes_activations() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::vnni::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::{pack_panels, pack_row_pairs, panel_scales};
    use crate::quantize::{Quantization, f16_scales};
    use crate::testing::{QuantizedWeight, quantized_weight, values, worst, x_wt as reference};

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
            (1, 96, 96),
            (7, 160, 96),
        ] {
            let x = values(m * k, 1 + k as u64);
            for scheme in [Quantization::Q8, Quantization::Q4] {
                let QuantizedWeight {
                    codes,
                    scales,
                    codes_kn,
                    scales_kn,
                    dequantized,
                } = quantized_weight(n, k, 2 + n as u64, scheme);
                let want = reference(&x, m, k, &dequantized, n);
                let tol = 1e-5 * (k as f32).sqrt() + 1e-6;
                let float = if m <= MAX_ROWS {
                    matvec(&x, m, k, &codes_kn, &scales_kn, n)
                } else {
                    matmul(&x, m, k, &codes_kn, &scales_kn, n)
                };
                let e = worst(&float, &want);
                assert!(e <= tol, "{scheme} {m}x{k}x{n}: off by {e}");
                // What the model runs: the activations may be quantized too (`vnni.rs` checks
                // those products exactly); 4-bit codes also two rows to a byte.
                let tol = if quantizes_activations() {
                    0.02 * (k as f32).sqrt()
                } else {
                    tol
                };
                let pairs = pack_row_pairs(&codes_kn, n);
                let mut layouts = vec![("bytes", Codes::Bytes(&codes_kn))];
                if scheme == Quantization::Q4 {
                    layouts.push(("row pairs", Codes::RowPairs(&pairs)));
                }
                for (layout, codes) in layouts {
                    let e = worst(&product(&x, m, k, codes, &scales_kn, n), &want);
                    assert!(
                        e <= tol,
                        "{scheme} {layout} {m}x{k}x{n}: the product off by {e}"
                    );
                }
                // Panels, with f16 scales (the integer products where the processor has
                // them) and with f32 ones (the portable kernels, scales put back in order).
                if n.is_multiple_of(32) {
                    let nibbles = scheme == Quantization::Q4;
                    let panels = pack_panels(&codes, n, k, nibbles);
                    let codes = if nibbles {
                        Codes::PanelNibbles(&panels)
                    } else {
                        Codes::Panels(&panels)
                    };
                    let scales = panel_scales(&scales, k);
                    let halves = f16_scales(&scales);
                    let e = worst(&product(&x, m, k, codes, &halves, n), &want);
                    assert!(e <= tol, "{scheme} panels {m}x{k}x{n}: off by {e}");
                    let e = worst(&product(&x, m, k, codes, &scales, n), &want);
                    assert!(
                        e <= tol,
                        "{scheme} panels, f32 scales {m}x{k}x{n}: off by {e}"
                    );
                }
            }
        }
    }
}
