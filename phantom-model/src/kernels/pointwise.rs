//! The element-wise activations between the products: the decoder MLP's `silu(gate) ⊙ up` and
//! the GELU of the phantom modules, the vision tower and the projector.
//!
//! With Burn's ops on flex, `silu(gate) · up` is three passes (sigmoid, two products), each
//! reading and writing the whole tensor and calling the library `expf` per element, and GELU
//! calls the library `erff` per element: about a tenth of a prompt's time in the decoder. Here
//! each is one pass of branch-free code that vectorises ([`exp`], [`erfc`]), split over the
//! cores, in the tensors' own precision (f32, bf16 or f16; halves widened to f32 and rounded
//! once).

use burn::prelude::*;
use burn::tensor::DType;
use burn_flex::{Flex, FlexTensor};
use half::{bf16, f16};

use super::{contiguous, contiguous_values, dot, is_flex};

/// Elements of one task.
const CHUNK: usize = 16 * 1024;

/// `silu(gate) ⊙ up` (`silu(g) = g · sigmoid(g)`) for two flex tensors of one shape and dtype;
/// `None` for any other device, dtype or mismatched shapes.
pub fn silu_mul<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>) -> Option<Tensor<D>> {
    if !is_flex(&gate.device()) || gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        return None;
    }
    let dims = gate.dims();
    let g = contiguous(gate.clone().try_into_primitive::<Flex>().ok()?);
    let u = contiguous(up.clone().try_into_primitive::<Flex>().ok()?);
    let data = match g.dtype() {
        DType::F32 => zip_values::<f32>(&g, &u, dims.to_vec())?,
        DType::BF16 => zip_values::<bf16>(&g, &u, dims.to_vec())?,
        DType::F16 => zip_values::<f16>(&g, &u, dims.to_vec())?,
        _ => return None,
    };
    Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(data)))
}

/// The exact (erf) GELU of a flex tensor, `x · Φ(x)`; `None` for any other device or dtype.
pub fn gelu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    if !is_flex(&x.device()) {
        return None;
    }
    let dims = x.dims();
    let x = contiguous(x.clone().try_into_primitive::<Flex>().ok()?);
    let data = match x.dtype() {
        DType::F32 => map_values::<f32>(&x, dims.to_vec())?,
        DType::BF16 => map_values::<bf16>(&x, dims.to_vec())?,
        DType::F16 => map_values::<f16>(&x, dims.to_vec())?,
        _ => return None,
    };
    Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(data)))
}

/// A tensor element the activations read and write through f32.
trait Value: burn::tensor::Element + bytemuck::Pod + Send + Sync {
    fn widen(self) -> f32;
    fn narrow(v: f32) -> Self;
}

impl Value for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
}

impl Value for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Value for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// `silu(g) · u` over the values of `g` and `u` (contiguous, one length), as data shaped
/// `dims`.
fn zip_values<V: Value>(g: &FlexTensor, u: &FlexTensor, dims: Vec<usize>) -> Option<TensorData> {
    let (g, u) = (contiguous_values::<V>(g)?, contiguous_values::<V>(u)?);
    if g.len() != u.len() {
        return None;
    }
    let mut out = vec![V::narrow(0.0); g.len()];
    super::for_each_chunk(&mut out, CHUNK, |i, out| {
        let from = i * CHUNK;
        let (g, u) = (&g[from..from + out.len()], &u[from..from + out.len()]);
        run(Pass::SiluMul(g, u), out);
    });
    Some(TensorData::new(out, dims))
}

/// `gelu(x)` over the values of `x` (contiguous), as data shaped `dims`.
fn map_values<V: Value>(x: &FlexTensor, dims: Vec<usize>) -> Option<TensorData> {
    let x = contiguous_values::<V>(x)?;
    let mut out = vec![V::narrow(0.0); x.len()];
    super::for_each_chunk(&mut out, CHUNK, |i, out| {
        let from = i * CHUNK;
        run(Pass::Gelu(&x[from..from + out.len()]), out);
    });
    Some(TensorData::new(out, dims))
}

/// One activation's inputs.
#[derive(Clone, Copy)]
enum Pass<'a, V> {
    SiluMul(&'a [V], &'a [V]),
    Gelu(&'a [V]),
}

/// `pass` into `out` on the widest instruction set.
fn run<V: Value>(pass: Pass<'_, V>, out: &mut [V]) {
    match dot::isa() {
        // SAFETY: `isa()` chose these only after detecting every feature they enable.
        #[cfg(target_arch = "x86_64")]
        dot::Isa::Avx512 => unsafe { run_avx512(pass, out) },
        #[cfg(target_arch = "x86_64")]
        dot::Isa::Avx2 => unsafe { run_avx2(pass, out) },
        dot::Isa::Portable => body(pass, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn run_avx512<V: Value>(pass: Pass<'_, V>, out: &mut [V]) {
    body(pass, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<V: Value>(pass: Pass<'_, V>, out: &mut [V]) {
    body(pass, out);
}

#[inline(always)]
fn body<V: Value>(pass: Pass<'_, V>, out: &mut [V]) {
    match pass {
        Pass::SiluMul(g, u) => {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = V::narrow(silu(g.widen()) * u.widen());
            }
        }
        Pass::Gelu(x) => {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = V::narrow(gelu_value(x.widen()));
            }
        }
    }
}

/// `x · sigmoid(x)`, with the sigmoid from `t = e^-|x|` (never overflowing): `1 / (1 + t)` for
/// `x ≥ 0`, `t / (1 + t)` below. A NaN stays NaN (the product with `x`), `-∞` gives NaN as
/// `-∞ · 0` does in Burn's `silu`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    let t = exp(-x.abs());
    let sigmoid = if x >= 0.0 { 1.0 } else { t } / (1.0 + t);
    x * sigmoid
}

/// `x · Φ(x)` with `Φ(x) = erfc(-x / √2) / 2`: `1 − erfc(z) / 2` for `x ≥ 0`, `erfc(z) / 2`
/// below (`z = |x| / √2`), so that both tails keep their relative precision.
#[inline(always)]
pub(crate) fn gelu_value(x: f32) -> f32 {
    let half_tail = 0.5 * erfc(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    let phi = if x >= 0.0 { 1.0 - half_tail } else { half_tail };
    x * phi
}

/// `erfc(z)` for `z ≥ 0` to a relative error of about 1.2e-7 (Chebyshev fit of
/// `-ln(erfc(z) / t) - z²` in `t = 1 / (1 + z/2)`, Press et al., Numerical Recipes §6.2),
/// without branches so that a loop of it vectorises. A NaN gives NaN.
#[inline(always)]
pub(crate) fn erfc(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp(poly - z * z)
}

/// `e^x` to about 2 ulp for `x ≤ 0` (the softmax's, the sigmoid's and `erfc`'s arguments),
/// without branches so that a loop of it vectorises (the library `expf` is a call per element):
/// `x = n·ln 2 + r`, a degree-6 polynomial for `e^r` on `|r| ≤ ln 2 / 2`, and `2^n` put into
/// the exponent bits. Below `-87.3365` (where `e^x` is under `f32::MIN_POSITIVE`) it returns 0;
/// −∞ gives 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let clamped = x.max(-87.3365);
    // Round to nearest with the 1.5·2^23 trick (|x·log2 e| < 2^22 here): `round` is a library
    // call that would keep the loop scalar.
    const ROUNDER: f32 = 12_582_912.0;
    let n = (clamped * LOG2_E + ROUNDER) - ROUNDER;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from the bits of n + 127 (an integer in 1..=254 stored in the low mantissa bits of
    // n + 127 + 2^23): no float-to-int conversion, which would keep the loop scalar.
    const MANTISSA: f32 = 8_388_608.0;
    let scale = f32::from_bits(((n + 127.0 + MANTISSA).to_bits() & 0x7f_ffff) << 23);
    let y = p * scale;
    if x < -87.3365 { 0.0 } else { y }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_library_where_its_callers_use_it() {
        let mut worst = 0.0f32;
        for i in 0..=200_000 {
            let x = -88.0 + 88.0 * i as f32 / 200_000.0;
            let want = x.exp();
            let got = exp(x);
            if want < f32::MIN_POSITIVE {
                assert!(got < 1e-37, "{x}: {got}");
                continue;
            }
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    /// `erfc` in f64 by its continued fraction for large `z`, its series for small `z`.
    fn erfc_f64(z: f64) -> f64 {
        if z < 3.0 {
            // erf(z) = 2/√π · Σ (-1)^n z^(2n+1) / (n! (2n+1)).
            let (mut term, mut sum) = (z, z);
            for n in 1..200 {
                term *= -z * z / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            // erfc(z) = e^(-z²)/√π · 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + …)))).
            let mut f = z;
            for n in (1..100).rev() {
                f = z + (n as f64 / 2.0) / f;
            }
            (-z * z).exp() / std::f64::consts::PI.sqrt() / f
        }
    }

    #[test]
    fn activations_match_their_f64_definitions() {
        // Relative error, with values under 1e-6 in magnitude judged absolutely. erfc(z) has
        // condition number about 2z² (the f32 rounding of z, or of z² inside it, moves it
        // that much), so its bound grows with z².
        let err = |got: f32, want: f64| (f64::from(got) - want).abs() / want.abs().max(1e-6);
        for i in 0..=40_000 {
            let x = -12.0 + 24.0 * f64::from(i) / 40_000.0;
            let conditioning = 1.0 + x * x;
            let silu_want = x / (1.0 + (-x).exp());
            let z = x.abs() / 2f64.sqrt();
            let phi = if x >= 0.0 {
                1.0 - 0.5 * erfc_f64(z)
            } else {
                0.5 * erfc_f64(z)
            };
            let xf = x as f32;
            assert!(err(silu(xf), silu_want) < 1e-6, "silu({x})");
            assert!(
                err(gelu_value(xf), x * phi) < 1e-6 * conditioning,
                "gelu({x})"
            );
            // Above 8.5 erfc nears f32's smallest normal value.
            if (0.0..8.5).contains(&x) {
                let e = (f64::from(erfc(xf)) - erfc_f64(x)).abs() / erfc_f64(x);
                assert!(e < 1e-6 * conditioning, "erfc({x}): relative error {e}");
            }
        }
        for f in [silu, gelu_value] {
            assert!(f(f32::NAN).is_nan());
            assert_eq!(f(f32::INFINITY), f32::INFINITY);
            assert!(f(f32::NEG_INFINITY).is_nan(), "-∞ · 0, as Burn's ops give");
            assert_eq!(f(0.0), 0.0);
        }
    }

    #[cfg(feature = "flex")]
    #[test]
    fn tensors_match_burns_activations_in_every_precision() {
        use burn::tensor::activation;
        let device = Device::flex();
        let n = 3 * (CHUNK + 31);
        let values = |seed: u64| -> Vec<f32> {
            crate::testing::values(n, seed)
                .iter()
                .map(|v| 8.0 * v)
                .collect()
        };
        let g = Tensor::<3>::from_data(TensorData::new(values(1), [3, 1, n / 3]), &device);
        let u = Tensor::<3>::from_data(TensorData::new(values(2), [3, 1, n / 3]), &device);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (g, u) = (g.clone().cast(dtype), u.clone().cast(dtype));
            let want_silu =
                activation::silu(g.clone().cast(DType::F32)) * u.clone().cast(DType::F32);
            let want_gelu = activation::gelu(g.clone().cast(DType::F32));
            let got_silu = silu_mul(&g, &u).expect("flex");
            let got_gelu = gelu(&g).expect("flex");
            assert_eq!(got_silu.dtype(), dtype);
            assert_eq!(got_gelu.dims(), g.dims());
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            for (what, got, want) in [("silu", got_silu, want_silu), ("gelu", got_gelu, want_gelu)]
            {
                let got = got
                    .cast(DType::F32)
                    .into_data()
                    .try_to_vec::<f32>()
                    .expect("f32");
                let want = want.into_data().try_to_vec::<f32>().expect("f32");
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                    .fold(0.0f32, f32::max);
                assert!(worst < tol, "{what} {dtype:?}: off by {worst}");
            }
        }
        // A strided view (a transposed tensor) is read in its logical order.
        let t = g.clone().swap_dims(0, 2);
        let got = gelu(&t)
            .expect("flex")
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32");
        let want = activation::gelu(t)
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32");
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0))
        );
    }
}
