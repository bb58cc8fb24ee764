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
pub mod cuda;

use crate::error::{Error, Result};
use crate::io::config::{Activation, Alibi, RopeFrequencies};
use crate::io::safetensors::{DType, TensorRef};

/// One sequence's share of a batched decoder step: its new rows are contiguous in the step's activations, in
/// the order of [`StepLayout::seqs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqStep {
    /// Rows this step (a prompt chunk, or one decode token).
    pub q_rows: usize,
    /// Positions cached once this step's rows are written: they sit at `kv_len - q_rows .. kv_len`.
    pub kv_len: usize,
    /// Physical KV-cache blocks holding positions `0 .. kv_len`, in order.
    pub block_table: Vec<u32>,
    /// Per row: the media-cache image slot the row attends to in cross-attention, -1 for none.
    pub image_of_row: Vec<i32>,
    /// The first position of a generated token (the prompt's length): where a backend has two attention paths,
    /// rows before it take the prefill path and rows from it the decode path, whatever chunk they come in, so a
    /// position's K/V are the same bits however the step was scheduled (chunked, preempted and recomputed, or
    /// after a prefix-cache hit). A step of decodes only has it at most `kv_len - 1`.
    pub decode_from: usize,
}

/// The host-side description of one decoder step over a batch of sequences and the paged KV cache. Each backend
/// turns it into its own [`Backend::Layout`] once per step (a device upload on GPUs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepLayout {
    /// Positions per KV-cache block.
    pub block_size: usize,
    pub seqs: Vec<SeqStep>,
}

impl StepLayout {
    pub fn rows(&self) -> usize {
        self.seqs.iter().map(|s| s.q_rows).sum()
    }

    /// `(sequence, position)` of every row, in row order.
    pub fn row_positions(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.seqs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (s.kv_len - s.q_rows..s.kv_len).map(move |p| (i, p)))
    }

    /// Row of the KV pools that holds position `pos` of sequence `seq`.
    pub fn slot(&self, seq: usize, pos: usize) -> usize {
        let bs = self.block_size;
        self.seqs[seq].block_table[pos / bs] as usize * bs + pos % bs
    }

    /// Checks that every sequence's block table covers its positions and its image rows match its rows.
    pub fn validate(&self) -> Result<()> {
        for (i, s) in self.seqs.iter().enumerate() {
            if s.q_rows > s.kv_len {
                return Err(Error::Invalid(format!(
                    "sequence {i}: {} rows but kv_len {}",
                    s.q_rows, s.kv_len
                )));
            }
            if s.block_table.len() * self.block_size < s.kv_len {
                return Err(Error::Invalid(format!(
                    "sequence {i}: {} blocks of {} cannot hold {} positions",
                    s.block_table.len(),
                    self.block_size,
                    s.kv_len
                )));
            }
            if s.image_of_row.len() != s.q_rows {
                return Err(Error::Invalid(format!(
                    "sequence {i}: {} image entries for {} rows",
                    s.image_of_row.len(),
                    s.q_rows
                )));
            }
        }
        Ok(())
    }
}

/// The fixed geometry of a recorded decode step: whatever its sequences' own lengths, the step is laid out with
/// block tables of `table_width` entries and attention split for `max_kv` positions, so that every step of the
/// same batch size launches exactly the same work (a CUDA graph replays it with new data).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeShape {
    pub table_width: usize,
    pub max_kv: usize,
}

/// How one row of logits becomes a token, on any backend (the exact rule is in `kernels/sampling.cu`, and
/// `cpu::sampling` is its reference): `banned` ids are set to -inf; each `seen` id gets the repetition penalty
/// (HF's rule); each `(id, offset)` of `logit_offsets` is added (OpenAI's `logit_bias`, `presence_penalty` and
/// `frequency_penalty`, combined per id by the caller); then greedy argmax when `temperature` is 0, else softmax
/// at `temperature`, the top-k and top-p cuts (ties at the cut kept), and the token where the kept cumulative mass
/// in index order first exceeds `uniform` times the total. With `logprobs`, the row's log-softmax after the ban,
/// the penalty and the offsets (before temperature and cuts: the distribution OpenAI's `logprobs` report) gives
/// the chosen token's log-probability and the `logprobs` most likely tokens'.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling<'a> {
    pub temperature: f32,
    /// 0: no top-k cut.
    pub top_k: usize,
    /// 1: no nucleus cut.
    pub top_p: f32,
    /// 1: none.
    pub repetition_penalty: f32,
    /// Ids never produced.
    pub banned: &'a [u32],
    /// Distinct ids seen so far (read only when `repetition_penalty` is not 1).
    pub seen: &'a [u32],
    /// Additive offsets by id, ids distinct (read by every backend in list order).
    pub logit_offsets: &'a [(u32, f32)],
    /// The request's next draw in `[0, 1)` from its own seeded generator (ignored when greedy).
    pub uniform: f32,
    /// `Some(n)`: report the chosen token's log-probability and the `n` most likely tokens'.
    pub logprobs: Option<usize>,
}

/// A row's next token, with its log-probabilities when its rule asked for them.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// A token's log-probability under a row's distribution, and the most likely tokens of that row (highest first,
/// lower id first among equals; tokens of probability 0 left out).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The error of a row of logits with no token left to sample.
pub(crate) fn nothing_to_sample(row: usize) -> Error {
    Error::Invalid(format!(
        "row {row} of the logits has nothing to sample: every logit is -inf or NaN after the banned ids"
    ))
}

/// What the hardware under a backend reaches at best, measured (not datasheet numbers): the ceilings that
/// roofline floors are computed from.
#[derive(Clone, Debug, PartialEq)]
pub struct Ceilings {
    /// Bytes per second of a large copy, counting bytes read plus bytes written.
    pub copy_bytes_per_s: f64,
    /// FLOP/s (2 per multiply-add) of a large matrix product in the dtype the backend computes in.
    pub matmul_flops_per_s: f64,
    /// How both were measured (sizes, dtype, threads), for reports.
    pub method: String,
}

pub trait Backend: Send + Sync {
    /// An activation tensor (2-D, f32 semantics).
    type Tensor: Send + Sync;
    /// A parameter, kept in its stored dtype.
    type Weight: Send + Sync;
    /// A [`StepLayout`] in the form the backend's kernels read it.
    type Layout: Send + Sync;
    /// A point on the backend's own clock, in the order of its queued work ([`Backend::timestamp`]).
    type Timestamp: Send;

    // ---- the device ----
    /// A short description of the device, for reports.
    fn device_name(&self) -> String;
    /// Waits until every op queued so far has finished, so a host clock can time them (the CPU backend's ops have
    /// finished when they return).
    fn synchronize(&self);
    /// When every op queued so far has finished, on the device's clock, taken without waiting for them: a GPU
    /// records an event on its stream; the CPU backend, whose ops have finished when they return, reads the host
    /// clock. Profiling stamps each op this way and reads the times after one synchronise per step.
    fn timestamp(&self) -> Self::Timestamp;
    /// Microseconds from `from` to `to` (both taken by this backend; waits until both are reached).
    fn elapsed_us(&self, from: &Self::Timestamp, to: &Self::Timestamp) -> f64;
    /// Bytes this backend can still allocate for weights: free device memory, or the memory available on the host.
    fn free_memory(&self) -> Result<usize>;
    /// Measures the copy bandwidth and matrix throughput of the hardware now (takes about a second).
    fn measure_ceilings(&self) -> Ceilings;
    /// Bytes per element of a weight stored as `stored`, as this backend holds it (and reads it in every op).
    fn weight_width(&self, stored: DType) -> usize;
    /// Bytes per element of activations and the KV cache.
    fn activation_width(&self) -> usize;

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
    /// Overwrites rows `row .. row + src.rows` of `dst`.
    fn write_rows(&self, dst: &mut Self::Tensor, row: usize, src: &Self::Tensor);
    /// Rows `rows[0], rows[1], ..` of `t`, in that order.
    fn gather_rows(&self, t: &Self::Tensor, rows: &[usize]) -> Self::Tensor;
    /// Prepares one decoder step's layout (called once per step, shared by every layer).
    fn layout(&self, step: &StepLayout) -> Self::Layout;
    /// Writes the step's new K (or V) rows `[rows, width]` into the paged pool `[blocks * block_size, width]`,
    /// each at the slot of its sequence and position.
    fn write_kv(&self, pool: &mut Self::Tensor, layout: &Self::Layout, rows: &Self::Tensor);

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
    /// `act(x @ w^T + bias)` (an MLP's first projection): a backend that can applies the activation as the
    /// product's results are stored, with the bits of `linear` then `activate`.
    fn linear_activate(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        act: Activation,
    ) -> Self::Tensor {
        let mut y = self.linear(x, w, bias);
        self.activate(&mut y, act);
        y
    }
    /// `acc += x @ w^T + bias` (a residual branch's last projection): a backend that can adds the product's
    /// results to `acc` as they are stored, with the bits of `linear` then `add_assign`.
    fn linear_add(
        &self,
        acc: &mut Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) {
        let y = self.linear(x, w, bias);
        self.add_assign(acc, &y);
    }
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
    /// Rotary embedding (rotate-half layout) of every head of a step's queries `q` and keys `k` (in one pass: the
    /// angles are shared), each row at its position in the layout; `k` may have fewer heads than `q` (GQA).
    /// `freqs` gives each pair's inverse frequency (theta, and llama3 scaling where the model has it) and how many
    /// of each head's dims rotate (GPT-NeoX's partial rotary: the rest pass through unchanged).
    fn rope(
        &self,
        q: &mut Self::Tensor,
        k: &mut Self::Tensor,
        head_dim: usize,
        layout: &Self::Layout,
        freqs: &RopeFrequencies,
    );

    // ---- attention ----
    /// Full (non-causal) softmax attention of `q` `[Tq, H*d]` over all rows of `k`, `v`, scale `d^-1/2`
    /// (vision encoder).
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
    ) -> Self::Tensor;
    /// Causal self-attention of a decoder step: each row of `q` attends to positions `0 ..=` its own of its
    /// sequence, read from the paged pools `k_pool`, `v_pool` through the layout's block tables; with `alibi`
    /// (MPT), each score gains its head's slope times the key's position minus the query's.
    fn paged_attention(
        &self,
        q: &Self::Tensor,
        k_pool: &Self::Tensor,
        v_pool: &Self::Tensor,
        heads: usize,
        layout: &Self::Layout,
        alibi: Option<&Alibi>,
    ) -> Self::Tensor;
    /// IDEFICS cross-attention: each row attends to the `per_image` key rows of its image slot `j` in the layout
    /// (rows `j*per_image ..` of the media pools); rows with slot -1 produce zeros (the cross-attention gate).
    fn cross_attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        layout: &Self::Layout,
        per_image: usize,
    ) -> Self::Tensor;
    // ---- recorded decode steps ----
    /// One engine's recorded decode steps, one per batch size (CUDA graphs). They refer to the engine's KV and
    /// media pools, so they live and die with the engine.
    type StepGraphs: Send;
    /// An empty set of recorded steps, or `None` where this backend replays nothing (or cannot record a decoder
    /// with heads of `head_dim`): then the engine runs every step eagerly.
    fn new_step_graphs(&self, head_dim: usize) -> Option<Self::StepGraphs>;
    /// Runs a decode step, every sequence one row, laid out in `shape`: the first step of its batch size is
    /// recorded from `run` (which must launch the same work for any step of that size and shape, and read the
    /// step's tokens only through `ids` and the layout), later ones replay the recording with their own `ids`
    /// and layout. Returns the first `rows` rows of what `run` returns (the real rows of a padded step, e.g. their
    /// logits), bit for bit what an eager run gives.
    fn run_recorded(
        &self,
        graphs: &mut Self::StepGraphs,
        ids: &[u32],
        step: &StepLayout,
        shape: DecodeShape,
        rows: usize,
        run: &mut dyn FnMut(&Self::Layout) -> Result<Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// The next token of each row of `logits` `[rows.len(), vocab]` by that row's rule; an error names a row
    /// with nothing left to sample (every logit -inf or NaN). Only the ids leave the device, and the rows whose
    /// rule asks for log-probabilities.
    fn sample(&self, logits: &Self::Tensor, rows: &[RowSampling]) -> Result<Vec<Sampled>>;

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
