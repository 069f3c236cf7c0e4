//! The activations between the products, by the CPU kernels on flex
//! ([`crate::kernels::pointwise`]: one pass, vectorised) and by Burn's ops elsewhere (and for
//! autodiff tensors, whose operations must be recorded).

use burn::prelude::*;
use burn::tensor::activation;

/// `silu(gate) ⊙ up`, the SwiGLU of the decoder's MLP.
pub fn silu_mul<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "cpu-kernels")]
    if let Some(y) = crate::kernels::pointwise::silu_mul(&gate, &up) {
        return y;
    }
    activation::silu(gate) * up
}

/// The exact (erf) GELU, `x · Φ(x)`.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "cpu-kernels")]
    if let Some(y) = crate::kernels::pointwise::gelu(&x) {
        return y;
    }
    activation::gelu(x)
}
