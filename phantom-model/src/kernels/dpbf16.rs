//! Products of bf16 activations with bf16 weights on processors with AVX512-BF16 (Intel
//! Cooper Lake and Sapphire Rapids on, AMD Zen 4 on): one `vdpbf16ps` multiplies sixteen pairs
//! of bf16 neighbours and adds each pair's sum into an f32 lane, twice the work of an f32 FMA
//! on the same register width, and the operands are read at half the bytes.
//!
//! Used when a model computes in bf16, so that its activations are already bf16 and nothing
//! is rounded that was not rounded before; products still accumulate in f32. A decode step's
//! few rows stream each weight row once ([`matvec`]); larger batches run the blocked GEMM
//! ([`super::gemm::matmul_bf16`]) over pair-packed slivers with [`micro`].

// Without x86 the products are never available.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]

use half::bf16;

/// Whether this processor has the AVX512-BF16 pair products (and the AVX-512 loads the
/// kernels use with them), detected once.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `y = x · wᵀ` for `x` `[m, k]` and `w` `[n, k]`, both bf16 and row-major; `[m, n]` in f32.
/// Meant for a few rows (`m ≤` [`super::MAX_ROWS`]): every weight is read once, the weight
/// rows split between the cores. `None` where the processor lacks the pair products.
pub fn matvec(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize) -> Option<Vec<f32>> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    if !available() {
        return None;
    }
    let mut yt = vec![0.0f32; n * m];
    #[cfg(target_arch = "x86_64")]
    if m > 0 && n > 0 && k > 0 {
        let rows = super::dot::rows_per_task(n, k);
        super::for_each_chunk(&mut yt, rows * m, |index, out| {
            let j0 = index * rows;
            let count = out.len() / m;
            // SAFETY: `available()` detected every feature `x86::rows` enables.
            unsafe { x86::rows(x, m, k, &w[j0 * k..(j0 + count) * k], out) };
        });
    }
    Some(super::dot::row_major(yt, m, n))
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::micro;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use crate::kernels::gemm::x86::{tile, tile_12x32};

    /// Sixteen pairs of bf16 at `p` (32 values).
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn load_pairs(p: *const u32) -> __m512bh {
        // SAFETY: the caller's pointer holds 64 bytes; a bit-for-bit reinterpretation.
        unsafe { std::mem::transmute(_mm512_loadu_si512(p.cast())) }
    }

    /// The first `count` (1 to 32) bf16 at `p`, zeros after them.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn load_head(p: *const bf16, count: usize) -> __m512bh {
        let mask: __mmask32 = u32::MAX >> (32 - count);
        // SAFETY: only the first `count` values are read; a bit-for-bit reinterpretation.
        unsafe { std::mem::transmute(_mm512_maskz_loadu_epi16(mask, p.cast())) }
    }

    /// One pair of bf16 in every lane.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    fn broadcast_pair(pair: u32) -> __m512bh {
        // SAFETY: a bit-for-bit reinterpretation of sixteen 32-bit lanes.
        unsafe { std::mem::transmute(_mm512_set1_epi32(pair as i32)) }
    }

    /// `acc + a·b`, lane by lane over pairs: each f32 lane adds both products of its pair.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    fn dot_pairs(a: __m512bh, b: __m512bh, acc: __m512) -> __m512 {
        _mm512_dpbf16_ps(acc, a, b)
    }

    /// 12 × 32 tile over pair-packed slivers: 24 accumulators, each step two loads of B (16
    /// pairs each) and 12 broadcast pairs of A.
    ///
    /// # Safety
    ///
    /// The processor has AVX-512F and AVX512-BF16; `a` holds `12·steps` pairs, `b`
    /// `32·steps`, and `c` a 12 × 32 tile with rows `ldc` apart.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn micro(
        steps: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        tile_12x32!(
            steps,
            a,
            b,
            c,
            ldc,
            accumulate,
            load_pairs,
            broadcast_pair,
            dot_pairs
        );
    }

    /// The dot products of one weight row with `R` activation rows, two accumulators a row so
    /// that a single row has independent chains.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn row_dots<const R: usize>(w: &[bf16], x: [&[bf16]; R]) -> [f32; R] {
        let k = w.len();
        let mut even = [_mm512_setzero_ps(); R];
        let mut odd = [_mm512_setzero_ps(); R];
        let mut i = 0;
        // SAFETY: every load below reads within the first `k` values of `w` and of each row.
        unsafe {
            while i + 64 <= k {
                let w0 = load_pairs(w.as_ptr().add(i).cast());
                let w1 = load_pairs(w.as_ptr().add(i + 32).cast());
                for r in 0..R {
                    even[r] = dot_pairs(w0, load_pairs(x[r].as_ptr().add(i).cast()), even[r]);
                    odd[r] = dot_pairs(w1, load_pairs(x[r].as_ptr().add(i + 32).cast()), odd[r]);
                }
                i += 64;
            }
            while i < k {
                let count = (k - i).min(32);
                let wi = load_head(w.as_ptr().add(i), count);
                for r in 0..R {
                    even[r] = dot_pairs(wi, load_head(x[r].as_ptr().add(i), count), even[r]);
                }
                i += count;
            }
        }
        std::array::from_fn(|r| _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r])))
    }

    /// `out[j·m + r] = Σ_i w[j·k + i] · x[r·k + i]` for the weight rows of `w` and all `m`
    /// activation rows, four rows at a time.
    ///
    /// # Safety
    ///
    /// The processor has AVX-512F, AVX-512BW and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn rows(x: &[bf16], m: usize, k: usize, w: &[bf16], out: &mut [f32]) {
        for (j, row) in w.chunks_exact(k).enumerate() {
            let out = &mut out[j * m..(j + 1) * m];
            let x_row = |r: usize| &x[r * k..(r + 1) * k];
            let mut r0 = 0;
            // SAFETY: the caller checked the features these enable.
            unsafe {
                while r0 < m {
                    let done = match m - r0 {
                        1 => {
                            out[r0] = row_dots(row, [x_row(r0)])[0];
                            1
                        }
                        2 => {
                            let d = row_dots(row, [x_row(r0), x_row(r0 + 1)]);
                            out[r0..r0 + 2].copy_from_slice(&d);
                            2
                        }
                        3 => {
                            let d = row_dots(row, [x_row(r0), x_row(r0 + 1), x_row(r0 + 2)]);
                            out[r0..r0 + 3].copy_from_slice(&d);
                            3
                        }
                        _ => {
                            let rows = [x_row(r0), x_row(r0 + 1), x_row(r0 + 2), x_row(r0 + 3)];
                            out[r0..r0 + 4].copy_from_slice(&row_dots(row, rows));
                            4
                        }
                    };
                    r0 += done;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::testing::{values, worst, x_wt as reference};

    fn rounded(v: &[f32]) -> (Vec<bf16>, Vec<f32>) {
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let f = b.iter().map(|x| x.to_f32()).collect();
        (b, f)
    }

    #[test]
    fn pair_products_equal_the_f64_product_of_the_rounded_values() {
        if !available() {
            eprintln!("skipped: this processor has no AVX512-BF16");
            return;
        }
        // Odd depths split the last pair; depths past 64 and KC blocks; rows past one tile,
        // one row block (MC) and one task's columns.
        for (m, k, n) in [
            (1, 1, 1),
            (1, 17, 3),
            (2, 63, 33),
            (3, 64, 129),
            (4, 257, 7),
            (5, 896, 130),
            (8, 1001, 61),
            (9, 33, 5),
            (13, 300, 33),
            (25, 513, 70),
            (150, 97, 40),
            (40, 64, 2100),
        ] {
            let (x, xf) = rounded(&values(m * k, 1 + k as u64));
            let (w, wf) = rounded(&values(n * k, 2 + n as u64));
            let want = reference(&xf, m, k, &wf, n);
            let tol = 2e-5 * (k as f32).sqrt() + 1e-6;
            if m <= crate::kernels::MAX_ROWS {
                let got = matvec(&x, m, k, &w, n).expect("available");
                let e = worst(&got, &want);
                assert!(e <= tol, "matvec {m}x{k}x{n}: off by {e}");
            }
            let got = crate::kernels::gemm::matmul_bf16(&x, m, k, &w, n).expect("available");
            let e = worst(&got, &want);
            assert!(e <= tol, "gemm {m}x{k}x{n}: off by {e}");
        }
    }

    #[test]
    fn a_nan_weight_shows_in_its_output() {
        if !available() {
            return;
        }
        let (m, k, n) = (2, 40, 3);
        let (x, _) = rounded(&values(m * k, 5));
        let (mut w, _) = rounded(&values(n * k, 6));
        w[k + 7] = bf16::NAN;
        for y in [
            matvec(&x, m, k, &w, n).expect("available"),
            crate::kernels::gemm::matmul_bf16(&x, m, k, &w, n).expect("available"),
        ] {
            assert!(
                y[0].is_finite() && y[1].is_nan() && y[2].is_finite(),
                "{y:?}"
            );
        }
    }
}
