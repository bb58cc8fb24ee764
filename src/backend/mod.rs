//! The interface the model computes through. The model speaks in ops (linear, norms, RoPE, attention, gated
//! cross-attention, resampler attention, activations, embedding); each backend implements them for its own tensor
//! and weight types. The CPU backend is the oracle every other backend is tested against.
//!
//! Conventions shared by every backend:
//! - activations are 2-D, row-major `[rows, cols]`; per-head tensors are `[tokens, heads * head_dim]`, head `h` in
//!   columns `h*d .. (h+1)*d`;
//! - weights keep the checkpoint's layout and storage dtype; a Linear weight is `[out, in]` and `linear` computes
//!   `x @ W^T (+ b)`; a weight with more than two dims is viewed as `[shape[0], product(rest)]`;
//! - accumulation, norms and softmax are computed in f32 at least.

pub mod cpu;

use crate::error::Result;
use crate::io::config::Activation;
use crate::io::safetensors::TensorRef;

/// Which keys each query may see in `attention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    /// Every query sees every key (vision encoder).
    None,
    /// Query `i` of `q_rows` is at position `kv_len - q_rows + i` and sees keys `0..=` that position.
    Causal,
}

pub trait Backend: Send + Sync {
    /// An activation tensor (2-D, f32 semantics).
    type Tensor: Send + Sync;
    /// A parameter, kept in its stored dtype.
    type Weight: Send + Sync;

    // ---- data movement ----
    fn load_weight(&self, t: &TensorRef) -> Result<Self::Weight>;
    fn from_host(&self, data: Vec<f32>, rows: usize, cols: usize) -> Self::Tensor;
    fn to_host(&self, t: &Self::Tensor) -> Vec<f32>;
    fn dims(&self, t: &Self::Tensor) -> (usize, usize);
    /// A weight widened into an activation, `[shape[0], product(rest)]` (or `[1, n]` for a vector).
    fn weight_to_tensor(&self, w: &Self::Weight) -> Self::Tensor;
    fn zeros(&self, rows: usize, cols: usize) -> Self::Tensor;
    /// Rows `start .. start + len`.
    fn slice_rows(&self, t: &Self::Tensor, start: usize, len: usize) -> Self::Tensor;
    /// `[a ; b]` along rows.
    fn concat_rows(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// `[a , b]` along columns.
    fn concat_cols(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// Overwrites rows `row .. row + src.rows` of `dst` (KV-cache append).
    fn write_rows(&self, dst: &mut Self::Tensor, row: usize, src: &Self::Tensor);

    // ---- arithmetic ----
    /// Rows of the decoupled embedding: ids below `table`'s rows read `table`, the rest read `extra`.
    fn embedding(
        &self,
        ids: &[u32],
        table: &Self::Weight,
        extra: Option<&Self::Weight>,
    ) -> Result<Self::Tensor>;
    /// `x @ w^T + bias`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Self::Tensor;
    /// `acc += x`.
    fn add_assign(&self, acc: &mut Self::Tensor, x: &Self::Tensor);
    /// `acc += tanh(alpha) * x`, alpha a scalar or one value per column.
    fn add_gated(&self, acc: &mut Self::Tensor, x: &Self::Tensor, alpha: &Self::Weight);
    /// LayerNorm over each row's `w.len()`-wide groups (a `[T, H*d]` tensor with a `[d]` weight normalises per head).
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        b: &Self::Weight,
        eps: f32,
    ) -> Self::Tensor;
    /// RMSNorm over `w.len()`-wide groups: `w * x / sqrt(mean(x^2) + eps)`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Self::Tensor;
    fn activate(&self, x: &mut Self::Tensor, act: Activation);
    /// `silu(gate) * up`.
    fn swiglu(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Self::Tensor;
    /// Rotary embedding (rotate-half layout) of every head of `x`, row `i` at `positions[i]`.
    fn rope(&self, x: &mut Self::Tensor, head_dim: usize, positions: &[usize], theta: f64);

    // ---- attention ----
    /// Softmax attention of `q` `[Tq, H*d]` over the first `kv_len` rows of `k`, `v`, scale `d^-1/2`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        kv_len: usize,
        causality: Causality,
    ) -> Self::Tensor;
    /// IDEFICS cross-attention: query row `t` attends to the `per_image` key rows of image `image_of_row[t]`
    /// (rows `j*per_image ..`); rows with image -1 produce zeros (the cross-attention gate).
    fn cross_attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        image_of_row: &[i32],
        per_image: usize,
    ) -> Self::Tensor;
    /// Perceiver attention: latent queries over the keys `[k_ctx ; k_lat]` and values `[v_ctx ; v_lat]`, no mask,
    /// without materialising the concatenation.
    fn resampler_attention(
        &self,
        q: &Self::Tensor,
        k_ctx: &Self::Tensor,
        v_ctx: &Self::Tensor,
        k_lat: &Self::Tensor,
        v_lat: &Self::Tensor,
        heads: usize,
    ) -> Self::Tensor;
}
