//! The numeric kernels: products of a few f32 activation rows with a weight stored row-major
//! as `[n, k]` in f32, f16 or bf16, accumulated in f32.
//!
//! Each kernel body is written once, as plain Rust that the compiler vectorises, and compiled
//! again for AVX-512 and for AVX2 + FMA; the widest one the processor has is picked at run
//! time. Elsewhere (aarch64, WebAssembly with simd128) the portable build vectorises for
//! whatever the target enables.

use half::{bf16, f16};

use crate::quantize::f16_bits_to_f32;

/// Activation rows up to which a product runs as matrix–vector work (a decode step of a few
/// sequences or beams); larger batches use a GEMM.
pub const MAX_ROWS: usize = 8;

/// f32 lanes accumulated side by side: two AVX-512 registers (four AVX2 ones), so that a
/// single row has independent FMA chains and does not wait on each sum's latency.
pub const LANES: usize = 32;

/// A weight element the kernels read: f32 as it is, f16 and bf16 widened to f32.
pub trait Weight: Copy + Send + Sync + 'static {
    /// One element as f32.
    fn to_f32(self) -> f32;

    /// Writes `src` as f32 into `dst` (of the same length).
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    /// `src` as f32: itself for f32, else widened into `buf` (of the same length).
    #[inline(always)]
    fn widened<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        Self::widen(src, buf);
        buf
    }

    /// `LANES` elements as f32, by value (so that they stay in registers).
    #[inline(always)]
    fn chunk(src: &[Self; LANES]) -> [f32; LANES] {
        std::array::from_fn(|i| src[i].to_f32())
    }
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn widened<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl Weight for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the upper half of an f32: a shift, which vectorises.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    #[inline(always)]
    fn chunk(src: &[Self; LANES]) -> [f32; LANES] {
        // As for f16: the per-lane closure of the default is left a call, not vectorised.
        let mut out = [0.0f32; LANES];
        Self::widen(src, &mut out);
        out
    }
}

impl Weight for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }

    #[inline(always)]
    fn chunk(src: &[Self; LANES]) -> [f32; LANES] {
        // Through a loop over the slice, which vectorises where the per-lane closure does not.
        let mut out = [0.0f32; LANES];
        Self::widen(src, &mut out);
        out
    }
}

/// `a·b + c`, fused where the build has FMA (a plain `mul_add` without it is a library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Adds `w · x[r]` lane-wise into `acc[r]` for the first `w.len() / LANES * LANES` elements,
/// widening each chunk of weights in registers.
#[inline(always)]
fn accumulate<W: Weight, const R: usize, const FMA: bool>(
    w: &[W],
    x: &[&[f32]; R],
    acc: &mut [[f32; LANES]; R],
) {
    let full = w.len() / LANES * LANES;
    for start in (0..full).step_by(LANES) {
        let wc = W::chunk(w[start..start + LANES].try_into().expect("a full chunk"));
        for r in 0..R {
            let xc: &[f32; LANES] = x[r][start..start + LANES].try_into().expect("a full chunk");
            for l in 0..LANES {
                acc[r][l] = madd::<FMA>(wc[l], xc[l], acc[r][l]);
            }
        }
    }
}

/// The dot products of one weight row with `R` activation rows (each of length `k`).
#[inline(always)]
fn row_dots<W: Weight, const R: usize, const FMA: bool>(w: &[W], x: &[&[f32]; R]) -> [f32; R] {
    let k = w.len();
    let mut acc = [[0.0f32; LANES]; R];
    accumulate::<W, R, FMA>(w, x, &mut acc);
    let done = k / LANES * LANES;
    let mut tail = [0.0f32; R];
    if done < k {
        let mut rest = [0.0f32; LANES];
        W::widen(&w[done..], &mut rest[..k - done]);
        for (i, &wi) in rest[..k - done].iter().enumerate() {
            for r in 0..R {
                tail[r] += wi * x[r][done + i];
            }
        }
    }
    // A loop, not `array::from_fn`, whose closure is left a call outside the caller's
    // instruction set.
    let mut sums = tail;
    for (sum, acc) in sums.iter_mut().zip(&acc) {
        *sum += acc.iter().sum::<f32>();
    }
    sums
}

/// `out[j·m + r] = Σ_i w[j·k + i] · x[r·k + i]` for the weight rows of `w` (a block of the
/// weight) and all `m` activation rows, processed four rows at a time.
#[inline(always)]
fn block_body<W: Weight, const FMA: bool>(x: &[f32], m: usize, k: usize, w: &[W], out: &mut [f32]) {
    for (j, row) in w.chunks_exact(k).enumerate() {
        let out = &mut out[j * m..(j + 1) * m];
        let mut r0 = 0;
        while r0 < m {
            let x_row = |r: usize| &x[(r0 + r) * k..(r0 + r + 1) * k];
            match m - r0 {
                1 => {
                    let [a] = row_dots::<W, 1, FMA>(row, &[x_row(0)]);
                    out[r0] = a;
                    r0 += 1;
                }
                2 => {
                    let d = row_dots::<W, 2, FMA>(row, &[x_row(0), x_row(1)]);
                    out[r0..r0 + 2].copy_from_slice(&d);
                    r0 += 2;
                }
                3 => {
                    let d = row_dots::<W, 3, FMA>(row, &[x_row(0), x_row(1), x_row(2)]);
                    out[r0..r0 + 3].copy_from_slice(&d);
                    r0 += 3;
                }
                _ => {
                    let d = row_dots::<W, 4, FMA>(row, &[x_row(0), x_row(1), x_row(2), x_row(3)]);
                    out[r0..r0 + 4].copy_from_slice(&d);
                    r0 += 4;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn block_avx512<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], out: &mut [f32]) {
    block_body::<W, true>(x, m, k, w, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], out: &mut [f32]) {
    block_body::<W, true>(x, m, k, w, out);
}

/// The instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// The widest instruction set this processor runs, detected once.
pub(crate) fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let f16c = std::arch::is_x86_feature_detected!("f16c");
            let fma = std::arch::is_x86_feature_detected!("fma");
            if std::arch::is_x86_feature_detected!("avx512f") && fma && f16c {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && fma && f16c {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// One block of weight rows on the best instruction set.
fn block<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], out: &mut [f32]) {
    match isa() {
        // SAFETY: `isa()` chose these only after detecting every feature they enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { block_avx512(x, m, k, w, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { block_avx2(x, m, k, w, out) },
        Isa::Portable => block_body::<W, false>(x, m, k, w, out),
    }
}

/// Weight rows per parallel task: a few tasks per core, none too small to be worth a task.
pub(super) fn rows_per_task(n: usize, k: usize) -> usize {
    let threads = super::threads();
    let min_rows = (16 * 1024 / k.max(1)).max(1);
    n.div_ceil(threads * 4).max(min_rows).min(n.max(1))
}

/// `y = x · wᵀ` for `x` `[m, k]` (row-major, f32) and `w` `[n, k]` (row-major): `y` is
/// `[m, n]`. Meant for `m ≤ MAX_ROWS`: every weight is read once, whatever `m`.
pub fn matvec<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    // Outputs weight-row-major ([n, m]) so that every task writes one contiguous range.
    let mut yt = vec![0.0f32; n * m];
    if k == 0 {
        return yt;
    }
    let rows = rows_per_task(n, k);
    super::for_each_chunk(&mut yt, rows * m, |index, out| {
        let j0 = index * rows;
        let count = out.len() / m;
        block(x, m, k, &w[j0 * k..(j0 + count) * k], out);
    });
    row_major(yt, m, n)
}

/// `[n, m]` outputs as `[m, n]`.
pub(super) fn row_major(yt: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m <= 1 {
        return yt;
    }
    let mut y = vec![0.0f32; m * n];
    for (j, outs) in yt.chunks_exact(m).enumerate() {
        for (r, &v) in outs.iter().enumerate() {
            y[r * n + j] = v;
        }
    }
    y
}

/// `out[r] += Σ_s p[r·len + s] · v[s]` for `rows` rows of weights `p` over the `len` rows of
/// width `w` in `v` (attention's probabilities times its values): each value row is read and
/// widened once and added into every output row.
#[inline(always)]
fn weighted_rows_body<W: Weight, const FMA: bool>(
    p: &[f32],
    rows: usize,
    v: &[W],
    w: usize,
    out: &mut [f32],
) {
    let len = v.len() / w.max(1);
    let mut buf = vec![0.0f32; w];
    for s in 0..len {
        let widened = W::widened(&v[s * w..(s + 1) * w], &mut buf);
        for r in 0..rows {
            let weight = p[r * len + s];
            for (o, &x) in out[r * w..(r + 1) * w].iter_mut().zip(widened) {
                *o = madd::<FMA>(weight, x, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn weighted_rows_avx512<W: Weight>(
    p: &[f32],
    rows: usize,
    v: &[W],
    w: usize,
    out: &mut [f32],
) {
    weighted_rows_body::<W, true>(p, rows, v, w, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_rows_avx2<W: Weight>(
    p: &[f32],
    rows: usize,
    v: &[W],
    w: usize,
    out: &mut [f32],
) {
    weighted_rows_body::<W, true>(p, rows, v, w, out);
}

/// `out [rows, w] += p [rows, len] · v [len, w]`, on the best instruction set; one thread.
pub fn weighted_rows<W: Weight>(p: &[f32], rows: usize, v: &[W], w: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), rows * w);
    match isa() {
        // SAFETY: `isa()` chose these only after detecting every feature they enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { weighted_rows_avx512(p, rows, v, w, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { weighted_rows_avx2(p, rows, v, w, out) },
        Isa::Portable => weighted_rows_body::<W, false>(p, rows, v, w, out),
    }
}

/// `y = x · wᵀ` like [`matvec`], on the calling thread only (for callers that already split
/// their work over the cores).
pub fn matvec_serial<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    let mut yt = vec![0.0f32; n * m];
    if m > 0 && n > 0 && k > 0 {
        block(x, m, k, w, &mut yt);
    }
    row_major(yt, m, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{values, worst, x_wt as reference};

    /// Odd sizes exercise the lane tails, the widening blocks and uneven task splits.
    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 1, 1),
        (1, 17, 3),
        (2, 300, 33),
        (3, 64, 129),
        (4, 257, 7),
        (5, 896, 130),
        (8, 1000, 61),
    ];

    #[test]
    fn matvec_equals_the_f64_product_for_every_weight_type() {
        for (m, k, n) in SHAPES {
            let x = values(m * k, 1 + k as u64);
            let w = values(n * k, 2 + n as u64);
            let tol = 1e-5 * (k as f32).sqrt() + 1e-6;
            let got = matvec(&x, m, k, &w, n);
            let e = worst(&got, &reference(&x, m, k, &w, n));
            assert!(e <= tol, "f32 {m}x{k}x{n}: off by {e}");

            // Half weights: the reference uses the rounded weights, so only f32 sums differ.
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wb_f: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let e = worst(&matvec(&x, m, k, &wb, n), &reference(&x, m, k, &wb_f, n));
            assert!(e <= tol, "bf16 {m}x{k}x{n}: off by {e}");
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wh_f: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            let e = worst(&matvec(&x, m, k, &wh, n), &reference(&x, m, k, &wh_f, n));
            assert!(e <= tol, "f16 {m}x{k}x{n}: off by {e}");
        }
    }

    #[test]
    fn every_half_widens_exactly() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn a_nan_weight_shows_in_its_output() {
        let (m, k, n) = (1, 40, 3);
        let x = values(m * k, 5);
        let mut w = values(n * k, 6);
        w[k + 7] = f32::NAN;
        let y = matvec(&x, m, k, &w, n);
        assert!(y[0].is_finite() && y[1].is_nan() && y[2].is_finite());
    }
}
