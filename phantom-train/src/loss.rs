//! Phantom Optimization loss (spec §5) and its ablations.
//!
//! `L = CE(y+|x) − log σ(β·avglogp(y+|x) − β·avglogp(y−|x) − γ)`: supervised fine-tuning on the
//! correct answer plus a reference-free, length-normalised preference term (SimPO's form) that
//! pushes the correct answer above the wrong or vague one by a margin γ.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::activation::softplus;

/// Which terms the loss has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Phantom Optimization: SFT on y+ plus the preference term.
    Po,
    /// Supervised fine-tuning on y+ only (the rejected answers are not scored).
    Sft,
    /// The preference term only (SimPO).
    Simpo,
}

impl Objective {
    /// Whether the rejected answers take part (and so are run through the model).
    pub fn uses_rejected(self) -> bool {
        !matches!(self, Self::Sft)
    }

    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Po => "po",
            Self::Sft => "sft",
            Self::Simpo => "simpo",
        }
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Objective {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "po" => Ok(Self::Po),
            "sft" => Ok(Self::Sft),
            "simpo" => Ok(Self::Simpo),
            other => Err(format!(
                "unknown objective `{other}` (expected po, sft or simpo)"
            )),
        }
    }
}

/// Loss hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PreferenceLoss {
    /// Which terms to use.
    pub objective: Objective,
    /// Reward scale β (2 in the paper).
    pub beta: f64,
    /// Target reward margin γ (0.5 in the paper).
    pub gamma: f64,
}

impl Default for PreferenceLoss {
    fn default() -> Self {
        Self {
            objective: Objective::Po,
            beta: 2.0,
            gamma: 0.5,
        }
    }
}

/// Per-token answer log-probabilities of a batch, grouped into sequences.
///
/// `token_logp` holds `log p(y_t | x, y_<t)` for every answer token of every scored sequence,
/// flattened; `segments[s]` is the range of sequence `s` in it. Sequences `0..B` are the chosen
/// answers and, when the objective scores them, `B..2B` the rejected ones.
pub struct AnswerLogps {
    /// `[N]`, differentiable.
    pub token_logp: Tensor<1>,
    /// Token range of each sequence.
    pub segments: Vec<std::ops::Range<usize>>,
}

/// The loss and the quantities the metrics report.
pub struct LossTerms {
    /// The optimised scalar, `[1]`.
    pub loss: Tensor<1>,
    /// Cross-entropy of the chosen answers (token mean over the batch), `[1]`.
    pub sft_loss: Tensor<1>,
    /// `−log σ(β·Δ − γ)`, mean over triples, `[1]`; `None` for SFT.
    pub pref_loss: Option<Tensor<1>>,
    /// `avglogp(y+)`, `[B]`.
    pub logps_chosen: Tensor<1>,
    /// `avglogp(y−)`, `[B]`; `None` for SFT.
    pub logps_rejected: Option<Tensor<1>>,
}

impl PreferenceLoss {
    /// Computes the loss from answer-token log-probabilities.
    ///
    /// The per-sequence sums are a matrix product with a 0/1 segment matrix, so one kernel
    /// serves any mix of answer lengths and the gradient flows back to every token.
    pub fn compute(&self, logps: &AnswerLogps) -> LossTerms {
        let device = logps.token_logp.device();
        let n = logps.token_logp.dims()[0];
        let sequences = logps.segments.len();
        let batch = if self.objective.uses_rejected() {
            sequences / 2
        } else {
            sequences
        };
        let mut segment = vec![0f32; sequences * n];
        let mut counts = Vec::with_capacity(sequences);
        for (s, range) in logps.segments.iter().enumerate() {
            for t in range.clone() {
                segment[s * n + t] = 1.0;
            }
            counts.push(range.len().max(1) as f32);
        }
        let segment = Tensor::<2>::from_data(TensorData::new(segment, [sequences, n]), &device);
        let sums = segment
            .matmul(logps.token_logp.clone().reshape([n, 1]))
            .reshape([sequences]);
        let counts = Tensor::<1>::from_data(TensorData::new(counts.clone(), [sequences]), &device);
        let averages = sums.clone().div(counts);

        let chosen_tokens: usize = logps.segments[..batch].iter().map(|r| r.len()).sum();
        let sft_loss = sums
            .clone()
            .slice(0..batch)
            .sum()
            .div_scalar(-(chosen_tokens.max(1) as f64));
        let logps_chosen = averages.clone().slice(0..batch);
        if !self.objective.uses_rejected() {
            return LossTerms {
                loss: sft_loss.clone(),
                sft_loss,
                pref_loss: None,
                logps_chosen,
                logps_rejected: None,
            };
        }
        let logps_rejected = averages.slice(batch..2 * batch);
        // −log σ(z) = softplus(−z), stable for large |z|.
        let z = (logps_chosen.clone() - logps_rejected.clone())
            .mul_scalar(self.beta)
            .sub_scalar(self.gamma);
        let pref_loss = softplus(z.neg(), 1.0).mean();
        let loss = if self.objective == Objective::Simpo {
            pref_loss.clone()
        } else {
            sft_loss.clone() + pref_loss.clone()
        };
        LossTerms {
            loss,
            sft_loss,
            pref_loss: Some(pref_loss),
            logps_chosen,
            logps_rejected: Some(logps_rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Two triples: chosen answers of 2 and 3 tokens, rejected of 1 and 2 tokens.
    const CHOSEN: [&[f64]; 2] = [&[-0.5, -1.5], &[-0.2, -0.4, -0.9]];
    const REJECTED: [&[f64]; 2] = [&[-0.7], &[-2.0, -1.0]];

    fn logps(device: &Device, with_rejected: bool, grad: bool) -> (AnswerLogps, Tensor<1>) {
        let mut values = Vec::new();
        let mut segments = Vec::new();
        let sides: Vec<&[&[f64]]> = if with_rejected {
            vec![&CHOSEN, &REJECTED]
        } else {
            vec![&CHOSEN]
        };
        for side in sides {
            for seq in side.iter() {
                let start = values.len();
                values.extend(seq.iter().map(|&v| v as f32));
                segments.push(start..values.len());
            }
        }
        let n = values.len();
        let t = Tensor::<1>::from_data(TensorData::new(values, [n]), device);
        let t = if grad { t.require_grad() } else { t };
        (
            AnswerLogps {
                token_logp: t.clone(),
                segments,
            },
            t,
        )
    }

    /// Loss and d loss / d token_logp from the formula, in f64.
    fn reference(objective: Objective, beta: f64, gamma: f64) -> (f64, Vec<f64>) {
        let avg = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        let chosen_tokens: usize = CHOSEN.iter().map(|s| s.len()).sum();
        let sft = -CHOSEN.iter().flat_map(|s| s.iter()).sum::<f64>() / chosen_tokens as f64;
        let mut pref = 0.0;
        let mut grad_c: Vec<Vec<f64>> = CHOSEN.iter().map(|s| vec![0.0; s.len()]).collect();
        let mut grad_r: Vec<Vec<f64>> = REJECTED.iter().map(|s| vec![0.0; s.len()]).collect();
        if objective != Objective::Simpo {
            for g in grad_c.iter_mut().flatten() {
                *g -= 1.0 / chosen_tokens as f64;
            }
        }
        if objective != Objective::Sft {
            for b in 0..2 {
                let z = beta * (avg(CHOSEN[b]) - avg(REJECTED[b])) - gamma;
                pref += (1.0 + (-z).exp()).ln() / 2.0;
                // d softplus(−z)/dz = −σ(−z); averaged over the 2 triples.
                let dz = -sigmoid(-z) / 2.0;
                for g in &mut grad_c[b] {
                    *g += dz * beta / CHOSEN[b].len() as f64;
                }
                for g in &mut grad_r[b] {
                    *g -= dz * beta / REJECTED[b].len() as f64;
                }
            }
        }
        let loss = match objective {
            Objective::Po => sft + pref,
            Objective::Sft => sft,
            Objective::Simpo => pref,
        };
        let mut grads: Vec<f64> = grad_c.into_iter().flatten().collect();
        if objective != Objective::Sft {
            grads.extend(grad_r.into_iter().flatten());
        }
        (loss, grads)
    }

    #[test]
    fn loss_and_gradient_match_the_formula() {
        let device = phantom_model::device::device(Some("flex"))
            .expect("the flex backend")
            .autodiff();
        for objective in [Objective::Po, Objective::Sft, Objective::Simpo] {
            let loss = PreferenceLoss {
                objective,
                beta: 2.0,
                gamma: 0.5,
            };
            let (input, leaf) = logps(&device, objective.uses_rejected(), true);
            let terms = loss.compute(&input);
            let value = terms.loss.clone().into_scalar::<f64>();
            let grads = terms.loss.backward();
            let grad: Vec<f32> = leaf
                .grad(&grads)
                .expect("gradient of the log-probabilities")
                .into_data()
                .try_into_vec()
                .expect("f32 gradient");
            let (want, want_grad) = reference(objective, 2.0, 0.5);
            assert!(
                (value - want).abs() < 1e-5,
                "{objective}: loss {value} vs {want}"
            );
            assert_eq!(grad.len(), want_grad.len());
            for (g, w) in grad.iter().zip(&want_grad) {
                assert!(
                    (f64::from(*g) - w).abs() < 1e-5,
                    "{objective}: {grad:?} vs {want_grad:?}"
                );
            }
        }
    }

    #[test]
    fn known_values() {
        // By hand: avg(y+) = [-1.0, -0.5], avg(y−) = [-0.7, -1.5], sft = 3.5 / 5 = 0.7,
        // z = 2·Δ − 0.5 = [-1.1, 1.5], pref = mean(ln(1 + e^{−z})).
        let device = phantom_model::device::device(Some("flex")).expect("the flex backend");
        let (input, _) = logps(&device, true, false);
        let terms = PreferenceLoss::default().compute(&input);
        let pref = ((1.0f64 + 1.1f64.exp()).ln() + (1.0f64 + (-1.5f64).exp()).ln()) / 2.0;
        let sft = terms.sft_loss.into_scalar::<f64>();
        let got = terms.loss.into_scalar::<f64>();
        assert!((sft - 0.7).abs() < 1e-6, "{sft}");
        assert!((got - (0.7 + pref)).abs() < 1e-5, "{got} vs {}", 0.7 + pref);
        let chosen: Vec<f32> = terms.logps_chosen.into_data().try_into_vec().expect("f32");
        assert_eq!(chosen, vec![-1.0, -0.5]);
    }
}
