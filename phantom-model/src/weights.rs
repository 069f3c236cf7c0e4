//! The official safetensors layout ⇄ Burn modules.
//!
//! Loading walks the model's parameters, names each one as the official checkpoints do (the
//! backbone files hold the renames) and builds it straight from the checkpoint's bytes, which
//! are memory-mapped: a tensor that needs neither a dtype conversion nor a transpose is not
//! copied at all on flex (the model reads the mapped file), and any other is built with a
//! single copy into its final dtype and layout. Every missing, unexpected or mis-shaped tensor
//! is named in one error. Saving writes the same layout back.
//!
//! Linear weights are `[out, in]` in the checkpoints and `[in, out]` to Burn. On flex they stay
//! `[out, in]` in memory, the order [`crate::kernels`] read (Burn sees a transposed view);
//! elsewhere they are transposed once while loading.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{AllocationProperty, Bytes, DType};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::config::{Backbone, PhantomConfig};
use crate::decoder::{internlm2, phi3, qwen2};
use crate::error::{PhantomError, Result};
use crate::model::PhantomModel;
use crate::packed::{PackedWeight, PackedWeights};
use crate::quantize::{self, Quantization, QuantizationConfig};

/// Name of the single-file checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the configuration file.
pub const CONFIG_FILE: &str = "config.json";

/// `(module path, official path)` renames every backbone shares: the projector's
/// `nn.Sequential` indices. Paths are matched with a dot on each side.
const PROJECTOR_NAMES: &[(&str, &str)] = &[
    (".vision_proj.norm.", ".vision_proj.0."),
    (".vision_proj.fc1.", ".vision_proj.1."),
    (".vision_proj.fc2.", ".vision_proj.3."),
];

/// The keys a tied head may repeat in a checkpoint.
const TIED_HEAD_KEYS: &[&str] = &[
    "language_model.lm_head.weight",
    "language_model.output.weight",
];

/// The official key of the parameter at `path` (module names, enum variants left out).
fn official_key(backbone: Backbone, path: &str) -> String {
    let names = match backbone {
        Backbone::Qwen2 => qwen2::OFFICIAL_NAMES,
        Backbone::Phi3 => phi3::OFFICIAL_NAMES,
        Backbone::InternLm2 => internlm2::OFFICIAL_NAMES,
    };
    let mut key = format!(".{path}.");
    for (module, official) in PROJECTOR_NAMES.iter().chain(names) {
        key = key.replace(module, official);
    }
    key.trim_matches('.').to_string()
}

/// The safetensors files of a checkpoint folder, in order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        return Err(PhantomError::Weights(format!(
            "{} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}",
            dir.display()
        )));
    }
    let text =
        std::fs::read_to_string(&index_path).map_err(|e| PhantomError::io(&index_path, e))?;
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        PhantomError::Weights(format!("{}: not valid JSON: {e}", index_path.display()))
    })?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            PhantomError::Weights(format!("{}: no `weight_map` object", index_path.display()))
        })?;
    let mut shards = BTreeSet::new();
    for (key, file) in map {
        let file = file.as_str().ok_or_else(|| {
            PhantomError::Weights(format!(
                "{}: `{key}` maps to a non-string",
                index_path.display()
            ))
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(PhantomError::Weights(format!(
                "{}: shard name `{file}` must be a file in the same folder",
                index_path.display()
            )));
        }
        shards.insert(file.to_string());
    }
    let files: Vec<PathBuf> = shards.into_iter().map(|f| dir.join(f)).collect();
    for file in &files {
        if !file.is_file() {
            return Err(PhantomError::Weights(format!(
                "shard {} listed in {INDEX_FILE} is missing",
                file.display()
            )));
        }
    }
    Ok(files)
}

/// The float dtype most of a checkpoint folder's weights are stored in (by bytes), read from
/// the safetensors headers only; `None` when it holds no float tensor.
pub fn stored_dtype(dir: &Path) -> Result<Option<DType>> {
    let mut bytes: HashMap<DType, u64> = HashMap::new();
    for file in weight_files(dir)? {
        let mut f = std::fs::File::open(&file).map_err(|e| PhantomError::io(&file, e))?;
        let header = read_header(&mut f).map_err(|e| match e {
            HeaderError::Io(e) => PhantomError::io(&file, e),
            HeaderError::Format(why) => {
                PhantomError::Weights(format!("{}: not a safetensors file: {why}", file.display()))
            }
        })?;
        for (key, info) in header {
            if key == "__metadata__" {
                continue;
            }
            let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
            let range = info.get("data_offsets").and_then(|o| o.as_array());
            let size = range
                .and_then(|r| Some(r.get(1)?.as_u64()? - r.first()?.as_u64()?))
                .unwrap_or(0);
            let dtype = match dtype {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                _ => continue,
            };
            *bytes.entry(dtype).or_default() += size;
        }
    }
    Ok(bytes.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d))
}

enum HeaderError {
    Io(std::io::Error),
    Format(String),
}

/// The JSON header of a safetensors file, without reading the tensors.
fn read_header(
    f: &mut std::fs::File,
) -> std::result::Result<serde_json::Map<String, serde_json::Value>, HeaderError> {
    use std::io::Read;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(HeaderError::Io)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(HeaderError::Format(format!("a header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(HeaderError::Io)?;
    serde_json::from_slice(&header).map_err(|e| HeaderError::Format(e.to_string()))
}

/// The precisions parameters are loaded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Float dtype of the parameters the model computes with directly: norms, biases, the
    /// phantom modules, the vision tower's embeddings (and, unless `weights` says otherwise,
    /// everything else).
    pub dtype: DType,
    /// Float dtype of the large matrices — linear weights and token embeddings — when it
    /// differs from `dtype`: on flex, half-precision weights that the CPU kernels read as they
    /// are, with f32 arithmetic around them.
    pub weights: Option<DType>,
    /// Quantize the linear weights while loading ([`crate::quantize`]); a quantized folder
    /// is loaded as it was quantized whatever this says, and refuses another scheme.
    pub quantize: Option<QuantizationConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            weights: None,
            quantize: None,
        }
    }
}

impl LoadOptions {
    /// Every parameter in `dtype`.
    pub fn uniform(dtype: DType) -> Self {
        Self {
            dtype,
            ..Self::default()
        }
    }

    /// These options with the linear weights quantized as `scheme` while loading.
    #[must_use]
    pub fn quantized(self, scheme: Option<Quantization>) -> Self {
        Self {
            quantize: scheme.map(QuantizationConfig::new),
            ..self
        }
    }
}

/// Loads a Hugging Face style folder (`config.json` + safetensors) onto `device`.
pub fn load_model(
    dir: impl AsRef<Path>,
    device: &Device,
    options: LoadOptions,
) -> Result<PhantomModel> {
    load_model_with_progress(dir, device, options, |_, _| {})
}

/// [`load_model`], calling `progress(done, total)` with the bytes of checkpoint read so far.
pub fn load_model_with_progress(
    dir: impl AsRef<Path>,
    device: &Device,
    options: LoadOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<PhantomModel> {
    let dir = dir.as_ref();
    let config = PhantomConfig::from_file(dir.join(CONFIG_FILE))?;
    // Refused before any weight is read.
    if let Some(conflict) = scheme_conflict(&config, options) {
        return Err(PhantomError::Config(format!(
            "{}: {conflict}",
            dir.display()
        )));
    }
    let files = weight_files(dir)?;
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    let mut loader = WeightLoader::new(config, device, options);
    let mut done = 0;
    progress(0, total);
    for file in &files {
        loader.file_with_progress(file, &mut |bytes| {
            done += bytes;
            progress(done, total);
        })?;
    }
    progress(total, total);
    loader.finish()
}

/// Bytes a part of a checkpoint lives in: a memory-mapped file or a buffer.
type Storage = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A sub-range of a part's storage, which `bytes::Bytes` can own without copying it.
struct View {
    storage: Storage,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        &(*self.storage).as_ref()[self.start..self.end]
    }
}

/// One tensor of a part: where its bytes are, and what they hold.
#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A parsed safetensors file or blob.
struct Part {
    storage: Storage,
    entries: HashMap<String, Entry>,
    /// The file's map, when the storage is one.
    #[cfg(not(target_family = "wasm"))]
    map: Option<Arc<memmap2::Mmap>>,
}

impl Part {
    /// Tells the OS that a converted tensor's pages will not be read again, so that they leave
    /// this process's memory instead of sitting next to their converted copy.
    fn release(&self, entry: &Entry) {
        self.release_range(entry, 0, entry.end - entry.start);
    }

    /// [`Part::release`] for `len` bytes of the entry from byte `from`.
    fn release_range(&self, entry: &Entry, from: usize, len: usize) {
        #[cfg(all(unix, not(target_family = "wasm")))]
        if let Some(map) = &self.map {
            // SAFETY: the map is private and never written, so dropping its pages only means
            // that a later read (of a neighbouring tensor sharing a page) faults them in again
            // from the unchanged file.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    entry.start + from,
                    len,
                )
            };
        }
        #[cfg(not(all(unix, not(target_family = "wasm"))))]
        let _ = (entry, from, len);
    }

    /// The entry's bytes copied a stretch at a time, each stretch's pages released once
    /// read: the token embeddings would otherwise sit in memory twice, as the file's pages
    /// and as their copy.
    fn copy_releasing(&self, entry: &Entry) -> Vec<u8> {
        const STRETCH: usize = 8 << 20;
        let mut bytes = Vec::with_capacity(entry.end - entry.start);
        for (i, stretch) in self.data(entry).chunks(STRETCH).enumerate() {
            bytes.extend_from_slice(stretch);
            self.release_range(entry, i * STRETCH, stretch.len());
        }
        bytes
    }

    fn parse(storage: Storage, name: &str) -> Result<Self> {
        let bytes: &[u8] = (*storage).as_ref();
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| PhantomError::Weights(format!("{name}: not a safetensors file: {e}")))?;
        let base = bytes.as_ptr() as usize;
        let entries = file
            .tensors()
            .into_iter()
            .map(|(key, view)| {
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                };
                (key, entry)
            })
            .collect();
        Ok(Self {
            storage,
            entries,
            #[cfg(not(target_family = "wasm"))]
            map: None,
        })
    }

    fn data(&self, entry: &Entry) -> &[u8] {
        &(*self.storage).as_ref()[entry.start..entry.end]
    }

    /// The entry's bytes, owned without a copy.
    fn shared(&self, entry: &Entry) -> Bytes {
        let view = View {
            storage: Arc::clone(&self.storage),
            start: entry.start,
            end: entry.end,
        };
        Bytes::from_shared(bytes::Bytes::from_owner(view), AllocationProperty::File)
    }
}

/// The Burn dtype of a checkpoint dtype that holds floats.
fn float_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// `src` (`from`, little-endian, row-major with `dims`) converted to `to`, and transposed from
/// `[r, c]` to `[c, r]` when `transpose` is set: one pass, one copy, on every core.
fn convert(src: &[u8], from: DType, to: DType, dims: &[usize], transpose: bool) -> Bytes {
    let (rows, cols) = match (transpose, dims) {
        (true, [r, c]) => (*r, *c),
        _ => (1, dims.iter().product()),
    };
    let shape = Arrangement {
        rows,
        cols,
        transpose: transpose && dims.len() == 2,
    };
    match (from, to) {
        (DType::F32, DType::F32) => shape.map(&typed::<f32>(src), |x| x),
        (DType::F32, DType::BF16) => shape.map(&typed::<u32>(src), f32_bits_to_bf16),
        (DType::F32, DType::F16) => shape.map(&typed::<f32>(src), f16::from_f32),
        (DType::BF16, DType::F32) => shape.map(&typed::<u16>(src), |x| u32::from(x) << 16),
        (DType::F16, DType::F32) => shape.map(&typed::<f16>(src), f16::to_f32),
        (DType::BF16, DType::F16) => shape.map(&typed::<bf16>(src), |x| f16::from_f32(x.to_f32())),
        (DType::F16, DType::BF16) => shape.map(&typed::<f16>(src), |x| bf16::from_f32(x.to_f32())),
        // Same half dtype: a transpose only.
        _ => shape.map(&typed::<u16>(src), |x| x),
    }
}

/// f32 bits → bf16 bits, rounding to nearest even (NaNs stay NaN), without branches so that
/// it vectorises.
#[inline(always)]
fn f32_bits_to_bf16(bits: u32) -> u16 {
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let nan = (bits >> 16) | 0x40;
    (if bits & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

/// `src` as elements of `T`: borrowed when aligned, copied otherwise (safetensors only
/// promises byte alignment).
fn typed<T: bytemuck::Pod>(src: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice(src) {
        Ok(values) => std::borrow::Cow::Borrowed(values),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(src)),
    }
}

/// The shape of a conversion: `rows × cols`, transposed or not.
#[derive(Clone, Copy)]
struct Arrangement {
    rows: usize,
    cols: usize,
    transpose: bool,
}

impl Arrangement {
    /// `f` over every element, into the destination order, as bytes.
    fn map<S, T>(self, src: &[S], f: impl Fn(S) -> T + Sync) -> Bytes
    where
        S: Copy + Sync,
        T: bytemuck::Pod + Send + Sync + Default,
    {
        let mut dst = vec![T::default(); src.len()];
        if !self.transpose {
            for_each_chunk(&mut dst, 1 << 16, |start, chunk| {
                for (d, &x) in chunk.iter_mut().zip(&src[start..]) {
                    *d = f(x);
                }
            });
        } else {
            // Destination row j (a source column) in tiles of source rows, for locality.
            let (rows, cols) = (self.rows, self.cols);
            for_each_chunk(&mut dst, rows.max(1), |start, out| {
                let j = start / rows.max(1);
                for (i, d) in out.iter_mut().enumerate() {
                    *d = f(src[i * cols + j]);
                }
            });
        }
        Bytes::from_elems(dst)
    }
}

/// Runs `f(offset, chunk)` over `chunk`-sized pieces of `data`, on every core when threads
/// are compiled in.
fn for_each_chunk<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    #[cfg(feature = "threads")]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i * chunk, c));
    }
    #[cfg(not(feature = "threads"))]
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        f(i * chunk, c);
    }
}

/// Whether the CPU kernels read linear weights `[out, in]` on `device`.
fn out_in_layout(device: &Device) -> bool {
    #[cfg(feature = "cpu-kernels")]
    {
        crate::kernels::is_flex(device)
    }
    #[cfg(not(feature = "cpu-kernels"))]
    {
        let _ = device;
        false
    }
}

/// Where a parameter sits: the module path walked so far as (name, container type) pairs, as
/// Burn's module visitors and mappers report it.
#[derive(Default)]
struct Walk {
    stack: Vec<(String, String)>,
}

impl Walk {
    fn enter(&mut self, name: &str, container_type: &str) {
        self.stack
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit(&mut self) {
        self.stack.pop();
    }

    /// The official key, dtype and role of the parameter being visited.
    fn locate(&self, backbone: Backbone, options: LoadOptions) -> (String, DType, Role) {
        let container = self.stack.last().map_or("", |(_, c)| c.as_str());
        let leaf = self.stack.last().map_or("", |(n, _)| n.as_str());
        let mut names: Vec<&str> = self
            .stack
            .iter()
            .filter(|(_, c)| !c.starts_with("Enum:"))
            .map(|(n, _)| n.as_str())
            .collect();
        // Burn's norms call PyTorch's `weight` and `bias` `gamma` and `beta`.
        if matches!(container, "Struct:LayerNorm" | "Struct:RmsNorm")
            && let Some(last) = names.last_mut()
        {
            *last = match *last {
                "gamma" => "weight",
                "beta" => "bias",
                other => other,
            };
        }
        let path = names.join(".");
        let role = match (container, leaf) {
            ("Struct:Linear", "weight") => Role::LinearWeight,
            ("Struct:Embedding", "weight") => Role::Matrix,
            _ => Role::Other,
        };
        // The phantom modules run through Burn's own linear layers: they keep the compute
        // dtype, as does everything that is not a large matrix.
        let dtype = match (role, options.weights) {
            (Role::LinearWeight | Role::Matrix, Some(weights)) if !path.contains(".phantom.") => {
                weights
            }
            _ => options.dtype,
        };
        (official_key(backbone, &path), dtype, role)
    }
}

/// Gives an existing model's parameters the dtypes of `options` (a randomly initialised model
/// for benchmarks, say), keeping linear weights in the memory order the device reads.
pub fn cast_parameters(model: PhantomModel, options: LoadOptions) -> PhantomModel {
    let device = model.language_model.model.norm.gamma.lazy_device();
    let mut caster = Caster {
        backbone: model.config.llm.backbone,
        options,
        out_in: out_in_layout(&device),
        walk: Walk::default(),
        packed: model.packed.clone(),
    };
    model.map(&mut caster)
}

struct Caster {
    backbone: Backbone,
    options: LoadOptions,
    out_in: bool,
    walk: Walk,
    /// The model's packed weights, which stay as they are.
    packed: PackedWeights,
}

impl ModuleMapper for Caster {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.walk.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.walk.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (_, dtype, role) = self.walk.locate(self.backbone, self.options);
        if is_packed(&self.packed, &param) {
            return param;
        }
        let out_in = self.out_in && role == Role::LinearWeight && D == 2;
        param.map(|t| {
            if t.dtype() == dtype || matches!(t.dtype(), DType::QFloat(_)) {
                t
            } else if out_in {
                t.transpose().cast(dtype).transpose()
            } else {
                t.cast(dtype)
            }
        })
    }
}

/// What a loading pass knows about the model's parameters and the current part.
struct Filler<'a> {
    backbone: Backbone,
    options: LoadOptions,
    out_in: bool,
    part: Option<&'a Part>,
    walk: Walk,
    /// How linear weights are quantized (stored so, or asked for at load).
    quantization: Option<QuantizationConfig>,
    /// Whether the device multiplies quantized weights (else they load dequantized).
    native_quantized: bool,
    /// Every parameter's official key and the shape it must have there.
    expected: BTreeMap<String, Vec<usize>>,
    /// Keys of the part that filled a parameter.
    used: BTreeSet<String>,
    problems: Vec<String>,
    device: Device,
    /// Told the bytes of every tensor loaded.
    progress: &'a mut dyn FnMut(u64),
    /// The weights packed for the CPU kernels, by the parameter each stands in for.
    packed: PackedWeights,
}

impl Filler<'_> {
    fn build<const D: usize>(
        &mut self,
        key: &str,
        dtype: DType,
        role: Role,
        want: &[usize],
    ) -> Option<Placed<D>> {
        let part = self.part?;
        let entry = part.entries.get(key)?;
        self.used.insert(key.to_string());
        let scale_key = format!("{key}{SCALE_SUFFIX}");
        if let Some(scales) = part.entries.get(&scale_key) {
            self.used.insert(scale_key);
            return self.build_quantized(key, entry, scales, dtype, role, want);
        }
        let Some(from) = float_dtype(entry.dtype) else {
            self.problems.push(format!(
                "{key}: dtype {:?} is not a float type (F32, F16 or BF16)",
                entry.dtype
            ));
            return None;
        };
        let linear = role == Role::LinearWeight && entry.shape.len() == 2;
        // The checkpoint's [out, in] is Burn's [in, out] transposed.
        let burn_shape: Vec<usize> = if linear {
            vec![entry.shape[1], entry.shape[0]]
        } else {
            entry.shape.clone()
        };
        if burn_shape != want {
            self.problems.push(format!(
                "{key}: the checkpoint has {:?}, the model needs {:?}",
                entry.shape,
                if linear {
                    vec![want[1], want[0]]
                } else {
                    want.to_vec()
                }
            ));
            return None;
        }
        if let Some(q) = self.quantization
            && quantizes(self.quantization, key, role, want)
        {
            // Quantized from f32 in the checkpoint's [out, in] order.
            let bytes = convert(part.data(entry), from, DType::F32, &entry.shape, false);
            part.release(entry);
            let [n, k] = [entry.shape[0], entry.shape[1]];
            let (codes, scales) = quantize::quantize_host(&typed::<f32>(&bytes), k, q.scheme);
            return Some(place_quantized(
                &self.device,
                self.out_in,
                self.native_quantized,
                Codes {
                    stored: Cow::Owned(q.scheme.pack(&codes)),
                    scales: quantize::f16_scales(&scales),
                    nk: [n, k],
                    scheme: q.scheme,
                    role,
                },
                dtype,
            ));
        }
        let element = dtype.size();
        let data = part.data(entry);
        // Kept in the checkpoint's order: every tensor but a linear weight off flex.
        let keep_order = !linear || self.out_in;
        let bytes =
            if keep_order && from == dtype && (data.as_ptr() as usize).is_multiple_of(element) {
                part.shared(entry)
            } else {
                let converted = convert(data, from, dtype, &entry.shape, !keep_order);
                part.release(entry);
                converted
            };
        Some(Placed::Tensor(if linear && self.out_in {
            let stored = TensorData::from_bytes(bytes, entry.shape.clone(), dtype);
            Tensor::<D>::from_data(stored, (&self.device, dtype)).transpose()
        } else {
            let stored = TensorData::from_bytes(bytes, burn_shape, dtype);
            Tensor::<D>::from_data(stored, (&self.device, dtype))
        }))
    }
}

impl Filler<'_> {
    /// A weight stored quantized: codes `entry` and block scales `scales`, checked against the
    /// config and the model, then quantized on the device (or dequantized where the device has
    /// no quantized arithmetic).
    fn build_quantized<const D: usize>(
        &mut self,
        key: &str,
        entry: &Entry,
        scales: &Entry,
        dtype: DType,
        role: Role,
        want: &[usize],
    ) -> Option<Placed<D>> {
        let part = self.part?;
        let Some(q) = self.quantization else {
            self.problems.push(format!(
                "{key}: stored quantized, but config.json has no `quantization` section"
            ));
            return None;
        };
        let [n, k] = match checkpoint_nk(role, want) {
            Some(nk) if quantizes(Some(q), key, role, want) => nk,
            _ => {
                self.problems.push(format!(
                    "{key}: stored quantized, but with this config it is a float tensor"
                ));
                return None;
            }
        };
        let (code_dtype, code_shape) = match q.scheme {
            Quantization::Q8 => (Dtype::I8, vec![n, k]),
            Quantization::Q4 => (Dtype::U8, vec![n, k / 2]),
        };
        let scale_shape = vec![n, k / quantize::BLOCK];
        if entry.dtype != code_dtype || entry.shape != code_shape {
            self.problems.push(format!(
                "{key}: {} codes must be {code_dtype:?} {code_shape:?}, the file has {:?} {:?}",
                q.scheme, entry.dtype, entry.shape
            ));
            return None;
        }
        if scales.dtype != Dtype::F16 || scales.shape != scale_shape {
            self.problems.push(format!(
                "{key}{SCALE_SUFFIX}: the scales must be F16 {scale_shape:?}, the file has {:?} {:?}",
                scales.dtype, scales.shape
            ));
            return None;
        }
        if let Some(bad) = q.scheme.first_bad_code(part.data(entry)) {
            let max = q.scheme.max_code();
            self.problems.push(format!(
                "{key}: a code is {bad}, outside the {} range {}..={max}",
                q.scheme, -max
            ));
            return None;
        }
        let scale_values = typed::<f16>(part.data(scales)).to_vec();
        if let Some(bad) = scale_values
            .iter()
            .map(|s| s.to_f32())
            .find(|s| !(s.is_finite() && *s > 0.0))
        {
            self.problems.push(format!(
                "{key}{SCALE_SUFFIX}: a scale is {bad} (scales are positive and finite)"
            ));
            return None;
        }
        // 8-bit codes and a 4-bit table are kept as stored (a table regrouped in place):
        // copied out, the file's pages released behind them. 4-bit linear weights are read
        // from the file as they lie and repacked.
        let stored = if q.scheme == Quantization::Q4 && role == Role::LinearWeight {
            Cow::Borrowed(part.data(entry))
        } else {
            Cow::Owned(part.copy_releasing(entry))
        };
        part.release(scales);
        let placed = place_quantized(
            &self.device,
            self.out_in,
            self.native_quantized,
            Codes {
                stored,
                scales: scale_values,
                nk: [n, k],
                scheme: q.scheme,
                role,
            },
            dtype,
        );
        part.release(entry);
        Some(placed)
    }
}

/// A quantized matrix as the checkpoint stores it: its codes and block scales, in the
/// checkpoint's order.
struct Codes<'a> {
    /// The codes as stored ([`Quantization::pack`]), row-major `[n, k]`.
    stored: Cow<'a, [u8]>,
    /// One scale per block of 32 along each row, `[n, k / 32]`.
    scales: Vec<f16>,
    /// `[n, k]`: outputs and inputs of a linear weight, vocabulary and hidden size of the
    /// token embeddings.
    nk: [usize; 2],
    scheme: Quantization,
    /// A linear weight (Burn sees its transpose `[k, n]`) or the token embeddings (`[n, k]`).
    role: Role,
}

/// A parameter's value as placed on its device.
// One at a time, moved straight into its parameter: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Placed<const D: usize> {
    /// A tensor (float, or quantized on the GPUs).
    Tensor(Tensor<D>),
    /// A quantized matrix packed for the CPU kernels ([`crate::packed`]).
    Packed(PackedWeight),
}

impl<const D: usize> Placed<D> {
    /// Parameter `param` holding this value; a packed weight is recorded in `packed` and
    /// stood in for by a lazy parameter ([`PackedWeight::param`]).
    fn into_param(
        self,
        param: Param<Tensor<D>>,
        device: &Device,
        packed: &mut PackedWeights,
    ) -> Param<Tensor<D>> {
        let id = param.id;
        match self {
            Placed::Tensor(tensor) => param.transform_for_load(tensor, id),
            Placed::Packed(weight) => {
                let stand_in = weight.param(id, device);
                packed.insert(id, weight);
                stand_in
            }
        }
    }
}

/// A quantized matrix placed on `device`: packed for the CPU kernels on flex, a quantized
/// tensor where a GPU has quantized arithmetic (`native`; the token embeddings stay float
/// there), otherwise the dequantized values in `dtype` laid out as the device reads them, so
/// that every backend computes with the same weights.
fn place_quantized<const D: usize>(
    device: &Device,
    out_in: bool,
    native: bool,
    Codes {
        stored,
        scales,
        nk: [n, k],
        scheme,
        role,
    }: Codes<'_>,
    dtype: DType,
) -> Placed<D> {
    let linear = role == Role::LinearWeight;
    if native && out_in {
        // Flex: a linear weight laid out as Burn sees it, [k, n] with blocks of 32 down each
        // column, and the embeddings [n, k] with blocks along each row, packed from the
        // stored bytes.
        return Placed::Packed(if linear {
            PackedWeight::columns(&scheme.unpack(&stored, n * k), &scales, n, k, scheme)
        } else {
            PackedWeight::rows(stored, scales, n, k, scheme)
        });
    }
    let values = quantize::dequantize_host(&scheme.unpack(&stored, n * k), &scales, k);
    if native && linear {
        // Burn's GPU kernels re-derive the scales from the values: the same codes, except in a
        // block whose f16 scale is subnormal (weights below about 2e-3 in q8), where a code
        // can move by one step. They keep the scales in f32 (which holds every f16): adapters
        // without `shader-f16` (many browsers' WebGPU) cannot run f16 scales.
        let w = Tensor::<D>::from_data(TensorData::new(values, [n, k]), (device, DType::F32));
        return Placed::Tensor(w.quantize_dynamic(&scheme.gpu_scheme()).transpose());
    }
    // No quantized arithmetic (ndarray, libtorch), or embeddings off flex (an embedding lookup
    // has no quantized kernel there): the same values in float, a linear weight as `[k, n]`.
    let bytes = convert(
        bytemuck::cast_slice(&values),
        DType::F32,
        dtype,
        &[n, k],
        linear,
    );
    let shape = if linear { [k, n] } else { [n, k] };
    let stored = TensorData::from_bytes(bytes, shape, dtype);
    Placed::Tensor(Tensor::<D>::from_data(stored, (device, dtype)))
}

/// `[n, k]` in the checkpoint's order of a matrix whose Burn shape is `want`: a linear weight's
/// transposed, the embeddings' as they are.
fn checkpoint_nk(role: Role, want: &[usize]) -> Option<[usize; 2]> {
    match (role, want) {
        (Role::LinearWeight, &[k, n]) => Some([n, k]),
        (Role::Matrix, &[n, k]) => Some([n, k]),
        _ => None,
    }
}

/// Whether the parameter `key` (Burn shape `want`) gets quantized under `config`: a linear
/// weight whose inputs are a multiple of the block, not a phantom gate, not an untied LM head
/// unless asked; the token embeddings if asked.
fn quantizes(config: Option<QuantizationConfig>, key: &str, role: Role, want: &[usize]) -> bool {
    let Some(q) = config else {
        return false;
    };
    let Some([_, k]) = checkpoint_nk(role, want) else {
        return false;
    };
    let wanted = match role {
        Role::LinearWeight => {
            !key.contains("gating_phantom") && (q.lm_head || !TIED_HEAD_KEYS.contains(&key))
        }
        Role::Matrix => q.embeddings,
        Role::Other => false,
    };
    wanted && quantize::quantizable(k)
}

/// Quantizes the linear weights of a model already in memory (random weights for a
/// benchmark, a freshly trained model) as a quantized folder would load.
pub fn quantize_parameters(mut model: PhantomModel, config: QuantizationConfig) -> PhantomModel {
    let device = model.language_model.model.norm.gamma.lazy_device();
    let native = quantize::native(&device);
    let mut mapper = Quantizer {
        backbone: model.config.llm.backbone,
        config,
        device: device.clone(),
        out_in: out_in_layout(&device),
        native,
        walk: Walk::default(),
        already: model.packed.clone(),
        packed: PackedWeights::new(),
    };
    model.config.quantization = native.then_some(config);
    let mut model = model.map(&mut mapper);
    crate::linear::attach(&mut model, mapper.packed);
    model
}

struct Quantizer {
    backbone: Backbone,
    config: QuantizationConfig,
    device: Device,
    out_in: bool,
    native: bool,
    walk: Walk,
    /// The model's weights packed already.
    already: PackedWeights,
    /// The weights it packs.
    packed: PackedWeights,
}

impl ModuleMapper for Quantizer {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.walk.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.walk.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (key, _, role) = self.walk.locate(self.backbone, LoadOptions::default());
        let want: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
        if is_packed(&self.already, &param)
            || !quantizes(Some(self.config), &key, role, &want)
            || matches!(param.val().dtype(), DType::QFloat(_))
        {
            return param;
        }
        let Some([n, k]) = checkpoint_nk(role, &want) else {
            return param;
        };
        let t = param.val();
        let dtype = t.dtype();
        let t = if role == Role::LinearWeight {
            t.transpose()
        } else {
            t
        };
        let values = t
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        let (codes, scales) = quantize::quantize_host(&values, k, self.config.scheme);
        let placed = place_quantized(
            &self.device,
            self.out_in,
            self.native,
            Codes {
                stored: Cow::Owned(self.config.scheme.pack(&codes)),
                scales: quantize::f16_scales(&scales),
                nk: [n, k],
                scheme: self.config.scheme,
                role,
            },
            dtype,
        );
        placed.into_param(param, &self.device, &mut self.packed)
    }
}

/// Whether `param` still stands in for one of the `packed` weights (asking it for its value
/// would unpack a copy).
fn is_packed<const D: usize>(packed: &PackedWeights, param: &Param<Tensor<D>>) -> bool {
    !param.is_initialized() && packed.contains_key(&param.id)
}

/// Why a checkpoint quantized as one scheme cannot load as the one `options` ask for.
fn scheme_conflict(config: &PhantomConfig, options: LoadOptions) -> Option<String> {
    let (stored, wanted) = (config.quantization?, options.quantize?);
    (stored.scheme != wanted.scheme).then(|| {
        format!(
            "the checkpoint is already quantized as {}; it cannot be loaded as {} (quantize the \
             float folder instead)",
            stored.scheme, wanted.scheme
        )
    })
}

/// Suffix of the key holding a quantized weight's block scales.
pub const SCALE_SUFFIX: &str = "_scale";

/// What a parameter is, for its dtype and layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A `Linear` weight: `[out, in]` in the checkpoint.
    LinearWeight,
    /// Another large matrix (token embeddings).
    Matrix,
    /// Anything else.
    Other,
}

impl ModuleMapper for Filler<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.walk.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.walk.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (key, dtype, role) = self.walk.locate(self.backbone, self.options);
        let want: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
        let official_shape = if role == Role::LinearWeight && want.len() == 2 {
            vec![want[1], want[0]]
        } else {
            want.clone()
        };
        self.expected.insert(key.clone(), official_shape);
        match self.build::<D>(&key, dtype, role, &want) {
            Some(placed) => {
                for name in [key.clone(), format!("{key}{SCALE_SUFFIX}")] {
                    if let Some(entry) = self.part.and_then(|p| p.entries.get(&name)) {
                        (self.progress)((entry.end - entry.start) as u64);
                    }
                }
                placed.into_param(param, &self.device, &mut self.packed)
            }
            None => param,
        }
    }
}

/// Builds a model from a checkpoint read in parts: files, shards, or safetensors blobs holding
/// any subset of the tensors (a browser hands over one slice of a download at a time, so that
/// the whole file never sits in memory next to the loaded weights).
///
/// A tensor counts as missing only when no part held it; every mismatch of every part is
/// reported together by [`WeightLoader::finish`].
pub struct WeightLoader {
    model: Option<PhantomModel>,
    options: LoadOptions,
    expected: BTreeMap<String, Vec<usize>>,
    loaded: BTreeSet<String>,
    unexpected: BTreeSet<String>,
    problems: Vec<String>,
    sources: Vec<String>,
}

impl WeightLoader {
    /// Starts loading a model shaped by `config` onto `device`. Its parameters are left
    /// undrawn (Burn draws a parameter on first use), so loading never pays for a random
    /// initialisation it overwrites.
    pub fn new(config: PhantomConfig, device: &Device, options: LoadOptions) -> Self {
        let problems = scheme_conflict(&config, options).into_iter().collect();
        let options = LoadOptions {
            quantize: config.quantization.or(options.quantize),
            ..options
        };
        Self {
            model: Some(PhantomModel::unprepared(config, device)),
            options,
            expected: BTreeMap::new(),
            loaded: BTreeSet::new(),
            unexpected: BTreeSet::new(),
            problems,
            sources: Vec::new(),
        }
    }

    /// Loads the tensors of a safetensors file, memory-mapped where the platform allows.
    pub fn file(&mut self, path: &Path) -> Result<()> {
        self.file_with_progress(path, &mut |_| {})
    }

    /// [`WeightLoader::file`], telling `progress` the bytes of each tensor as it is loaded.
    pub fn file_with_progress(&mut self, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| PhantomError::io(path, e))?;
        #[cfg(not(target_family = "wasm"))]
        {
            // SAFETY: the map is read-only and private; like every program that maps its
            // weights, this one assumes the checkpoint is not rewritten while it runs.
            // One call maps every page: much faster than faulting them in one at a time.
            let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
                .map_err(|e| PhantomError::io(path, e))?;
            let map = Arc::new(map);
            let mut part = Part::parse(map.clone(), &name)?;
            part.map = Some(map);
            self.fill(part, name, progress)
        }
        #[cfg(target_family = "wasm")]
        {
            use std::io::Read;
            let mut bytes = Vec::new();
            let mut file = file;
            file.read_to_end(&mut bytes)
                .map_err(|e| PhantomError::io(path, e))?;
            let part = Part::parse(Arc::new(bytes), &name)?;
            self.fill(part, name, progress)
        }
    }

    /// Loads the tensors of a safetensors blob held in memory; `name` identifies it in errors.
    pub fn bytes(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let part = Part::parse(Arc::new(bytes), name)?;
        self.fill(part, name.to_string(), &mut |_| {})
    }

    fn fill(&mut self, part: Part, name: String, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let Some(model) = self.model.take() else {
            return Err(PhantomError::Weights("the loader has finished".into()));
        };
        let device = model.language_model.model.norm.gamma.lazy_device();
        let mut filler = Filler {
            backbone: model.config.llm.backbone,
            options: self.options,
            out_in: out_in_layout(&device),
            part: Some(&part),
            walk: Walk::default(),
            quantization: self.options.quantize,
            native_quantized: quantize::native(&device),
            expected: BTreeMap::new(),
            used: BTreeSet::new(),
            problems: Vec::new(),
            device,
            progress,
            packed: PackedWeights::new(),
        };
        let mut model = model.map(&mut filler);
        crate::linear::attach(&mut model, std::mem::take(&mut filler.packed));
        self.model = Some(model);
        for key in part.entries.keys() {
            if !filler.used.contains(key) {
                self.unexpected.insert(key.clone());
            }
        }
        self.loaded.extend(filler.used);
        self.expected = filler.expected;
        self.problems
            .extend(filler.problems.into_iter().map(|p| format!("{name}: {p}")));
        self.sources.push(name);
        Ok(())
    }

    /// The loaded model, once the parts together held every tensor, and nothing else.
    pub fn finish(mut self) -> Result<PhantomModel> {
        let Some(mut model) = self.model.take() else {
            return Err(PhantomError::Weights("the loader has finished".into()));
        };
        // What the loaded weights are: quantized where the device keeps them so.
        let device = model.language_model.model.norm.gamma.lazy_device();
        model.config.quantization = self.options.quantize.filter(|_| quantize::native(&device));
        // A key one part lacked may have come from another.
        self.unexpected
            .retain(|key| !self.expected.contains_key(key));
        if model.config.llm.tie_word_embeddings {
            self.unexpected
                .retain(|key| !TIED_HEAD_KEYS.contains(&key.as_str()));
        }
        let missing: Vec<&String> = self
            .expected
            .keys()
            .filter(|key| !self.loaded.contains(*key))
            .collect();
        if missing.is_empty() && self.unexpected.is_empty() && self.problems.is_empty() {
            return Ok(model);
        }
        let mut report = String::new();
        for p in &self.problems {
            report.push_str(&format!("  mis-shaped: {p}\n"));
        }
        for m in &missing {
            report.push_str(&format!("  missing: {m}\n"));
        }
        for u in &self.unexpected {
            report.push_str(&format!("  unexpected: {u}\n"));
        }
        Err(PhantomError::Weights(format!(
            "{} problem(s) loading {}:\n{}",
            self.problems.len() + missing.len() + self.unexpected.len(),
            if self.sources.is_empty() {
                "nothing".to_string()
            } else {
                self.sources.join(", ")
            },
            report.trim_end()
        )))
    }
}

/// Collects every parameter under its official key, to be read one at a time as the file is
/// written (so saving holds at most one converted tensor next to the model).
struct Collector {
    backbone: Backbone,
    /// The scheme of the model's quantized weights.
    quantization: Option<QuantizationConfig>,
    dtype: DType,
    file_dtype: Dtype,
    walk: Walk,
    tensors: Vec<(String, Stored)>,
    /// The model's packed weights, read as they lie.
    packed: PackedWeights,
}

/// A parameter as the checkpoint stores it, converted when the writer asks for its bytes.
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: usize,
    data: Box<dyn Fn() -> Vec<u8>>,
}

impl safetensors::View for Stored {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned((self.data)())
    }

    fn data_len(&self) -> usize {
        self.bytes
    }
}

impl Collector {
    /// A quantized matrix (`[n, k]` in the checkpoint) as its codes and block scales
    /// ([`crate::quantize`]), each computed when the writer asks for it: the writer orders
    /// tensors by dtype, so keeping the codes until their scales are written would hold every
    /// weight's codes at once.
    fn quantized(
        &mut self,
        key: String,
        codes_and_scales: impl Fn() -> (Vec<i8>, Vec<f32>) + Clone + 'static,
        [n, k]: [usize; 2],
        scheme: Quantization,
    ) {
        let (code_dtype, code_shape) = match scheme {
            Quantization::Q8 => (Dtype::I8, vec![n, k]),
            Quantization::Q4 => (Dtype::U8, vec![n, k / 2]),
        };
        let codes = codes_and_scales.clone();
        self.tensors.push((
            key.clone(),
            Stored {
                dtype: code_dtype,
                bytes: code_shape.iter().product(),
                shape: code_shape,
                data: Box::new(move || scheme.pack(&codes().0)),
            },
        ));
        let scale_shape = vec![n, k / quantize::BLOCK];
        self.tensors.push((
            format!("{key}{SCALE_SUFFIX}"),
            Stored {
                dtype: Dtype::F16,
                bytes: scale_shape.iter().product::<usize>() * 2,
                shape: scale_shape,
                data: Box::new(move || {
                    let scales: Vec<f16> = codes_and_scales()
                        .1
                        .iter()
                        .map(|&s| f16::from_f32(s))
                        .collect();
                    bytemuck::cast_slice(&scales).to_vec()
                }),
            },
        ));
    }
}

/// The codes (`[n, k]`) and block scales (`[n, k / 32]`) of a quantized matrix in the
/// checkpoint's order (a linear weight Burn sees as `[k, n]`, or the embeddings): read as they
/// lie on flex; elsewhere re-derived from the (dequantized) values, which gives them back
/// unless a block's f16 scale is subnormal (weights below about 2e-3 in q8).
fn stored_codes<const D: usize>(
    weight: Tensor<D>,
    role: Role,
    scheme: Quantization,
) -> (Vec<i8>, Vec<f32>) {
    // A matrix has rank 2 (an operation such as a reshape would re-quantize it).
    let weight = Tensor::<2>::from_dispatch(weight.into_dispatch());
    #[cfg(feature = "cpu-kernels")]
    if let Some(parts) = crate::kernels::quantized_parts(&weight) {
        return parts;
    }
    let weight = match weight.dtype() {
        DType::QFloat(_) => weight.dequantize(),
        _ => weight,
    };
    let weight = if role == Role::LinearWeight {
        weight.transpose()
    } else {
        weight
    };
    let [_, k] = weight.dims();
    let values: Vec<f32> = weight
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default();
    quantize::quantize_host(&values, k, scheme)
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.walk.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.walk.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let (key, _, role) = self.walk.locate(self.backbone, LoadOptions::default());
        let dims = param.lazy_shape().dims::<D>().to_vec();
        if let (Some(q), Some(nk)) = (self.quantization, checkpoint_nk(role, &dims))
            && quantizes(Some(q), &key, role, &dims)
        {
            if is_packed(&self.packed, param)
                && let Some(weight) = self.packed.get(&param.id).cloned()
            {
                self.quantized(key, move || weight.parts(), nk, q.scheme);
            } else {
                let value = param.val();
                self.quantized(
                    key,
                    move || stored_codes(value.clone(), role, q.scheme),
                    nk,
                    q.scheme,
                );
            }
            return;
        }
        let mut value = param.val();
        if role == Role::LinearWeight && D == 2 {
            value = value.transpose();
        }
        let shape = value.dims().to_vec();
        let dtype = self.dtype;
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let data = Box::new(move || {
            value
                .clone()
                .into_data()
                .convert_dtype(dtype)
                .as_bytes()
                .to_vec()
        });
        self.tensors.push((
            key,
            Stored {
                dtype: self.file_dtype,
                shape,
                bytes,
                data,
            },
        ));
    }
}

/// Writes `model` as a Hugging Face style folder in the official layout: `config.json` and a
/// single `model.safetensors` (f32), each written to a temporary file first and renamed, so
/// an interrupted save never leaves a half-written checkpoint.
pub fn save_model(model: &PhantomModel, dir: impl AsRef<Path>) -> Result<()> {
    save_model_as(model, dir, DType::F32)
}

/// [`save_model`] with the tensors stored as `dtype` (f32, f16 or bf16; the released
/// checkpoints are bf16).
pub fn save_model_as(model: &PhantomModel, dir: impl AsRef<Path>, dtype: DType) -> Result<()> {
    let file_dtype = match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        other => {
            return Err(PhantomError::Weights(format!(
                "cannot store a checkpoint as {other:?}; use f32, f16 or bf16"
            )));
        }
    };
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| PhantomError::io(dir, e))?;
    let config = dir.join(CONFIG_FILE);
    let config_tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    let text = serde_json::to_string_pretty(&model.config.to_json())
        .map_err(|e| PhantomError::Config(format!("serialising config: {e}")))?;
    std::fs::write(&config_tmp, text).map_err(|e| PhantomError::io(&config_tmp, e))?;

    let mut collector = Collector {
        backbone: model.config.llm.backbone,
        quantization: model.config.quantization,
        dtype,
        file_dtype,
        walk: Walk::default(),
        tensors: Vec::new(),
        packed: model.packed.clone(),
    };
    model.visit(&mut collector);
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    let metadata: Option<HashMap<String, String>> =
        Some([("format".to_string(), "pt".to_string())].into());
    safetensors::serialize_to_file(collector.tensors, metadata, &tmp)
        .map_err(|e| PhantomError::Weights(format!("writing {}: {e}", tmp.display())))?;
    // The writer creates a private file (mode 0600 on Unix); the checkpoint gets the mode of
    // any other new file here, the config's.
    let mode = std::fs::metadata(&config_tmp)
        .map_err(|e| PhantomError::io(&config_tmp, e))?
        .permissions();
    std::fs::set_permissions(&tmp, mode).map_err(|e| PhantomError::io(&tmp, e))?;
    std::fs::rename(&tmp, &weights).map_err(|e| PhantomError::io(&weights, e))?;
    std::fs::rename(&config_tmp, &config).map_err(|e| PhantomError::io(&config, e))?;
    // A stale shard index next to the new single file would win on the next load.
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        std::fs::remove_file(&index).map_err(|e| PhantomError::io(&index, e))?;
    }
    Ok(())
}

/// A file's bytes: memory-mapped where there is an OS to map it, read otherwise.
fn read_or_map(path: &Path) -> Result<Box<dyn std::ops::Deref<Target = [u8]>>> {
    #[cfg(not(target_family = "wasm"))]
    {
        let file = std::fs::File::open(path).map_err(|e| PhantomError::io(path, e))?;
        // SAFETY: read-only private map of a file this process is about to replace by rename;
        // the old file stays valid while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| PhantomError::io(path, e))?;
        Ok(Box::new(map))
    }
    #[cfg(target_family = "wasm")]
    {
        let bytes = std::fs::read(path).map_err(|e| PhantomError::io(path, e))?;
        Ok(Box::new(bytes))
    }
}

/// Splits the single-file checkpoint in `dir` into `shards` files named as Hugging Face names
/// them (`model-00001-of-00004.safetensors`, …) plus `model.safetensors.index.json`, the
/// layout of the released 3.8B and 7B. Tensors keep their order; each shard takes about an
/// equal share of the bytes. Every file is written under a temporary name and renamed, and the
/// single file is removed last.
pub fn split_into_shards(dir: impl AsRef<Path>, shards: usize) -> Result<Vec<PathBuf>> {
    use safetensors::tensor::TensorView;

    let dir = dir.as_ref();
    let single = dir.join(WEIGHTS_FILE);
    if shards < 2 {
        return Ok(vec![single]);
    }
    let mode = std::fs::metadata(&single)
        .map_err(|e| PhantomError::io(&single, e))?
        .permissions();
    let bytes = read_or_map(&single)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| PhantomError::Weights(format!("{}: {e}", single.display())))?;
    let mut tensors: Vec<(String, TensorView<'_>)> = file.tensors().into_iter().collect::<Vec<_>>();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let total: usize = tensors.iter().map(|(_, t)| t.data().len()).sum();
    let shards = shards.min(tensors.len().max(1));
    let per_shard = total.div_ceil(shards);

    let mut groups: Vec<Vec<(String, TensorView<'_>)>> = vec![Vec::new()];
    let mut filled = 0usize;
    for (name, view) in tensors {
        let size = view.data().len();
        // A quantized weight's scales (sorted right after it) stay in its shard.
        let scales = name.ends_with(SCALE_SUFFIX);
        if filled > 0 && filled + size > per_shard && groups.len() < shards && !scales {
            groups.push(Vec::new());
            filled = 0;
        }
        filled += size;
        if let Some(group) = groups.last_mut() {
            group.push((name, view));
        }
    }

    let count = groups.len();
    let metadata: Option<HashMap<String, String>> =
        Some([("format".to_string(), "pt".to_string())].into());
    let mut weight_map = serde_json::Map::new();
    let mut written = Vec::with_capacity(count);
    for (i, group) in groups.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.tmp"));
        for (key, _) in &group {
            weight_map.insert(key.clone(), name.clone().into());
        }
        safetensors::serialize_to_file(group, metadata.clone(), &tmp)
            .map_err(|e| PhantomError::Weights(format!("writing {}: {e}", tmp.display())))?;
        // The shards get the single file's mode, not the writer's private one.
        std::fs::set_permissions(&tmp, mode.clone()).map_err(|e| PhantomError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| PhantomError::io(&path, e))?;
        written.push(path);
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let index_path = dir.join(INDEX_FILE);
    let tmp = dir.join(format!(".{INDEX_FILE}.tmp"));
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| PhantomError::Weights(format!("serialising the index: {e}")))?;
    std::fs::write(&tmp, text).map_err(|e| PhantomError::io(&tmp, e))?;
    std::fs::rename(&tmp, &index_path).map_err(|e| PhantomError::io(&index_path, e))?;
    drop(bytes);
    std::fs::remove_file(&single).map_err(|e| PhantomError::io(&single, e))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_become_official_keys() {
        let cases = [
            (
                Backbone::Qwen2,
                "language_model.model.layers.3.self_attn.qkv.q_proj.weight",
                "language_model.model.layers.3.self_attn.q_proj.weight",
            ),
            (
                Backbone::Qwen2,
                "language_model.model.layers.0.self_attn.phantom.gating_phantom_1.bias",
                "language_model.model.layers.0.self_attn.gating_phantom_1.bias",
            ),
            (
                Backbone::Qwen2,
                "language_model.model.layers.0.mlp.gate_up.up_proj.weight",
                "language_model.model.layers.0.mlp.up_proj.weight",
            ),
            (
                Backbone::Phi3,
                "language_model.model.layers.1.self_attn.qkv.weight",
                "language_model.model.layers.1.self_attn.qkv_proj.weight",
            ),
            (
                Backbone::Phi3,
                "language_model.model.layers.1.mlp.gate_up.weight",
                "language_model.model.layers.1.mlp.gate_up_proj.weight",
            ),
            (
                Backbone::InternLm2,
                "language_model.model.layers.2.self_attn.qkv.weight",
                "language_model.model.layers.2.attention.wqkv.weight",
            ),
            (
                Backbone::InternLm2,
                "language_model.model.layers.2.mlp.gate_up.gate_proj.weight",
                "language_model.model.layers.2.feed_forward.w1.weight",
            ),
            (
                Backbone::InternLm2,
                "language_model.lm_head.weight",
                "language_model.output.weight",
            ),
            (
                Backbone::InternLm2,
                "language_model.model.embed_tokens.weight",
                "language_model.model.tok_embeddings.weight",
            ),
            (
                Backbone::Qwen2,
                "vision_proj.fc2.bias",
                "vision_proj.3.bias",
            ),
            (
                Backbone::Phi3,
                "vision_model.encoder.layers.0.attn.qkv.weight",
                "vision_model.encoder.layers.0.attn.qkv.weight",
            ),
        ];
        for (backbone, path, key) in cases {
            assert_eq!(official_key(backbone, path), key, "{backbone:?} {path}");
        }
    }

    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        let mut state = 0x1234_5678u32;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let want = bf16::from_f32(f32::from_bits(state));
            let got = bf16::from_bits(f32_bits_to_bf16(state));
            if want.is_nan() {
                assert!(got.is_nan(), "{state:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{state:#x}");
            }
        }
        for v in [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -0.0,
            1.0 + 1.0 / 256.0,
        ] {
            assert_eq!(
                f32_bits_to_bf16(v.to_bits()),
                bf16::from_f32(v).to_bits(),
                "{v}"
            );
        }
    }

    #[test]
    fn conversion_transposes_and_rounds_in_one_pass() {
        // [2, 3] f32 → [3, 2] bf16.
        let values = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0 + 1.0 / 512.0];
        let src: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let out = convert(&src, DType::F32, DType::BF16, &[2, 3], true);
        let got: Vec<f32> = out
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(got, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let same = convert(&src, DType::F32, DType::F32, &[2, 3], false);
        assert_eq!(&*same, &src[..]);
    }
}
