//! Which weights a run trains: the paper's two stages, and training everything from scratch.

use std::fmt;
use std::str::FromStr;

use burn::module::{Lora, Module, ParamGroup};
use phantom_model::PhantomModel;

use crate::error::{Result, TrainError};

/// Parameter paths of the projector and of every layer's phantom modules (`xattn_*`,
/// `gating_*`): what stage 1 trains.
pub const STAGE1_PATTERNS: [&str; 2] = [r"^vision_proj\.", r"\.phantom\."];
/// Parameter paths of the vision tower.
pub const VISION_PATTERN: &str = r"^vision_model\.";
/// The dense projections of the vision tower and the decoder that LoRA adapts (not the
/// embeddings, the head, norms or the phantom modules, which train in full). Module paths
/// name the layout variant of the grouped projections (`qkv.Split.q_proj`, `gate_up.Fused`).
pub const LORA_PATTERNS: [&str; 2] = [
    r"^language_model\.model\.layers\.\d+\.(self_attn\.(qkv\.(Split\.[qkv]_proj|Fused|Grouped)|o_proj)|mlp\.(gate_up\.(Split\.(gate|up)_proj|Fused)|down_proj))\.weight$",
    r"^vision_model\.encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))\.weight$",
];

/// A training stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Stage 1: `vision_proj` and the phantom modules; the LLM and vision tower frozen.
    One,
    /// Stage 2: the LLM, projector and phantom modules (vision tower optional), usually SFT.
    Two,
    /// Every weight (training a small model from scratch).
    All,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::One => "1",
            Self::Two => "2",
            Self::All => "all",
        })
    }
}

impl FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "1" => Ok(Self::One),
            "2" => Ok(Self::Two),
            "all" => Ok(Self::All),
            other => Err(format!("unknown stage `{other}` (expected 1, 2 or all)")),
        }
    }
}

/// LoRA settings for stage 2.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSettings {
    /// Adapter rank.
    pub rank: usize,
    /// Scale numerator (`alpha / rank` multiplies the adapter).
    pub alpha: f64,
}

fn group(patterns: &[&str]) -> Result<ParamGroup> {
    ParamGroup::from_any_regexes(patterns.to_vec())
        .map_err(|e| TrainError::Config(format!("parameter pattern: {e:?}")))
}

/// Sets which parameters of `model` require gradients for `stage`. With `lora` (stage 2
/// only) the dense projections get trainable low-rank adapters over frozen bases.
pub fn prepare(
    model: PhantomModel,
    stage: Stage,
    train_vision: bool,
    lora: Option<LoraSettings>,
) -> Result<PhantomModel> {
    if lora.is_some() && stage != Stage::Two {
        return Err(TrainError::Config("LoRA applies to stage 2 only".into()));
    }
    Ok(match stage {
        Stage::All => model.unfreeze(),
        Stage::One => model.freeze().unfreeze_group(group(&STAGE1_PATTERNS)?),
        Stage::Two => {
            let mut model = match lora {
                Some(l) => {
                    let mut patterns = vec![LORA_PATTERNS[0]];
                    if train_vision {
                        patterns.push(LORA_PATTERNS[1]);
                    }
                    model
                        .apply_lora(Lora::new(l.rank, l.alpha).set_param_group(group(&patterns)?))
                        .unfreeze_group(group(&STAGE1_PATTERNS)?)
                }
                None => model.unfreeze(),
            };
            if !train_vision {
                model = model.freeze_group(group(&[VISION_PATTERN])?);
            }
            model
        }
    })
}

/// Puts every parameter of `model` on the autodiff graph of its device.
///
/// A model built or loaded on a plain device holds plain tensors, and moving it to the same
/// device's autodiff view is a no-op for Burn (the devices compare equal), so the tensors are
/// wrapped one by one; the stage then decides which of them require gradients.
pub fn with_autodiff(model: PhantomModel) -> PhantomModel {
    use burn::module::{ModuleMapper, Param};
    use burn::prelude::Tensor;
    struct ToAutodiff;
    impl ModuleMapper for ToAutodiff {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| if t.is_autodiff() { t } else { t.autodiff() })
        }
    }
    model.map(&mut ToAutodiff)
}

/// Counts `(trainable, total)` scalar parameters.
pub fn count_trainable(model: &PhantomModel) -> (usize, usize) {
    use burn::module::{ModuleVisitor, Param};
    use burn::prelude::Tensor;
    struct Count {
        trainable: usize,
        total: usize,
    }
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.shape().num_elements();
            self.total += n;
            if param.is_require_grad() {
                self.trainable += n;
            }
        }
    }
    let mut count = Count {
        trainable: 0,
        total: 0,
    };
    model.visit(&mut count);
    (count.trainable, count.total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_patterns_name_every_dense_projection_of_every_backbone() {
        let re = regex::Regex::new(LORA_PATTERNS[0]).expect("pattern");
        let layer = "language_model.model.layers.7.";
        for leaf in [
            "self_attn.qkv.Split.q_proj.weight",
            "self_attn.qkv.Split.k_proj.weight",
            "self_attn.qkv.Split.v_proj.weight",
            "self_attn.qkv.Fused.weight",
            "self_attn.qkv.Grouped.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_up.Split.gate_proj.weight",
            "mlp.gate_up.Split.up_proj.weight",
            "mlp.gate_up.Fused.weight",
            "mlp.down_proj.weight",
        ] {
            assert!(re.is_match(&format!("{layer}{leaf}")), "{leaf}");
        }
        for leaf in [
            "self_attn.qkv.Split.q_proj.bias",
            "self_attn.phantom.xattn_query_phantom.linear_q.weight",
            "input_layernorm.gamma",
        ] {
            assert!(!re.is_match(&format!("{layer}{leaf}")), "{leaf}");
        }
        let vision = regex::Regex::new(LORA_PATTERNS[1]).expect("pattern");
        assert!(vision.is_match("vision_model.encoder.layers.3.attn.qkv.weight"));
    }
}
