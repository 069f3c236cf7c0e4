//! Activation rows quantized like the weights ([`crate::quantize`]), per row and block of 32
//! inputs: scale `max|x| / 127`, codes rounded to the nearest (ties to even), as llama.cpp
//! quantizes the activations of its Q8_0 and Q4_0 products. A block's product with the weight
//! codes is then an exact integer sum, weighted once by both scales: the integer kernels
//! ([`super::vnni`] on x86-64, the WebAssembly row products of [`super::quant_rows`]) read
//! these.

use crate::quantize::BLOCK;

/// Activation rows `[m, k]` quantized per block of 32 inputs.
pub(crate) struct Activations {
    /// One code per input, row-major `[m, k]`, in `−127..=127`.
    pub codes: Vec<i8>,
    /// Each block's scale, `[m, k / 32]` (NaN for a block holding a NaN).
    pub scales: Vec<f32>,
    /// Each block's `128 · Σ codes`, the weight codes' shift to take off.
    pub offsets: Vec<i32>,
}

/// `x` (`[m, k]`, `k` a multiple of 32) quantized per row and block, stretches of rows on
/// every core.
pub(crate) fn quantize_activations(x: &[f32], m: usize, k: usize) -> Activations {
    debug_assert_eq!(x.len(), m * k);
    let mut a = Activations {
        codes: vec![0i8; m * k],
        scales: vec![0.0; m * k / BLOCK],
        offsets: vec![0; m * k / BLOCK],
    };
    let rows = m.div_ceil(super::threads() * 4).max(1);
    let (values, blocks) = (rows * k, rows * k / BLOCK);
    let task = |((x, codes), (scales, offsets))| quantize_rows(x, codes, scales, offsets);
    #[cfg(feature = "threads")]
    {
        use rayon::prelude::*;
        x.par_chunks(values)
            .zip(a.codes.par_chunks_mut(values))
            .zip(
                a.scales
                    .par_chunks_mut(blocks)
                    .zip(a.offsets.par_chunks_mut(blocks)),
            )
            .for_each(task);
    }
    #[cfg(not(feature = "threads"))]
    x.chunks(values)
        .zip(a.codes.chunks_mut(values))
        .zip(
            a.scales
                .chunks_mut(blocks)
                .zip(a.offsets.chunks_mut(blocks)),
        )
        .for_each(task);
    a
}

/// [`quantize_blocks`] on the best instruction set.
fn quantize_rows(x: &[f32], codes: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    match super::dot::isa() {
        // SAFETY: `isa()` chose it only after detecting AVX-512.
        #[cfg(target_arch = "x86_64")]
        super::dot::Isa::Avx512 => unsafe { quantize_avx512(x, codes, scales, offsets) },
        _ => quantize_blocks(x, codes, scales, offsets),
    }
}

/// [`quantize_blocks`] with AVX-512: a block is two registers, its largest magnitude and its
/// code sum one reduction each (the portable loop's reductions stay scalar chains).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_avx512(x: &[f32], codes: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    use std::arch::x86_64::*;
    let blocks = x.len() / BLOCK;
    assert!(codes.len() >= blocks * BLOCK && scales.len() >= blocks && offsets.len() >= blocks);
    let (low, high) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
    for b in 0..blocks {
        // SAFETY: block `b` holds 32 values and 32 codes (asserted above).
        let (x0, x1) = unsafe {
            let p = x.as_ptr().add(b * BLOCK);
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        };
        let peak = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        // `v − v` is 0 for a finite value and NaN for a NaN or an infinity.
        let finite = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(_mm512_sub_ps(x0, x0), _mm512_sub_ps(x1, x1))
            == 0xffff;
        let (scale, inv) = if peak > 0.0 {
            (peak / 127.0, 127.0 / peak)
        } else {
            (0.0, 0.0)
        };
        let inv = _mm512_set1_ps(inv);
        // Rounded to the nearest, ties to even; a NaN (a block marked by its scale) converts
        // to the smallest integer and is clamped into range like the portable loop's.
        let code = |v: __m512| {
            let c = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(v, inv),
            );
            _mm512_min_epi32(_mm512_max_epi32(c, low), high)
        };
        let (c0, c1) = (code(x0), code(x1));
        // SAFETY: as above.
        unsafe {
            let out = codes.as_mut_ptr().add(b * BLOCK);
            _mm_storeu_si128(out.cast(), _mm512_cvtepi32_epi8(c0));
            _mm_storeu_si128(out.add(16).cast(), _mm512_cvtepi32_epi8(c1));
        }
        scales[b] = if finite { scale } else { f32::NAN };
        offsets[b] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
    }
}

/// The blocks of `x` quantized into `codes`, `scales` and `offsets` (one per block), compiled
/// for the instruction set of its caller.
#[inline(always)]
fn quantize_blocks(x: &[f32], codes: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    let blocks = x.chunks_exact(BLOCK).zip(codes.chunks_exact_mut(BLOCK));
    for ((block, out), (scale_out, offset_out)) in blocks.zip(scales.iter_mut().zip(offsets)) {
        let block: &[f32; BLOCK] = block.try_into().expect("a whole block");
        // Sixteen lanes at a time: the largest magnitude, and `Σ 0·x`, NaN when the block
        // holds a NaN or an infinity.
        let mut peak = [0f32; 16];
        let mut poison = [0f32; 16];
        for t in 0..16 {
            let (a, b) = (block[t], block[t + 16]);
            peak[t] = peak[t].max(a.abs()).max(b.abs());
            poison[t] += a * 0.0 + b * 0.0;
        }
        let peak = peak.iter().fold(0f32, |p, &v| p.max(v));
        let finite = poison.iter().sum::<f32>() == 0.0;
        let (scale, inv) = if peak > 0.0 {
            (peak / 127.0, 127.0 / peak)
        } else {
            (0.0, 0.0)
        };
        let mut sum = 0i32;
        for (o, &v) in out.iter_mut().zip(block) {
            // Within ±127 already but for rounding; `max` and `min` also map a NaN (a block
            // marked by its scale) into range, which `clamp` would keep.
            #[allow(clippy::manual_clamp)]
            let c = (v * inv).round_ties_even().max(-127.0).min(127.0);
            // SAFETY: `c` is finite and within ±127, which an i32 holds.
            let c = unsafe { c.to_int_unchecked::<i32>() };
            *o = c as i8;
            sum += c;
        }
        *scale_out = if finite { scale } else { f32::NAN };
        *offset_out = 128 * sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_are_quantized_per_block_and_a_nan_is_kept() {
        let mut x: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        x[40] = f32::NAN;
        let a = quantize_activations(&x, 1, 64);
        // Block 0 spans -20..=11: its largest magnitude maps to -127.
        assert_eq!(a.codes[0], -127);
        assert_eq!(a.scales[0], 20.0 / 127.0);
        assert_eq!(
            a.codes[31],
            (11.0f32 * 127.0 / 20.0).round_ties_even() as i8
        );
        let sum: i32 = a.codes[..32].iter().map(|&c| i32::from(c)).sum();
        assert_eq!(a.offsets[0], 128 * sum);
        assert!(a.scales[1].is_nan());
        // An all-zero block: scale and codes 0.
        let a = quantize_activations(&[0.0; 32], 1, 32);
        assert_eq!((a.scales[0], a.codes.iter().all(|&c| c == 0)), (0.0, true));
    }

    #[test]
    fn every_instruction_set_quantizes_alike() {
        let k = 32 * 40;
        let mut x: Vec<f32> = crate::testing::values(k, 9)
            .iter()
            .map(|v| 50.0 * v)
            .collect();
        // A zero block, a NaN, an infinity, ties, and values of very different sizes.
        x[32..64].fill(0.0);
        x[70] = f32::NAN;
        x[100] = f32::INFINITY;
        x[128..160].copy_from_slice(&[0.5; 32]);
        x[130] = 127.0;
        x[160..192].iter_mut().for_each(|v| *v *= 1e-30);
        let blocks = k / BLOCK;
        let mut portable = (vec![0i8; k], vec![0f32; blocks], vec![0i32; blocks]);
        quantize_blocks(&x, &mut portable.0, &mut portable.1, &mut portable.2);
        let mut rows = (vec![0i8; k], vec![0f32; blocks], vec![0i32; blocks]);
        quantize_rows(&x, &mut rows.0, &mut rows.1, &mut rows.2);
        assert_eq!(rows.0, portable.0);
        assert_eq!(rows.2, portable.2);
        for (a, b) in rows.1.iter().zip(&portable.1) {
            assert!(a == b || (a.is_nan() && b.is_nan()), "{a} vs {b}");
        }
        assert!(portable.1[2].is_nan() && portable.1[3].is_nan());
    }
}
