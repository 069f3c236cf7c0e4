//! The official safetensors layout ⇄ Burn modules.
//!
//! Loading reads `model.safetensors` or the shards listed in `model.safetensors.index.json`
//! (bf16, f16 or f32 on disk), renames the official keys to the module tree, transposes the
//! linear weights (PyTorch stores `[out, in]`) and refuses any mismatch: every missing,
//! unexpected or mis-shaped tensor is named in one error. Saving writes the same layout back.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::store::{
    BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter,
    SafetensorsStore,
};
use burn::tensor::DType;

use crate::config::{Backbone, PhantomConfig};
use crate::decoder::{internlm2, qwen2};
use crate::error::{PhantomError, Result};
use crate::model::PhantomModel;

/// Name of the single-file checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the configuration file.
pub const CONFIG_FILE: &str = "config.json";

/// Renames shared by every backbone: the projector's `nn.Sequential` indices.
const PROJECTOR_LOAD: &[(&str, &str)] = &[
    (r"^vision_proj\.0\.", "vision_proj.norm."),
    (r"^vision_proj\.1\.", "vision_proj.fc1."),
    (r"^vision_proj\.3\.", "vision_proj.fc2."),
];
const PROJECTOR_SAVE: &[(&str, &str)] = &[
    (r"^vision_proj\.norm\.", "vision_proj.0."),
    (r"^vision_proj\.fc1\.", "vision_proj.1."),
    (r"^vision_proj\.fc2\.", "vision_proj.3."),
];

/// The key of a tied head, which checkpoints may or may not repeat.
const TIED_HEAD_KEYS: &[&str] = &[
    "language_model.lm_head.weight",
    "language_model.output.weight",
];

fn renames(backbone: Backbone, save: bool) -> Vec<(&'static str, &'static str)> {
    let (projector, decoder) = match (backbone, save) {
        (Backbone::InternLm2, false) => (PROJECTOR_LOAD, internlm2::LOAD_RENAMES),
        (Backbone::InternLm2, true) => (PROJECTOR_SAVE, internlm2::SAVE_RENAMES),
        (_, false) => (PROJECTOR_LOAD, qwen2::LOAD_RENAMES),
        (_, true) => (PROJECTOR_SAVE, qwen2::SAVE_RENAMES),
    };
    projector.iter().chain(decoder).copied().collect()
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

/// How weights are brought onto the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Float dtype of the loaded parameters (f32 unless the backend and user ask otherwise).
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32 }
    }
}

/// Loads a Hugging Face style folder (`config.json` + safetensors) onto `device`.
pub fn load_model(
    dir: impl AsRef<Path>,
    device: &Device,
    options: LoadOptions,
) -> Result<PhantomModel> {
    let dir = dir.as_ref();
    let config = PhantomConfig::from_file(dir.join(CONFIG_FILE))?;
    let mut loader = WeightLoader::new(config, device, options);
    for file in weight_files(dir)? {
        loader.file(&file)?;
    }
    loader.finish()
}

/// Builds a model from a checkpoint read in parts: files, shards, or safetensors blobs holding
/// any subset of the tensors (a browser hands over one slice of a download at a time, so that
/// the whole file never sits in memory next to the loaded weights).
///
/// A tensor counts as missing only when no part held it; every mismatch of every part is
/// reported together by [`WeightLoader::finish`].
pub struct WeightLoader {
    model: PhantomModel,
    options: LoadOptions,
    missing: Option<BTreeSet<String>>,
    unexpected: BTreeSet<String>,
    problems: Vec<String>,
    sources: Vec<String>,
}

impl WeightLoader {
    /// Starts loading a model shaped by `config` onto `device`. Its parameters are left
    /// undrawn (Burn draws a parameter on first use), so loading never pays for a random
    /// initialisation it overwrites.
    pub fn new(config: PhantomConfig, device: &Device, options: LoadOptions) -> Self {
        Self {
            model: PhantomModel::unprepared(config, device),
            options,
            missing: None,
            unexpected: BTreeSet::new(),
            problems: Vec::new(),
            sources: Vec::new(),
        }
    }

    /// Loads the tensors of a safetensors file.
    pub fn file(&mut self, path: &Path) -> Result<()> {
        self.part(
            SafetensorsStore::from_file(path),
            path.display().to_string(),
        )
    }

    /// Loads the tensors of a safetensors blob held in memory; `name` identifies it in errors.
    pub fn bytes(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.part(SafetensorsStore::from_bytes(Some(bytes)), name.to_string())
    }

    fn part(&mut self, store: SafetensorsStore, name: String) -> Result<()> {
        let mut store = store
            .with_from_adapter(PyTorchToBurnAdapter.chain(FloatCastAdapter::to(self.options.dtype)))
            .skip_enum_variants(true)
            .validate(false)
            .allow_partial(true);
        for (from, to) in renames(self.model.config.llm.backbone, false) {
            store = store.with_key_remapping(from, to);
        }
        let result = self
            .model
            .load_from(&mut store)
            .map_err(|e| PhantomError::Weights(format!("{name}: {e}")))?;
        let here: BTreeSet<String> = result
            .missing
            .iter()
            .map(|(path, _)| path.clone())
            .collect();
        self.missing = Some(match self.missing.take() {
            None => here,
            Some(before) => before.intersection(&here).cloned().collect(),
        });
        self.unexpected.extend(result.unused);
        self.problems
            .extend(result.errors.iter().map(|e| e.to_string()));
        self.sources.push(name);
        Ok(())
    }

    /// The loaded model, once the parts together held every tensor, and nothing else.
    pub fn finish(mut self) -> Result<PhantomModel> {
        if self.model.config.llm.tie_word_embeddings {
            self.unexpected
                .retain(|key| !TIED_HEAD_KEYS.contains(&key.as_str()));
        }
        let missing = self.missing.unwrap_or_default();
        let (problems, unexpected) = (self.problems, self.unexpected);
        if missing.is_empty() && unexpected.is_empty() && problems.is_empty() {
            crate::linear::prepare(&mut self.model);
            return Ok(self.model);
        }
        let mut report = String::new();
        for p in &problems {
            report.push_str(&format!("  mis-shaped: {p}\n"));
        }
        for m in &missing {
            report.push_str(&format!("  missing: {m}\n"));
        }
        for u in &unexpected {
            report.push_str(&format!("  unexpected: {u}\n"));
        }
        Err(PhantomError::Weights(format!(
            "{} problem(s) loading {}:\n{}",
            problems.len() + missing.len() + unexpected.len(),
            self.sources.join(", "),
            report.trim_end()
        )))
    }
}

/// Writes `model` as a Hugging Face style folder in the official layout: `config.json` and a
/// single `model.safetensors` (f32), each written to a temporary file first and renamed, so
/// an interrupted save never leaves a half-written checkpoint.
pub fn save_model(model: &PhantomModel, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| PhantomError::io(dir, e))?;
    let config = dir.join(CONFIG_FILE);
    let config_tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    let text = serde_json::to_string_pretty(&model.config.to_json())
        .map_err(|e| PhantomError::Config(format!("serialising config: {e}")))?;
    std::fs::write(&config_tmp, text).map_err(|e| PhantomError::io(&config_tmp, e))?;

    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    let mut store = SafetensorsStore::from_file(&tmp)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true)
        .overwrite(true)
        .metadata("format", "pt");
    for (from, to) in renames(model.config.llm.backbone, true) {
        store = store.with_key_remapping(from, to);
    }
    model
        .save_into(&mut store)
        .map_err(|e| PhantomError::Weights(format!("writing {}: {e}", tmp.display())))?;
    // The store writes through a private scratch file (mode 0600 on Unix); the checkpoint gets
    // the mode of any other new file here, the config's.
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

/// Splits the single-file checkpoint in `dir` into `shards` files named as Hugging Face names
/// them (`model-00001-of-00004.safetensors`, …) plus `model.safetensors.index.json`, the
/// layout of the released 3.8B and 7B. Tensors keep their order; each shard takes about an
/// equal share of the bytes. Every file is written under a temporary name and renamed, and the
/// single file is removed last.
pub fn split_into_shards(dir: impl AsRef<Path>, shards: usize) -> Result<Vec<PathBuf>> {
    use safetensors::SafeTensors;
    use safetensors::tensor::TensorView;

    let dir = dir.as_ref();
    let single = dir.join(WEIGHTS_FILE);
    if shards < 2 {
        return Ok(vec![single]);
    }
    let bytes = std::fs::read(&single).map_err(|e| PhantomError::io(&single, e))?;
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
        if filled > 0 && filled + size > per_shard && groups.len() < shards {
            groups.push(Vec::new());
            filled = 0;
        }
        filled += size;
        if let Some(group) = groups.last_mut() {
            group.push((name, view));
        }
    }

    let count = groups.len();
    let metadata: Option<std::collections::HashMap<String, String>> =
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
