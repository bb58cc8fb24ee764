//! The paged self-attention KV cache. Every decoder layer has one K pool and one V pool `[blocks * block_size,
//! hidden]`, allocated once; a sequence owns a list of blocks (its block table, handed out by
//! [`BlockPool`](crate::cache::pool::BlockPool)) that grows as it does, so memory is committed per `block_size`
//! positions instead of per maximum context, and freed the moment a sequence ends. One more block past the pool's
//! takes the writes of padding rows (see [`BlockPool::padding_block`](crate::cache::pool::BlockPool::padding_block)).

use crate::backend::Backend;

pub struct PagedKvCache<B: Backend> {
    k: Vec<B::Tensor>,
    v: Vec<B::Tensor>,
}

impl<B: Backend> PagedKvCache<B> {
    /// `layers` pairs of pools of `num_blocks` blocks of `block_size` rows of `width`, plus the padding block.
    pub fn new(b: &B, layers: usize, num_blocks: usize, block_size: usize, width: usize) -> Self {
        let pool = || b.zeros((num_blocks + 1) * block_size, width);
        PagedKvCache {
            k: (0..layers).map(|_| pool()).collect(),
            v: (0..layers).map(|_| pool()).collect(),
        }
    }

    /// The K and V pools of decoder layer `i`.
    pub fn layer_mut(&mut self, i: usize) -> (&mut B::Tensor, &mut B::Tensor) {
        (&mut self.k[i], &mut self.v[i])
    }
}
