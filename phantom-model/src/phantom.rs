//! The phantom dimension (the paper's first idea), in one place.
//!
//! Inside every decoder attention layer the query, key and value of each head are widened from
//! `d` to `2d` for the attention product only. The extra `d` features come from an
//! [`XAttention`] of each token's heads against the heads of the sequence's *phantom token*
//! (its first real token), scaled by η. After attention the two halves are folded back to `d`
//! by a learned gate. With η = 0 the layer is exactly plain attention.
//!
//! Shapes follow the official code: per-token head tensors are `[B, S, H, d]`, and the phantom
//! vectors of a batch are `[B, 1, H, d]`.

use burn::prelude::*;
use burn::tensor::activation::{sigmoid, softmax};

use crate::activation::gelu;
use crate::linear::{Linear, LinearConfig, linear as project};

/// Attention *across heads*: every head of every token attends over the heads of the phantom
/// token (not over the sequence). Four bias-free `d × d` projections, exact GELUs throughout.
#[derive(Module, Debug)]
pub struct XAttention {
    /// Query projection of the tokens' heads.
    pub linear_q: Linear,
    /// Key projection of the phantom token's heads.
    pub linear_k: Linear,
    /// Value projection of the phantom token's heads.
    pub linear_v: Linear,
    /// Output projection.
    pub linear_o: Linear,
}

impl XAttention {
    /// A fresh module for head width `d`.
    pub fn new(head_dim: usize, device: &Device) -> Self {
        let linear = || {
            LinearConfig::new(head_dim, head_dim)
                .with_bias(false)
                .init(device)
        };
        Self {
            linear_q: linear(),
            linear_k: linear(),
            linear_v: linear(),
            linear_o: linear(),
        }
    }

    /// `Y = gelu(softmax(gelu(a·Wq) · gelu(c·Wk)ᵀ / √d) · gelu(c·Wv) · Wo)`.
    ///
    /// `a`: `[B, S, H, d]`; `c`: `[B, 1, Hc, d]` (the phantom token's heads). Returns
    /// `[B, S, H, d]`.
    pub fn forward(&self, a: Tensor<4>, c: Tensor<4>) -> Tensor<4> {
        let [b, s, h, d] = a.dims();
        let hc = c.dims()[2];
        // The phantom token is shared by every position of a row, so the per-token products
        // are plain batched matmuls over the flattened (position, head) axis.
        let q = gelu(project(&self.linear_q, a)).reshape([b, s * h, d]);
        let k = gelu(project(&self.linear_k, c.clone())).reshape([b, hc, d]);
        let v = gelu(project(&self.linear_v, c)).reshape([b, hc, d]);
        let scores = q.matmul(k.swap_dims(1, 2)).div_scalar((d as f64).sqrt());
        let mixed = softmax(scores, 2).matmul(v).reshape([b, s, h, d]);
        gelu(project(&self.linear_o, mixed))
    }
}

/// The phantom vectors of a batch: the post-RoPE query, key and value heads of each row's
/// phantom token, taken once at prefill and reused by every decode step.
#[derive(Clone, Debug)]
pub struct PhantomVectors {
    /// `[B, 1, H, d]`.
    pub q: Tensor<4>,
    /// `[B, 1, H_kv, d]`.
    pub k: Tensor<4>,
    /// `[B, 1, H_kv, d]`.
    pub v: Tensor<4>,
}

impl PhantomVectors {
    /// Takes row `b`'s vectors at `positions[b]` from `[B, T, heads, d]` tensors.
    pub fn take(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, positions: &[usize]) -> Self {
        let pick = |x: &Tensor<4>| {
            let [b, _, h, d] = x.dims();
            let index: Vec<i64> = positions
                .iter()
                .flat_map(|&p| std::iter::repeat_n(p as i64, h * d))
                .collect();
            let index =
                Tensor::<4, Int>::from_data(TensorData::new(index, [b, 1, h, d]), &x.device());
            x.clone().gather(1, index)
        };
        Self {
            q: pick(q),
            k: pick(k),
            v: pick(v),
        }
    }

    /// The rows of several batches, in order.
    pub fn cat(parts: Vec<PhantomVectors>) -> Self {
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for part in parts {
            q.push(part.q);
            k.push(part.k);
            v.push(part.v);
        }
        Self {
            q: Tensor::cat(q, 0),
            k: Tensor::cat(k, 0),
            v: Tensor::cat(v, 0),
        }
    }

    /// Keeps only the given rows (beam reordering, finished rows dropped).
    pub fn select_rows(&self, rows: Tensor<1, Int>) -> Self {
        Self {
            q: self.q.clone().select(0, rows.clone()),
            k: self.k.clone().select(0, rows.clone()),
            v: self.v.clone().select(0, rows),
        }
    }
}

/// The phantom modules of one attention layer (checkpoint names of the official code).
#[derive(Module, Debug)]
pub struct PhantomDimension {
    /// Widens the queries.
    pub xattn_query_phantom: XAttention,
    /// Widens the keys.
    pub xattn_key_phantom: XAttention,
    /// Widens the values.
    pub xattn_value_phantom: XAttention,
    /// Gate logit of the plain half.
    pub gating_phantom_1: Linear,
    /// Gate logit of the phantom half.
    pub gating_phantom_2: Linear,
    /// Weight η of the phantom branch (1e-4 in the released code).
    pub eta: f64,
}

impl PhantomDimension {
    /// Fresh phantom modules for head width `d`.
    pub fn new(head_dim: usize, eta: f64, device: &Device) -> Self {
        let gate = || LinearConfig::new(head_dim, 1).init(device);
        Self {
            xattn_query_phantom: XAttention::new(head_dim, device),
            xattn_key_phantom: XAttention::new(head_dim, device),
            xattn_value_phantom: XAttention::new(head_dim, device),
            gating_phantom_1: gate(),
            gating_phantom_2: gate(),
            eta,
        }
    }

    /// Every linear layer of the phantom modules, the gates included.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut all = vec![&mut self.gating_phantom_1, &mut self.gating_phantom_2];
        for x in [
            &mut self.xattn_query_phantom,
            &mut self.xattn_key_phantom,
            &mut self.xattn_value_phantom,
        ] {
            all.extend([
                &mut x.linear_q,
                &mut x.linear_k,
                &mut x.linear_v,
                &mut x.linear_o,
            ]);
        }
        all
    }

    /// `q' = [q ‖ η·Xq(q, q̂)]`, `[B, T, H, d] → [B, T, H, 2d]`.
    pub fn widen_query(&self, q: Tensor<4>, phantom: &PhantomVectors) -> Tensor<4> {
        let extra = self
            .xattn_query_phantom
            .forward(q.clone(), phantom.q.clone());
        Tensor::cat(vec![q, extra.mul_scalar(self.eta)], 3)
    }

    /// `k' = [k ‖ η·Xk(k, k̂)]`.
    pub fn widen_key(&self, k: Tensor<4>, phantom: &PhantomVectors) -> Tensor<4> {
        let extra = self.xattn_key_phantom.forward(k.clone(), phantom.k.clone());
        Tensor::cat(vec![k, extra.mul_scalar(self.eta)], 3)
    }

    /// `v' = [v ‖ v + η·Xv(v, v̂)]`: the value branch keeps a residual.
    pub fn widen_value(&self, v: Tensor<4>, phantom: &PhantomVectors) -> Tensor<4> {
        let extra = self
            .xattn_value_phantom
            .forward(v.clone(), phantom.v.clone());
        let second = v.clone() + extra.mul_scalar(self.eta);
        Tensor::cat(vec![v, second], 3)
    }

    /// Folds the `2d`-wide attention output back to `d`: `w·o1 + (1−w)·o2` with
    /// `w = e^g1 / (e^g1 + e^g2) = sigmoid(g1 − g2)`, computed the overflow-free way.
    pub fn fold(&self, o: Tensor<4>) -> Tensor<4> {
        let d = o.dims()[3] / 2;
        let o1 = o.clone().narrow(3, 0, d);
        let o2 = o.narrow(3, d, d);
        let (g1, g2) = self.gate_logits(o1.clone(), o2.clone());
        let w = sigmoid(g1 - g2);
        o2.clone() + w * (o1 - o2)
    }

    /// The raw gate logits `(g1, g2)` of both halves, each `[…, 1]`.
    pub fn gate_logits(&self, o1: Tensor<4>, o2: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        (
            self.gating_phantom_1.forward(o1),
            self.gating_phantom_2.forward(o2),
        )
    }
}
