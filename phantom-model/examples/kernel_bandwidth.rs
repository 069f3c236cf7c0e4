//! Read bandwidth of the decode kernels: one activation row times a stack of weights as large
//! as Phantom-0.5B's decoder, in each weight precision.
//!
//! `cargo run --release -p phantom-model --example kernel_bandwidth`

use std::time::Instant;

use half::{bf16, f16};
use phantom_model::kernels::dot::{Weight, matvec};

fn run<W: Weight>(name: &str, weights: &[Vec<W>], k: usize, n: usize) {
    let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
    let bytes: usize = weights.iter().map(|w| w.len() * size_of::<W>()).sum();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for w in weights {
            std::hint::black_box(matvec(&x, 1, k, w, n));
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "{name}: {:.1} GB/s ({:.1} ms per pass)",
        bytes as f64 / best / 1e9,
        best * 1e3
    );
}

fn main() {
    // 24 layers of the MLP's gate projection: 4864 x 896.
    let (k, n, layers) = (896, 4864, 72);
    let f: Vec<Vec<f32>> = (0..layers)
        .map(|l| (0..n * k).map(|i| ((i + l) as f32 * 1e-3).cos()).collect())
        .collect();
    run("f32", &f, k, n);
    let b: Vec<Vec<bf16>> = f
        .iter()
        .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
        .collect();
    run("bf16", &b, k, n);
    let h: Vec<Vec<f16>> = f
        .iter()
        .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
        .collect();
    run("f16", &h, k, n);
    quantized_speed(&f, k, n);
    gemm_speed();
}

/// The same stack quantized (8-bit codes, one scale per 32 inputs, laid out `[k, n]` as the
/// model keeps them): decode bandwidth, and the product with a 128-token prompt.
fn quantized_speed(weights: &[Vec<f32>], k: usize, n: usize) {
    use phantom_model::kernels::quant::{matmul, matvec, product};
    use phantom_model::packed::{Codes, pack_half_blocks, pack_row_pairs};
    use phantom_model::quantize::{Quantization, quantize_host};
    let stack: Vec<(Vec<i8>, Vec<f32>)> = weights
        .iter()
        .map(|w| {
            let (codes, scales) = quantize_host(w, k, Quantization::Q8);
            let blocks = k / 32;
            let codes_kn = (0..k * n).map(|e| codes[(e % n) * k + e / n]).collect();
            let scales_kn = (0..blocks * n)
                .map(|e| scales[(e % n) * blocks + e / n])
                .collect();
            (codes_kn, scales_kn)
        })
        .collect();
    let bytes: usize = stack.iter().map(|(c, s)| c.len() + 4 * s.len()).sum();
    let x: Vec<f32> = (0..128 * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for (codes, scales) in &stack {
            std::hint::black_box(matvec(&x[..k], 1, k, codes, scales, n));
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "q8, float activations: {:.1} GB/s ({:.1} ms per pass)",
        bytes as f64 / best / 1e9,
        best * 1e3
    );
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for (codes, scales) in &stack {
            std::hint::black_box(product(&x[..k], 1, k, Codes::Bytes(codes), scales, n));
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "q8, as the model runs a decode step (integer products: {}): {:.1} GB/s ({:.1} ms per pass)",
        phantom_model::kernels::quant::quantizes_activations(),
        bytes as f64 / best / 1e9,
        best * 1e3
    );
    // 4-bit codes two rows to a byte, as flex keeps them where the integer products read
    // them so (the q8 codes clamped to the 4-bit range: the bandwidth does not care).
    let pairs: Vec<(Vec<u8>, &Vec<f32>)> = stack
        .iter()
        .map(|(codes, scales)| {
            let q4: Vec<i8> = codes.iter().map(|&c| c.clamp(-7, 7)).collect();
            (pack_row_pairs(&q4, n), scales)
        })
        .collect();
    let pair_bytes: usize = pairs.iter().map(|(c, s)| c.len() + 4 * s.len()).sum();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for (codes, scales) in &pairs {
            std::hint::black_box(product(&x[..k], 1, k, Codes::RowPairs(codes), scales, n));
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "q4 in row pairs, a decode step: {:.1} GB/s ({:.1} ms per pass)",
        pair_bytes as f64 / best / 1e9,
        best * 1e3
    );
    // The token embeddings' layout, `[n, k]` with blocks along each row, as the tied head
    // reads it: the first weights quantized again in their own order.
    let rows: Vec<(Vec<i8>, Vec<f32>)> = weights
        .iter()
        .map(|w| quantize_host(w, k, Quantization::Q8))
        .collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for (codes, scales) in &rows {
            std::hint::black_box(phantom_model::kernels::quant_rows::matvec(
                &x[..k],
                1,
                k,
                Codes::Bytes(codes),
                scales,
                n,
            ));
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "q8 rows (tied head): {:.1} GB/s ({:.1} ms per pass)",
        bytes as f64 / best / 1e9,
        best * 1e3
    );
    // The same rows in 4 bits, a block's two halves to a byte.
    let halves: Vec<(Vec<u8>, &Vec<f32>)> = rows
        .iter()
        .map(|(codes, scales)| {
            let q4: Vec<i8> = codes.iter().map(|&c| c.clamp(-7, 7)).collect();
            (pack_half_blocks(&q4), scales)
        })
        .collect();
    let half_bytes: usize = halves.iter().map(|(c, s)| c.len() + 4 * s.len()).sum();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for (codes, scales) in &halves {
            std::hint::black_box(phantom_model::kernels::quant_rows::matvec(
                &x[..k],
                1,
                k,
                Codes::HalfBlocks(codes),
                scales,
                n,
            ));
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "q4 rows in half blocks (tied head): {:.1} GB/s ({:.1} ms per pass)",
        half_bytes as f64 / best / 1e9,
        best * 1e3
    );
    let m = 128;
    let flops = 2.0 * (m * n * k) as f64 * 8.0;
    let start = Instant::now();
    for (codes, scales) in stack.iter().take(8) {
        std::hint::black_box(matmul(&x, m, k, codes, scales, n));
    }
    let t = start.elapsed().as_secs_f64();
    println!("q8 x 128 rows, f32 panels: {:.1} GFLOP/s", flops / t / 1e9);
    let start = Instant::now();
    for (codes, scales) in stack.iter().take(8) {
        std::hint::black_box(product(&x, m, k, Codes::Bytes(codes), scales, n));
    }
    let t = start.elapsed().as_secs_f64();
    println!(
        "q8 x 128 rows, as the model runs it (integer products: {}): {:.1} GFLOP/s",
        phantom_model::kernels::quant::quantizes_activations(),
        flops / t / 1e9
    );
    panels_speed(&rows, &x, k, n);
}

/// The layout flex gives linear weights on processors with AVX512-VNNI: panels of 32 columns
/// (8-bit codes a byte, 4-bit codes half a byte), f16 scales panel by panel, built from the
/// checkpoint's order `[n, k]`. Decode bandwidth and the product with a 128-token prompt.
fn panels_speed(rows: &[(Vec<i8>, Vec<f32>)], x: &[f32], k: usize, n: usize) {
    use phantom_model::kernels::quant::product;
    use phantom_model::packed::{Codes, pack_panels, panel_scales};
    use phantom_model::quantize::f16_scales;
    if !phantom_model::kernels::quant::quantizes_activations() {
        println!("panels: not read on this processor (no AVX512-VNNI)");
        return;
    }
    for nibbles in [false, true] {
        let stack: Vec<(Vec<u8>, Vec<f16>)> = rows
            .iter()
            .map(|(codes, scales)| {
                let codes: Vec<i8> = if nibbles {
                    codes.iter().map(|&c| c.clamp(-7, 7)).collect()
                } else {
                    codes.clone()
                };
                let scales = f16_scales(scales);
                (pack_panels(&codes, n, k, nibbles), panel_scales(&scales, k))
            })
            .collect();
        fn codes(c: &[u8], nibbles: bool) -> Codes<'_> {
            if nibbles {
                Codes::PanelNibbles(c)
            } else {
                Codes::Panels(c)
            }
        }
        let name = if nibbles { "q4" } else { "q8" };
        let bytes: usize = stack.iter().map(|(c, s)| c.len() + 2 * s.len()).sum();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            for (c, s) in &stack {
                std::hint::black_box(product(&x[..k], 1, k, codes(c, nibbles), s, n));
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "{name} in panels, a decode step: {:.1} GB/s ({:.1} ms per pass)",
            bytes as f64 / best / 1e9,
            best * 1e3
        );
        let m = 128;
        let flops = 2.0 * (m * n * k) as f64 * 8.0;
        let start = Instant::now();
        for (c, s) in stack.iter().take(8) {
            std::hint::black_box(product(&x[..m * k], m, k, codes(c, nibbles), s, n));
        }
        let t = start.elapsed().as_secs_f64();
        println!(
            "{name} in panels x 128 rows: {:.1} GFLOP/s",
            flops / t / 1e9
        );
    }
}

#[allow(dead_code)]
fn gemm_speed() {
    use phantom_model::kernels::gemm::matmul;
    let (m, k, n) = (1024, 896, 4864);
    let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 1e-3).cos()).collect();
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let flops = 2.0 * (m * n * k) as f64;
    for _ in 0..3 {
        let start = Instant::now();
        std::hint::black_box(matmul(&x, m, k, &wb, n));
        let t = start.elapsed().as_secs_f64();
        println!("kernels::gemm bf16 weights: {:.1} GFLOP/s", flops / t / 1e9);
        let start = Instant::now();
        std::hint::black_box(matmul(&x, m, k, &w, n));
        let t = start.elapsed().as_secs_f64();
        println!("kernels::gemm f32: {:.1} GFLOP/s", flops / t / 1e9);
        // The `gemm` crate on the same product, for comparison: the weight as [n, k] (the
        // checkpoints' order) and as [k, n] row-major (Burn's default layout).
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let mut y = vec![0.0f32; m * n];
        // (name, weight, its column stride, its row stride, threads), as `gemm` takes them.
        for (name, weight, cs, rs, parallelism) in [
            ("rayon 2", &w, k as isize, 1, gemm::Parallelism::Rayon(2)),
            ("1 thread", &w, k as isize, 1, gemm::Parallelism::None),
            (
                "[k, n] weight, rayon 2",
                &wt,
                1,
                n as isize,
                gemm::Parallelism::Rayon(2),
            ),
        ] {
            let start = Instant::now();
            // SAFETY: `y` is [m, n] and `x` [m, k] row-major; `weight` holds k·n values laid
            // out with the given column and row strides.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    y.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    weight.as_ptr(),
                    cs,
                    rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
            let t = start.elapsed().as_secs_f64();
            println!("gemm f32 ({name}): {:.1} GFLOP/s", flops / t / 1e9);
        }
    }
}
