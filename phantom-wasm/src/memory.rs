//! What a model needs from the browser, and whether a backend can give it.
//!
//! Two limits matter. WebAssembly's 32-bit address space gives a page at most 4 GiB of linear
//! memory, which on the CPU backend must hold the weights (f32 once loaded) and the
//! activations. WebGPU keeps the weights on the GPU instead, but Burn stores each tensor in one
//! buffer, and an adapter binds at most `maxStorageBufferBindingSize` bytes of a buffer to a
//! shader (often 128 MiB by default; the runtime requests whatever the adapter allows).
//! A model that exceeds either limit is refused before any weight is loaded, and on the CPU a
//! question whose picture needs more activation memory than is left is refused before it runs.

use phantom_model::PhantomConfig;

use crate::checkpoint::Header;
use crate::error::{Result, WasmError};

/// Linear memory of a wasm32 instance: 65 536 pages of 64 KiB.
pub const WASM_MEMORY_BYTES: u64 = 4 << 30;

/// Room kept free on the CPU backend for activations, the KV cache, the image tiles and the
/// tokenizer; a Phantom vision tower alone needs a few hundred MiB for six tiles.
pub const CPU_HEADROOM_BYTES: u64 = 512 << 20;

/// Data bytes per safetensors part copied into WebAssembly memory at a time.
pub const PART_BYTES: u64 = 64 << 20;

const MIB: f64 = (1u64 << 20) as f64;

/// The size of a checkpoint once loaded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Footprint {
    /// Number of parameters.
    pub parameters: u64,
    /// Bytes of the loaded weights (float tensors become f32).
    pub weight_bytes: u64,
    /// Bytes of the checkpoint files' data.
    pub file_bytes: u64,
    /// The largest tensor and its loaded size in bytes.
    pub largest: Option<(String, u64)>,
}

impl Footprint {
    /// Measures the checkpoint described by `headers` (one per file or shard).
    pub fn of(headers: &[Header]) -> Self {
        let mut f = Self::default();
        let suffix = phantom_model::weights::SCALE_SUFFIX;
        let names: std::collections::HashSet<&str> = headers
            .iter()
            .flat_map(|h| &h.tensors)
            .map(|t| t.name.as_str())
            .collect();
        for t in headers.iter().flat_map(|h| &h.tensors) {
            let file_bytes = t.data.end - t.data.start;
            // Quantized weights: 4-bit codes are two to a byte on disk and one to a byte on
            // the CPU; block scales are loaded as f32 and are not parameters.
            let codes = names.contains(format!("{}{suffix}", t.name).as_str());
            let scales = t
                .name
                .strip_suffix(suffix)
                .is_some_and(|weight| names.contains(weight));
            let per_byte = if codes && t.dtype == "U8" { 2 } else { 1 };
            let n = t.elements().saturating_mul(per_byte);
            let loaded = if t.is_float() {
                t.elements().saturating_mul(4)
            } else if codes {
                n
            } else {
                file_bytes
            };
            if !scales {
                f.parameters += n;
            }
            f.weight_bytes += loaded;
            f.file_bytes += file_bytes;
            // A quantized weight passes through the device in f32 while it is quantized there.
            let buffer = if codes { n.saturating_mul(4) } else { loaded };
            if f.largest.as_ref().is_none_or(|(_, b)| buffer > *b) {
                f.largest = Some((t.name.clone(), buffer));
            }
        }
        f
    }
}

/// The WebGPU limits that decide whether a model fits, as the device reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuLimits {
    /// Largest buffer range bound to one storage binding.
    pub max_storage_buffer_binding_size: u64,
    /// Largest buffer.
    pub max_buffer_size: u64,
    /// Most invocations per workgroup (kernels are launched within it).
    pub max_compute_invocations_per_workgroup: u32,
    /// Shared memory per workgroup.
    pub max_compute_workgroup_storage_size: u32,
}

impl GpuLimits {
    /// The largest tensor Burn can place: one tensor is one buffer, bound whole.
    pub fn max_tensor_bytes(&self) -> u64 {
        self.max_storage_buffer_binding_size
            .min(self.max_buffer_size)
    }
}

/// Checks that the CPU backend can hold the model next to `in_use` bytes of WebAssembly memory.
pub fn check_cpu(footprint: &Footprint, in_use: u64) -> Result<()> {
    let transient = PART_BYTES.min(footprint.file_bytes);
    let need = footprint.weight_bytes + transient + CPU_HEADROOM_BYTES;
    let available = WASM_MEMORY_BYTES.saturating_sub(in_use);
    if need <= available {
        return Ok(());
    }
    Err(WasmError::DoesNotFit(format!(
        "the weights take {:.0} MiB in f32; with {:.0} MiB for loading and activations the \
         WebAssembly CPU backend would need {:.0} MiB, but WebAssembly memory stops at {:.0} MiB \
         ({:.0} MiB already in use). Use WebGPU or a smaller model.",
        footprint.weight_bytes as f64 / MIB,
        (transient + CPU_HEADROOM_BYTES) as f64 / MIB,
        need as f64 / MIB,
        WASM_MEMORY_BYTES as f64 / MIB,
        in_use as f64 / MIB,
    )))
}

/// Checks that every tensor fits one buffer of the adapter, and that the parts copied through
/// WebAssembly memory on their way to the GPU fit next to `in_use` bytes.
pub fn check_gpu(footprint: &Footprint, limits: &GpuLimits, in_use: u64) -> Result<()> {
    let max = limits.max_tensor_bytes();
    if let Some((name, bytes)) = &footprint.largest
        && *bytes > max
    {
        return Err(WasmError::DoesNotFit(format!(
            "the largest tensor, `{name}`, takes {:.0} MiB in f32, but this WebGPU adapter \
                 binds at most {:.0} MiB of one buffer (maxStorageBufferBindingSize {}, \
                 maxBufferSize {}). Use the CPU backend or a smaller model.",
            *bytes as f64 / MIB,
            max as f64 / MIB,
            limits.max_storage_buffer_binding_size,
            limits.max_buffer_size,
        )));
    }
    // A part and the f32 copy of its largest tensor pass through WebAssembly memory.
    let largest = footprint.largest.as_ref().map_or(0, |(_, b)| *b);
    let need = PART_BYTES.max(largest) + largest + CPU_HEADROOM_BYTES;
    if in_use + need > WASM_MEMORY_BYTES {
        return Err(WasmError::DoesNotFit(format!(
            "staging the weights for the GPU needs {:.0} MiB of WebAssembly memory, {:.0} MiB \
             are in use of {:.0} MiB",
            need as f64 / MIB,
            in_use as f64 / MIB,
            WASM_MEMORY_BYTES as f64 / MIB,
        )));
    }
    Ok(())
}

/// Bytes of activations a question needs at its peak, estimated from the largest tensors alive
/// at once: the vision tower's attention (scores and softmax of every head) over `tiles` tiles,
/// or the language model's prefill over `prompt_tokens`, plus the KV cache.
pub fn activation_bytes(config: &PhantomConfig, tiles: usize, prompt_tokens: usize) -> u64 {
    let v = &config.vision;
    let t = (v.grid() * v.grid() + 1) as u64;
    let h = v.hidden_size as u64;
    let heads = v.num_attention_heads as u64;
    let attention = 3 * t * h + 2 * heads * t * t;
    let mlp = 2 * t * v.intermediate_size as u64;
    let pixels = 3 * (v.image_size * v.image_size) as u64;
    let vision = tiles as u64 * (attention.max(mlp) + 2 * t * h + pixels);
    let l = &config.llm;
    let s = prompt_tokens as u64;
    let text = s * (3 * l.hidden_size as u64 + 3 * l.intermediate_size as u64)
        + 2 * l.num_attention_heads as u64 * s * s;
    let kv = 2 * (l.num_hidden_layers * l.num_key_value_heads * l.head_dim()) as u64 * s;
    4 * (vision.max(text) + kv)
}

/// Checks, on the CPU backend, that a question over `tiles` tiles fits next to the weights;
/// when it does not, the message names how many tiles would.
pub fn check_cpu_question(
    footprint: &Footprint,
    config: &PhantomConfig,
    tiles: usize,
    extra_tokens: usize,
) -> Result<()> {
    let room = WASM_MEMORY_BYTES.saturating_sub(footprint.weight_bytes + PART_BYTES);
    let need = |n: usize| activation_bytes(config, n, n * config.tokens_per_tile() + extra_tokens);
    if need(tiles) <= room {
        return Ok(());
    }
    let fitting = (1..tiles).rev().find(|&n| need(n) <= room);
    Err(WasmError::DoesNotFit(format!(
        "this picture makes {tiles} tiles, whose activations need about {:.0} MiB next to \
         {:.0} MiB of f32 weights, beyond WebAssembly's {:.0} MiB. {}",
        need(tiles) as f64 / MIB,
        footprint.weight_bytes as f64 / MIB,
        WASM_MEMORY_BYTES as f64 / MIB,
        match fitting {
            // A grid of n tiles plus the thumbnail: at most n - 1 grid tiles.
            Some(n) if n > 1 => format!("Allow at most {} tiles per picture.", n - 1),
            Some(_) => "Allow 1 tile per picture.".to_string(),
            None => "Use WebGPU or a smaller model.".to_string(),
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorEntry;

    fn header(tensors: &[(&str, &str, u64)]) -> Header {
        let mut at = 0;
        let tensors = tensors
            .iter()
            .map(|&(name, dtype, n)| {
                let size = match dtype {
                    "BF16" | "F16" => 2,
                    "U8" | "I8" => 1,
                    _ => 4,
                };
                let t = TensorEntry {
                    name: name.into(),
                    dtype: dtype.into(),
                    shape: vec![n],
                    data: at..at + n * size,
                };
                at += n * size;
                t
            })
            .collect();
        Header {
            file: "m".into(),
            tensors,
            data_start: 8,
            metadata: None,
        }
    }

    #[test]
    fn footprint_counts_floats_as_f32() {
        let f = Footprint::of(&[
            header(&[("embed", "BF16", 1000), ("norm", "F32", 10)]),
            header(&[("ids", "I64", 3)]),
        ]);
        assert_eq!(f.parameters, 1013);
        assert_eq!(f.weight_bytes, 4000 + 40 + 12);
        assert_eq!(f.file_bytes, 2000 + 40 + 12);
        assert_eq!(f.largest, Some(("embed".into(), 4000)));
    }

    #[test]
    fn footprint_counts_quantized_codes_as_loaded() {
        // A q4 weight of 64 x 64: 2048 bytes of codes, 128 f16 scales.
        let f = Footprint::of(&[header(&[
            ("w.weight", "U8", 2048),
            ("w.weight_scale", "F16", 128),
            ("norm", "F32", 64),
        ])]);
        assert_eq!(f.parameters, 4096 + 64);
        assert_eq!(f.weight_bytes, 4096 + 128 * 4 + 64 * 4);
        assert_eq!(f.file_bytes, 2048 + 256 + 256);
        assert_eq!(f.largest, Some(("w.weight".into(), 4096 * 4)));
    }

    #[test]
    fn a_model_over_four_gib_is_refused_on_the_cpu_with_a_reason() {
        // 1.1 G parameters: 4.4 GB in f32.
        let f = Footprint::of(&[header(&[("w", "BF16", 1_100_000_000)])]);
        let err = check_cpu(&f, 20 << 20).unwrap_err().to_string();
        assert!(
            err.contains("does not fit") && err.contains("WebGPU"),
            "{err}"
        );
        let small = Footprint::of(&[header(&[("w", "F32", 1_000_000)])]);
        check_cpu(&small, 20 << 20).unwrap();
    }

    #[test]
    fn phantom_0_5b_on_the_cpu_takes_few_tiles() {
        let config = phantom_model::presets::config("0.5b").unwrap();
        // Weights of Phantom-0.5B: about 803 M parameters, 3.2 GB in f32.
        let f = Footprint {
            parameters: 803_000_000,
            weight_bytes: 3_212_000_000,
            file_bytes: 1_606_000_000,
            largest: Some(("embed".into(), 544_546_816)),
        };
        check_cpu(&f, 20 << 20).unwrap();
        check_cpu_question(&f, &config, 1, 512).unwrap();
        let err = check_cpu_question(&f, &config, 7, 512)
            .unwrap_err()
            .to_string();
        assert!(err.contains("7 tiles") && err.contains("at most"), "{err}");
    }

    #[test]
    fn a_tensor_over_the_binding_limit_is_refused_on_the_gpu() {
        let limits = GpuLimits {
            max_storage_buffer_binding_size: 128 << 20,
            max_buffer_size: 256 << 20,
            max_compute_invocations_per_workgroup: 256,
            max_compute_workgroup_storage_size: 16384,
        };
        // Phantom-0.5B's embedding: 151 936 × 896 f32 = 519 MiB.
        let f = Footprint::of(&[header(&[("embed", "BF16", 151_936 * 896)])]);
        let err = check_gpu(&f, &limits, 0).unwrap_err().to_string();
        assert!(err.contains("`embed`") && err.contains("128 MiB"), "{err}");
        let small = Footprint::of(&[header(&[("w", "F32", 1 << 20)])]);
        check_gpu(&small, &limits, 0).unwrap();
    }
}
