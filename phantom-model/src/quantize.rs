//! Quantized weights: symmetric 8-bit and 4-bit integers with one f16 scale per block of 32
//! inputs.
//!
//! A weight row `w[j, ·]` is cut into blocks of [`BLOCK`] consecutive inputs; block `b` keeps
//! `s = max |w| / q` rounded up to an f16 (`q` = 127 for 8 bits, 7 for 4 bits) and the codes
//! `c = round(w / s)` in `−q..=q`, so that `w ≈ c · s`. Every linear layer of the vision
//! tower, the projector and the decoder (the phantom projections included) whose input width
//! is a multiple of 32 is quantized, and so are the token embeddings (which a tied LM head
//! reads) unless asked otherwise; norms, biases and the phantom gates stay in float, as does an
//! untied LM head unless asked for.
//!
//! # On disk
//! A quantized folder is an ordinary model folder whose `config.json` has a `quantization`
//! section (`{"scheme": "q8", "block_size": 32, "scale_dtype": "f16", "lm_head": false,
//! "embeddings": true}`) and whose safetensors file holds, for each quantized `….weight`
//! (official `[out, in]` layout; `[vocabulary, hidden]` for the embeddings):
//! - `….weight`: the codes, `I8 [out, in]` for q8; for q4 `U8 [out, in / 2]`, two codes per
//!   byte, the even input in the low nibble, each stored as `c + 8` (0..=15);
//! - `….weight_scale`: `F16 [out, in / 32]`, the scale of each block, row-major.
//!
//! In memory, on flex, a quantized weight is a [`crate::packed::PackedWeight`] (its codes in
//! the layout the kernels read, next to its f16 scales) that [`crate::kernels`] multiplies without
//! a float copy; on wgpu and CUDA it
//! is a Burn quantized tensor (`QFloat`) that Burn's own kernels multiply. Backends without
//! quantized arithmetic (ndarray, libtorch) get the weights dequantized to float at load.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use half::f16;
use serde::{Deserialize, Serialize};

use crate::error::{PhantomError, Result};

/// Inputs that share one scale.
pub const BLOCK: usize = 32;

/// A quantization scheme of the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// 8-bit codes in −127..=127.
    Q8,
    /// 4-bit codes in −7..=7.
    Q4,
}

impl Quantization {
    /// Largest code magnitude.
    pub fn max_code(self) -> i8 {
        match self {
            Self::Q8 => 127,
            Self::Q4 => 7,
        }
    }

    /// Bits per code on disk.
    pub fn bits(self) -> usize {
        match self {
            Self::Q8 => 8,
            Self::Q4 => 4,
        }
    }

    /// Name as on the command line and in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    /// Burn's symmetric value type of these codes.
    fn value(self) -> QuantValue {
        match self {
            Self::Q8 => QuantValue::Q8S,
            Self::Q4 => QuantValue::Q4S,
        }
    }

    /// Burn's scheme for these weights: symmetric, blocks of [`BLOCK`] along the input
    /// dimension of an `[out, in]` matrix, f16 scales.
    pub fn scheme(self) -> QuantScheme {
        QuantScheme::default()
            .with_value(self.value())
            .per_block([1, BLOCK as u8], ScaleDtype::F16)
    }

    /// [`Quantization::scheme`] with f32 scales, for Burn's GPU kernels: WebGPU adapters
    /// without `shader-f16` cannot read f16 scales.
    pub fn gpu_scheme(self) -> QuantScheme {
        QuantScheme::default()
            .with_value(self.value())
            .per_block([1, BLOCK as u8], ScaleDtype::F32)
    }

    /// The codes of `codes` (one per weight, row-major `[out, in]`, each within
    /// `−max_code..=max_code`) as stored on disk.
    pub fn pack(self, codes: &[i8]) -> Vec<u8> {
        debug_assert!(
            codes
                .iter()
                .all(|c| c.unsigned_abs() <= self.max_code() as u8)
        );
        match self {
            Self::Q8 => codes.iter().map(|&c| c as u8).collect(),
            Self::Q4 => codes
                .chunks(2)
                .map(|pair| nibble(pair[0]) | (pair.get(1).map_or(8, |&c| nibble(c)) << 4))
                .collect(),
        }
    }

    /// The first stored code outside `−max_code..=max_code` (−128 in q8, −8 in q4), read
    /// from the stored bytes without unpacking them.
    pub fn first_bad_code(self, bytes: &[u8]) -> Option<i8> {
        match self {
            Self::Q8 => bytes.iter().map(|&b| b as i8).find(|&c| c == i8::MIN),
            // A nibble of 0 is the code −8.
            Self::Q4 => bytes
                .iter()
                .any(|&b| b & 0x0f == 0 || b >> 4 == 0)
                .then_some(-8),
        }
    }

    /// Codes read back from their stored bytes; `count` codes: 8-bit ones are the bytes
    /// themselves, read as signed.
    pub fn unpack(self, bytes: &[u8], count: usize) -> Cow<'_, [i8]> {
        match self {
            Self::Q8 => Cow::Borrowed(bytemuck::cast_slice(&bytes[..count.min(bytes.len())])),
            Self::Q4 => {
                // Sized up front: a collected flat map would grow to the next power of two.
                let mut codes = Vec::with_capacity(count);
                codes.extend(
                    bytes
                        .iter()
                        .flat_map(|&b| [nibble_code(b), nibble_code(b >> 4)])
                        .take(count),
                );
                Cow::Owned(codes)
            }
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Quantization {
    type Err = PhantomError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8" => Ok(Self::Q8),
            "q4" => Ok(Self::Q4),
            other => Err(PhantomError::Config(format!(
                "unknown quantization scheme `{other}` (expected q8 or q4)"
            ))),
        }
    }
}

/// The `quantization` section of a quantized folder's `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationConfig {
    /// The scheme of the codes.
    pub scheme: Quantization,
    /// Inputs per scale; only [`BLOCK`] is written and read.
    pub block_size: usize,
    /// Dtype of the scales on disk; only `"f16"`.
    pub scale_dtype: ScaleType,
    /// Whether an untied LM head is quantized too.
    #[serde(default)]
    pub lm_head: bool,
    /// Whether the token embeddings are quantized too (and with them a head tied to them).
    /// Folders written before this was chosen kept them in float.
    #[serde(default)]
    pub embeddings: bool,
}

/// Dtype of the stored scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleType {
    /// IEEE half precision.
    F16,
}

impl QuantizationConfig {
    /// The section for `scheme`, with the token embeddings quantized and an untied LM head
    /// in float.
    pub fn new(scheme: Quantization) -> Self {
        Self {
            scheme,
            block_size: BLOCK,
            scale_dtype: ScaleType::F16,
            lm_head: false,
            embeddings: true,
        }
    }

    /// This section with an untied LM head quantized or not.
    pub fn with_lm_head(self, lm_head: bool) -> Self {
        Self { lm_head, ..self }
    }

    /// This section with the token embeddings quantized or not.
    pub fn with_embeddings(self, embeddings: bool) -> Self {
        Self { embeddings, ..self }
    }

    /// Checks what this build reads.
    pub fn validate(self) -> Result<Self> {
        if self.block_size != BLOCK {
            return Err(PhantomError::Config(format!(
                "quantization.block_size {} is not supported (only {BLOCK})",
                self.block_size
            )));
        }
        Ok(self)
    }
}

/// Whether a linear weight of input width `k` can be quantized.
pub fn quantizable(k: usize) -> bool {
    k > 0 && k.is_multiple_of(BLOCK)
}

/// Whether `device` multiplies quantized weights itself: flex through the project's kernels,
/// the CubeCL GPUs (wgpu, WebGPU, CUDA) through Burn's. ndarray and libtorch have no quantized
/// arithmetic; their weights are dequantized at load.
pub fn native(device: &Device) -> bool {
    #[allow(unused_imports)]
    use burn_dispatch::DispatchDevice;
    match device.as_dispatch() {
        #[cfg(feature = "cpu-kernels")]
        DispatchDevice::Flex(_) => true,
        #[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
        DispatchDevice::Cube(_) => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Host-side quantization of a row-major `[out, in]` matrix, exactly as Burn's
/// `quantize_dynamic` does it on flex: the codes and the scales (`[out, in / 32]`), each an
/// f16 value held as f32.
///
/// # Panics
/// If `k` is zero or not a multiple of [`BLOCK`], or `w.len()` not a multiple of `k`.
pub fn quantize_host(w: &[f32], k: usize, scheme: Quantization) -> (Vec<i8>, Vec<f32>) {
    assert!(
        quantizable(k) && w.len().is_multiple_of(k),
        "rows of {k} inputs, in blocks of {BLOCK}"
    );
    let q = f32::from(scheme.max_code());
    let mut codes = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(w.len() / BLOCK);
    for row in w.chunks(k) {
        for block in row.chunks(BLOCK) {
            let peak = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = f16::from_f32(valid_scale(2.0 * peak / (2.0 * q))).to_f32();
            let inv = 1.0 / scale;
            scales.push(scale);
            codes.extend(block.iter().map(|&v| (v * inv).round().clamp(-q, q) as i8));
        }
    }
    (codes, scales)
}

/// `raw` rounded up to an f16 (so that no code exceeds the range), and positive even for a
/// block of zeros, as Burn keeps it.
fn valid_scale(raw: f32) -> f32 {
    let scale = ScaleDtype::F16.round_up(raw);
    if scale > 0.0 && scale.is_finite() {
        scale
    } else {
        ScaleDtype::F16.round_up(f32::MIN_POSITIVE)
    }
}

/// A block scale as the kernels read it: f16, as the packed weights hold them (every scale is
/// an f16 value, rounded up to one when it is made), or f32, as Burn's quantized tensors do.
pub trait Scale: Copy + Send + Sync + 'static {
    /// The scale in f32.
    fn get(self) -> f32;

    /// `scales` themselves where they are f32.
    fn as_f32(scales: &[Self]) -> Option<&[f32]>;

    /// `scales` themselves where they are f16.
    fn as_f16(scales: &[Self]) -> Option<&[f16]>;

    /// `scales` in f32: borrowed where they are, else converted into `scratch`. Inlined, so
    /// that the conversion vectorises for the caller's instruction set.
    #[inline(always)]
    fn widen<'a>(scales: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        if let Some(scales) = Self::as_f32(scales) {
            return scales;
        }
        // Over two slices of one length, which vectorises where an `extend` does not.
        scratch.resize(scales.len(), 0.0);
        for (wide, s) in scratch.iter_mut().zip(scales) {
            *wide = s.get();
        }
        scratch
    }
}

impl Scale for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }

    fn as_f32(scales: &[f32]) -> Option<&[f32]> {
        Some(scales)
    }

    fn as_f16(_: &[f32]) -> Option<&[f16]> {
        None
    }
}

impl Scale for f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }

    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }

    fn as_f16(scales: &[f16]) -> Option<&[f16]> {
        Some(scales)
    }
}

/// IEEE half → single, without branches so that it vectorises: the exponent and mantissa are
/// moved into place and scaled by 2^112 (the difference of the exponent biases), which is
/// exact for normal and subnormal halves alike; infinities and NaNs get the all-ones exponent.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    const TWO_POW_112: f32 = f32::from_bits((127 + 112) << 23);
    let h = u32::from(h);
    let magnitude = h & 0x7fff;
    let scaled = f32::from_bits(magnitude << 13) * TWO_POW_112;
    let special = f32::from_bits((magnitude << 13) | 0x7f80_0000);
    let value = if magnitude >= 0x7c00 { special } else { scaled };
    f32::from_bits(value.to_bits() | ((h & 0x8000) << 16))
}

/// `scales` (each an f16 value, as [`quantize_host`] makes them) held as f16: exactly.
pub fn f16_scales(scales: &[f32]) -> Vec<f16> {
    use half::vec::HalfFloatVecExt;
    Vec::<f16>::from_f32_slice(scales)
}

/// A 4-bit code (`−8..=7`) as the nibble that stores it, `c + 8`.
pub(crate) fn nibble(c: i8) -> u8 {
    (c.wrapping_add(8) as u8) & 0x0f
}

/// The 4-bit code stored in the low nibble of `byte`.
pub(crate) fn nibble_code(byte: u8) -> i8 {
    (byte & 0x0f) as i8 - 8
}

/// The transpose `[cols, rows]` of a row-major `[rows, cols]` matrix, written into `out`
/// (cleared first; its capacity is kept).
pub(crate) fn transpose_into<T: Copy + Default>(
    values: &[T],
    rows: usize,
    cols: usize,
    mut out: Vec<T>,
) -> Vec<T> {
    out.clear();
    out.resize(rows * cols, T::default());
    for (r, row) in values.chunks_exact(cols).take(rows).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

/// Burn's scheme of a weight laid out `[k, n]` with blocks of 32 down each column.
pub fn column_scheme(scheme: Quantization) -> QuantScheme {
    blocks_of(scheme, [BLOCK, 1])
}

/// Burn's scheme of a table `[n, k]` with blocks of 32 along each row.
pub fn row_scheme(scheme: Quantization) -> QuantScheme {
    blocks_of(scheme, [1, BLOCK])
}

/// Burn's scheme of `scheme`'s codes, one byte each, in blocks of shape `block`.
fn blocks_of(scheme: Quantization, block: [usize; 2]) -> QuantScheme {
    QuantScheme::default()
        .with_value(scheme.value())
        .with_store(QuantStore::Native)
        .per_block(block.map(|b| b as u8), ScaleDtype::F16)
}

/// `c · s` for codes of a row-major `[out, in]` matrix and their block scales.
///
/// # Panics
/// If `k` is not a multiple of [`BLOCK`] or `scales` holds fewer than one per block.
pub fn dequantize_host<S: Scale>(codes: &[i8], scales: &[S], k: usize) -> Vec<f32> {
    assert!(
        quantizable(k) && scales.len() * BLOCK >= codes.len(),
        "rows of {k} inputs, one scale per block of {BLOCK}"
    );
    let blocks = k / BLOCK;
    let mut values = Vec::with_capacity(codes.len());
    for (row, row_scales) in codes.chunks(k).zip(scales.chunks(blocks)) {
        values.extend(
            row.iter()
                .enumerate()
                .map(|(i, &c)| f32::from(c) * row_scales[i / BLOCK].get()),
        );
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_codes_pack_two_to_a_byte_and_back() {
        let codes: Vec<i8> = (-7..=7).chain(-7..=7).collect();
        for scheme in [Quantization::Q4, Quantization::Q8] {
            let packed = scheme.pack(&codes);
            assert_eq!(
                packed.len(),
                codes.len() * scheme.bits() / 8 + codes.len() % 2
            );
            assert_eq!(scheme.unpack(&packed, codes.len()), codes);
        }
        assert_eq!(Quantization::Q4.pack(&[-7, 7]), vec![0x01 | (0x0f << 4)]);
    }

    #[test]
    fn host_quantization_is_within_half_a_step() {
        let k = 64;
        let w: Vec<f32> = (0..4 * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i / k) as f32)
            .collect();
        for scheme in [Quantization::Q8, Quantization::Q4] {
            let (codes, scales) = quantize_host(&w, k, scheme);
            let back = dequantize_host(&codes, &scales, k);
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let step = scales[i / BLOCK];
                assert!(
                    (a - b).abs() <= 0.5 * step * 1.01,
                    "{scheme} {i}: {a} vs {b}"
                );
            }
            // The largest magnitude of every block maps to the largest code.
            for block in codes.chunks(BLOCK) {
                let top = block.iter().map(|c| c.unsigned_abs()).max().unwrap_or(0);
                assert_eq!(top, scheme.max_code() as u8);
            }
        }
    }

    #[test]
    fn unknown_schemes_are_named() {
        let err = "q3".parse::<Quantization>().unwrap_err().to_string();
        assert!(err.contains("q3") && err.contains("q8 or q4"), "{err}");
    }
}
