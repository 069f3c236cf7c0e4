//! Safetensors files read a slice at a time.
//!
//! A browser downloads a checkpoint into JavaScript memory. Copying the whole file into
//! WebAssembly memory and then decoding it would hold the weights twice in a 4 GiB address
//! space, so the loader instead reads the header, groups the tensors into parts of a few tens of
//! MiB, and hands each part to the model loader as a small safetensors blob of its own.

use std::ops::Range;

use serde_json::{Map, Value};

use crate::error::{Result, WasmError};

/// Largest header accepted (the limit of the reference safetensors implementation).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Random access to the bytes of one safetensors file.
pub trait ByteSource {
    /// Length of the file in bytes.
    fn byte_len(&self) -> u64;

    /// Fills `out` with the bytes that start at `offset`; the caller stays inside
    /// [`ByteSource::byte_len`].
    fn read_into(&self, offset: u64, out: &mut [u8]);
}

impl ByteSource for [u8] {
    fn byte_len(&self) -> u64 {
        self.len() as u64
    }

    fn read_into(&self, offset: u64, out: &mut [u8]) {
        let start = offset as usize;
        out.copy_from_slice(&self[start..start + out.len()]);
    }
}

/// One tensor listed in a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Key in the checkpoint.
    pub name: String,
    /// Element type as safetensors spells it (`F32`, `BF16`, …).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Byte range inside the data section.
    pub data: Range<u64>,
}

impl TensorEntry {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Whether the tensor holds floating-point numbers (loaded as f32).
    pub fn is_float(&self) -> bool {
        matches!(
            self.dtype.as_str(),
            "F64" | "F32" | "F16" | "BF16" | "F8_E4M3" | "F8_E5M2"
        )
    }
}

/// Bytes per element of a safetensors dtype.
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// The parsed header of one safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// File name, for messages.
    pub file: String,
    /// The tensors, in the order of their data, except that a quantized weight's block scales
    /// come right after it.
    pub tensors: Vec<TensorEntry>,
    /// Offset of the data section in the file.
    pub data_start: u64,
    /// The optional `__metadata__` object, kept for every part.
    pub metadata: Option<Value>,
}

impl Header {
    /// Reads and checks the header of `src`, a safetensors file called `file`.
    pub fn read(src: &(impl ByteSource + ?Sized), file: &str) -> Result<Self> {
        let bad = |m: String| WasmError::Checkpoint(format!("{file}: {m}"));
        let len = src.byte_len();
        if len < 8 {
            return Err(bad(format!(
                "{len} bytes is too short for a safetensors file"
            )));
        }
        let mut prefix = [0u8; 8];
        src.read_into(0, &mut prefix);
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER_BYTES || header_len > len - 8 {
            return Err(bad(format!(
                "the header claims {header_len} bytes in a file of {len}"
            )));
        }
        let mut text = vec![0u8; header_len as usize];
        src.read_into(8, &mut text);
        let json: Map<String, Value> = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("the header is not a JSON object: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = len - data_start;
        let mut metadata = None;
        let mut tensors = Vec::with_capacity(json.len());
        for (name, info) in json {
            if name == "__metadata__" {
                metadata = Some(info);
                continue;
            }
            let dtype = info
                .get("dtype")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("`{name}` has no dtype")))?
                .to_string();
            let size = dtype_size(&dtype)
                .ok_or_else(|| bad(format!("`{name}` has the unknown dtype {dtype}")))?;
            let numbers = |key: &str| -> Result<Vec<u64>> {
                info.get(key)
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad(format!("`{name}` has no valid {key}")))
            };
            let shape = numbers("shape")?;
            let offsets = numbers("data_offsets")?;
            let [begin, end] = offsets[..] else {
                return Err(bad(format!("`{name}`: data_offsets must hold two numbers")));
            };
            let bytes = shape
                .iter()
                .try_fold(size, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(format!("`{name}`: the shape {shape:?} overflows")))?;
            if begin > end || end > data_len || end - begin != bytes {
                return Err(bad(format!(
                    "`{name}`: data_offsets [{begin}, {end}) do not hold {dtype} {shape:?} inside \
                     {data_len} bytes of data"
                )));
            }
            tensors.push(TensorEntry {
                name,
                dtype,
                shape,
                data: begin..end,
            });
        }
        tensors.sort_by_key(|t| (t.data.start, t.data.end));
        Ok(Self {
            file: file.to_string(),
            tensors: with_scales_after_weights(tensors),
            data_start,
            metadata,
        })
    }

    /// Groups consecutive tensors into parts of at most `budget` bytes of data; a tensor larger
    /// than the budget is a part on its own, and a quantized weight's block scales stay in its
    /// part.
    pub fn parts(&self, budget: u64) -> Vec<Range<usize>> {
        let mut parts = Vec::new();
        let mut start = 0;
        let mut bytes = 0;
        for (i, t) in self.tensors.iter().enumerate() {
            let size = t.data.end - t.data.start;
            let companion = i > 0 && is_scale_of(&t.name, &self.tensors[i - 1].name);
            if i > start && bytes + size > budget && !companion {
                parts.push(start..i);
                start = i;
                bytes = 0;
            }
            bytes += size;
        }
        if start < self.tensors.len() {
            parts.push(start..self.tensors.len());
        }
        parts
    }
}

/// Whether `name` holds the block scales of the quantized weight `weight`.
fn is_scale_of(name: &str, weight: &str) -> bool {
    name.strip_prefix(weight) == Some(phantom_model::weights::SCALE_SUFFIX)
}

/// `tensors` (in the order of their data) with each quantized weight's block scales moved
/// right after it, so that the two always load together.
fn with_scales_after_weights(tensors: Vec<TensorEntry>) -> Vec<TensorEntry> {
    let suffix = phantom_model::weights::SCALE_SUFFIX;
    let names: std::collections::HashSet<String> = tensors.iter().map(|t| t.name.clone()).collect();
    let (scales, others): (Vec<TensorEntry>, Vec<TensorEntry>) =
        tensors.into_iter().partition(|t| {
            t.name
                .strip_suffix(suffix)
                .is_some_and(|weight| names.contains(weight))
        });
    let mut scales: std::collections::HashMap<String, TensorEntry> =
        scales.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut ordered = Vec::with_capacity(others.len() + scales.len());
    for t in others {
        let scale = scales.remove(&format!("{}{suffix}", t.name));
        ordered.push(t);
        ordered.extend(scale);
    }
    ordered
}

impl Header {
    /// Bytes of data of the tensors `range`.
    pub fn part_data_bytes(&self, range: Range<usize>) -> u64 {
        self.tensors[range]
            .iter()
            .map(|t| t.data.end - t.data.start)
            .sum()
    }

    /// A safetensors file holding only the tensors `range` (read from `src`), laid out
    /// back to back.
    pub fn part_bytes(&self, src: &(impl ByteSource + ?Sized), range: Range<usize>) -> Vec<u8> {
        let tensors = &self.tensors[range];
        let mut header = Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), m.clone());
        }
        let mut offset = 0u64;
        for t in tensors {
            let size = t.data.end - t.data.start;
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype,
                    "shape": t.shape,
                    "data_offsets": [offset, offset + size],
                }),
            );
            offset += size;
        }
        let mut text = Value::Object(header).to_string().into_bytes();
        // The format pads the header with spaces so that the data starts 8-byte aligned.
        text.resize(text.len().next_multiple_of(8), b' ');
        let mut out = Vec::with_capacity(8 + text.len() + offset as usize);
        out.extend_from_slice(&(text.len() as u64).to_le_bytes());
        out.extend_from_slice(&text);
        for t in tensors {
            let at = out.len();
            out.resize(at + (t.data.end - t.data.start) as usize, 0);
            src.read_into(self.data_start + t.data.start, &mut out[at..]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of `(name, dtype, shape, bytes)` written the plain way.
    fn file(tensors: &[(&str, &str, Vec<u64>, Vec<u8>)]) -> Vec<u8> {
        let mut header = Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({
                    "dtype": dtype,
                    "shape": shape,
                    "data_offsets": [data.len(), data.len() + bytes.len()],
                }),
            );
            data.extend_from_slice(bytes);
        }
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let text = Value::Object(header).to_string().into_bytes();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out.extend(data);
        out
    }

    fn sample() -> Vec<u8> {
        file(&[
            ("a", "F32", vec![2, 2], (0..16).collect()),
            ("b", "BF16", vec![3], (16..22).collect()),
            ("c", "F32", vec![5], (22..42).collect()),
        ])
    }

    #[test]
    fn parts_rebuild_every_tensor_with_its_bytes() {
        let bytes = sample();
        let header = Header::read(bytes.as_slice(), "m.safetensors").unwrap();
        assert_eq!(header.tensors.len(), 3);
        assert_eq!(header.metadata, Some(serde_json::json!({"format": "pt"})));
        let parts = header.parts(22);
        assert_eq!(parts, vec![0..2, 2..3]);
        let mut seen = Vec::new();
        for part in parts {
            let blob = header.part_bytes(bytes.as_slice(), part.clone());
            let again = Header::read(blob.as_slice(), "part").unwrap();
            assert_eq!(again.data_start % 8, 0, "data is 8-byte aligned");
            for (t, orig) in again.tensors.iter().zip(&header.tensors[part]) {
                assert_eq!(
                    (&t.name, &t.dtype, &t.shape),
                    (&orig.name, &orig.dtype, &orig.shape)
                );
                let at = (again.data_start + t.data.start) as usize;
                let was = (header.data_start + orig.data.start) as usize;
                let n = (t.data.end - t.data.start) as usize;
                assert_eq!(blob[at..at + n], bytes[was..was + n]);
                seen.push(t.name.clone());
            }
        }
        assert_eq!(seen, ["a", "b", "c"]);
    }

    #[test]
    fn a_quantized_weight_and_its_scales_share_a_part() {
        // The writer orders data by dtype, so codes and scales lie apart in the file.
        let bytes = file(&[
            ("p.weight_scale", "F16", vec![2, 1], (0..4).collect()),
            ("n.weight", "F32", vec![4], (4..20).collect()),
            ("p.weight", "I8", vec![2, 32], (20..84).collect()),
        ]);
        let header = Header::read(bytes.as_slice(), "q").unwrap();
        let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["n.weight", "p.weight", "p.weight_scale"]);
        // A budget that would cut between them keeps them together.
        assert_eq!(header.parts(64), vec![0..1, 1..3]);
        let blob = header.part_bytes(bytes.as_slice(), 1..3);
        let part = Header::read(blob.as_slice(), "part").unwrap();
        assert_eq!(part.tensors.len(), 2);
    }

    #[test]
    fn a_tensor_larger_than_the_budget_is_a_part_alone() {
        let bytes = sample();
        let header = Header::read(bytes.as_slice(), "m").unwrap();
        assert_eq!(header.parts(1), vec![0..1, 1..2, 2..3]);
        assert_eq!(header.parts(u64::MAX), vec![0..3]);
        assert_eq!(header.part_data_bytes(0..3), 42);
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        let bytes = sample();
        assert!(Header::read(&bytes[..5], "m").is_err());
        assert!(
            Header::read(&bytes[..bytes.len() - 1], "m").is_err(),
            "truncated data"
        );
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Header::read(huge.as_slice(), "m").is_err());
        let wrong = file(&[("a", "F32", vec![3], vec![0; 8])]);
        let err = Header::read(wrong.as_slice(), "m").unwrap_err().to_string();
        assert!(err.contains("`a`"), "{err}");
        let odd = file(&[("a", "Q4", vec![1], vec![0])]);
        assert!(Header::read(odd.as_slice(), "m").is_err());
    }
}
