//! What the unit tests of the kernels and linear layers share: deterministic inputs and an f64
//! reference product.

/// `n` deterministic values in [-1, 1) from `seed`.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `x · wᵀ` in f64: `x` `[m, k]`, `w` `[n, k]` (rows of outputs), result `[m, n]`.
pub fn x_wt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for r in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                .sum();
            y[r * n + j] = dot as f32;
        }
    }
    y
}

/// Largest |got − want|; NaN when either holds a NaN.
pub fn worst(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).fold(0.0f32, |m, (g, w)| {
        let d = (g - w).abs();
        if m.is_nan() || d.is_nan() {
            f32::NAN
        } else {
            m.max(d)
        }
    })
}

/// A deterministic `[n, k]` weight quantized as `scheme`: codes and scales in the checkpoint's
/// order (`[n, k]`, `[n, k / 32]`), as the column kernels read them (`[k, n]`, `[k / 32, n]`),
/// and dequantized (`[n, k]`).
pub struct QuantizedWeight {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub codes_kn: Vec<i8>,
    pub scales_kn: Vec<f32>,
    pub dequantized: Vec<f32>,
}

/// [`QuantizedWeight`] of `n · k` values drawn from `seed`.
pub fn quantized_weight(
    n: usize,
    k: usize,
    seed: u64,
    scheme: crate::quantize::Quantization,
) -> QuantizedWeight {
    use crate::quantize::{BLOCK, dequantize_host, quantize_host, transpose_into};
    let (codes, scales) = quantize_host(&values(n * k, seed), k, scheme);
    QuantizedWeight {
        codes_kn: transpose_into(&codes, n, k, Vec::new()),
        scales_kn: transpose_into(&scales, n, k / BLOCK, Vec::new()),
        dequantized: dequantize_host(&codes, &scales, k),
        codes,
        scales,
    }
}
