//! The token-level files of the CLI: inputs (`input_ids`, `attention_mask`, optional
//! `pixel_values`) and outputs (`logits`), in safetensors, so a port can be checked against
//! the PyTorch implementation tensor for tensor.

use std::collections::HashMap;
use std::path::Path;

use phantom_model::{ModelInput, PhantomError, Result};
use safetensors::{Dtype, SafeTensors};

/// Pixel tiles read from a file: `[N, 3, H, W]` values.
#[derive(Clone, Debug, PartialEq)]
pub struct Pixels {
    /// Shape `[N, 3, H, W]`.
    pub shape: [usize; 4],
    /// Row-major f32 values.
    pub data: Vec<f32>,
}

/// The contents of an inputs file.
#[derive(Clone, Debug, PartialEq)]
pub struct InputsFile {
    /// Ids and mask.
    pub input: ModelInput,
    /// Optional image tiles.
    pub pixel_values: Option<Pixels>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> PhantomError {
    PhantomError::Input(format!("{}: {msg}", path.display()))
}

/// Reads an inputs file.
pub fn read_inputs(path: &Path) -> Result<InputsFile> {
    let bytes = std::fs::read(path).map_err(|e| PhantomError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    let ints = |key: &str| -> Result<Option<(Vec<usize>, Vec<i64>)>> {
        let Ok(t) = st.tensor(key) else {
            return Ok(None);
        };
        let shape = t.shape().to_vec();
        let data: Vec<i64> = match t.dtype() {
            Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::I32 => t
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
                .collect(),
            Dtype::U8 | Dtype::BOOL => t.data().iter().map(|&b| b as i64).collect(),
            other => {
                return Err(bad(
                    path,
                    format!("`{key}` must be an integer tensor, found {other:?}"),
                ));
            }
        };
        if shape.len() != 2 {
            return Err(bad(
                path,
                format!("`{key}` must be [B, T], found {shape:?}"),
            ));
        }
        Ok(Some((shape, data)))
    };
    let (shape, ids) = ints("input_ids")?.ok_or_else(|| bad(path, "`input_ids` is missing"))?;
    let (b, t) = (shape[0], shape[1]);
    let mask = match ints("attention_mask")? {
        Some((mshape, mask)) if mshape == shape => mask,
        Some((mshape, _)) => {
            return Err(bad(
                path,
                format!("`attention_mask` is {mshape:?} but `input_ids` is {shape:?}"),
            ));
        }
        None => vec![1; b * t],
    };
    let mut input_ids = Vec::with_capacity(b);
    let mut attention_mask = Vec::with_capacity(b);
    for row in 0..b {
        let ids_row = &ids[row * t..(row + 1) * t];
        if let Some(&neg) = ids_row.iter().find(|&&i| i < 0 || i > u32::MAX as i64) {
            return Err(bad(
                path,
                format!("row {row} holds the invalid token id {neg}"),
            ));
        }
        input_ids.push(ids_row.iter().map(|&i| i as u32).collect());
        attention_mask.push(
            mask[row * t..(row + 1) * t]
                .iter()
                .map(|&m| m != 0)
                .collect(),
        );
    }
    let pixel_values = match st.tensor("pixel_values") {
        Err(_) => None,
        Ok(view) => {
            let s = view.shape();
            if s.len() != 4 || s[1] != 3 {
                return Err(bad(
                    path,
                    format!("`pixel_values` must be [N, 3, H, W], found {s:?}"),
                ));
            }
            let data = float_values(&view).ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "`pixel_values` must be f32, bf16 or f16, found {:?}",
                        view.dtype()
                    ),
                )
            })?;
            Some(Pixels {
                shape: [s[0], s[1], s[2], s[3]],
                data,
            })
        }
    };
    Ok(InputsFile {
        input: ModelInput {
            input_ids,
            attention_mask,
        },
        pixel_values,
    })
}

/// Writes f32 tensors (name → shape, values) to a safetensors file, atomically.
pub fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let mut views = Vec::new();
    let buffers: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    for ((name, shape, _), buf) in tensors.iter().zip(&buffers) {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), buf)
            .map_err(|e| PhantomError::Input(format!("tensor `{name}`: {e}")))?;
        views.push((name.to_string(), view));
    }
    let meta: Option<HashMap<String, String>> = None;
    let bytes = safetensors::serialize(views, meta)
        .map_err(|e| PhantomError::Input(format!("serialising {}: {e}", path.display())))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| PhantomError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| PhantomError::io(path, e))
}

/// The values of a float tensor (f32, bf16 or f16 on disk) as f32; `None` for other dtypes.
pub fn float_values(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    let raw = view.data();
    Some(match view.dtype() {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}
