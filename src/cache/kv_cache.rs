//! The paged self-attention KV cache. Every decoder layer has one K pool and one V pool `[blocks * block_size,
//! hidden]`, allocated once; a sequence owns a list of blocks (its block table) that grows as it does, so memory
//! is committed per `block_size` positions instead of per maximum context, and freed the moment a sequence ends.
//! One more block past the pool's takes the writes of padding rows (see [`PagedKvCache::padding_block`]).

use crate::backend::Backend;

/// A free list of fixed-size units (KV blocks, media-cache image slots): O(1) per unit allocated or released.
#[derive(Debug)]
pub struct SlotPool {
    free: Vec<u32>,
    total: usize,
}

impl SlotPool {
    pub fn new(total: usize) -> Self {
        // Reversed so that allocation hands out low ids first (easier to read in traces).
        SlotPool {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// `n` units, or `None` (and nothing taken) when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        let start = self.free.len().checked_sub(n)?;
        Some(self.free.split_off(start))
    }

    pub fn release(&mut self, units: impl IntoIterator<Item = u32>) {
        self.free.extend(units);
        debug_assert!(self.free.len() <= self.total, "a unit was released twice");
    }
}

pub struct PagedKvCache<B: Backend> {
    k: Vec<B::Tensor>,
    v: Vec<B::Tensor>,
    block_size: usize,
    blocks: SlotPool,
}

impl<B: Backend> PagedKvCache<B> {
    /// `layers` pairs of pools of `num_blocks` blocks of `block_size` rows of `width`, plus the padding block.
    pub fn new(b: &B, layers: usize, num_blocks: usize, block_size: usize, width: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let pool = || b.zeros((num_blocks + 1) * block_size, width);
        PagedKvCache {
            k: (0..layers).map(|_| pool()).collect(),
            v: (0..layers).map(|_| pool()).collect(),
            block_size,
            blocks: SlotPool::new(num_blocks),
        }
    }

    /// A block past the pool's, never given to a sequence: where the padding rows of a recorded decode step (one
    /// padded to its batch size) write their K/V.
    pub fn padding_block(&self) -> u32 {
        self.blocks.total() as u32
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.total()
    }

    pub fn free_blocks(&self) -> usize {
        self.blocks.available()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Extends `table` to hold `positions` positions; false (and `table` unchanged) when the pool runs dry.
    pub fn grow(&mut self, table: &mut Vec<u32>, positions: usize) -> bool {
        let missing = self.blocks_for(positions).saturating_sub(table.len());
        match self.blocks.allocate(missing) {
            Some(new) => {
                table.extend(new);
                true
            }
            None => false,
        }
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.blocks.release(table.drain(..));
    }

    /// The K and V pools of decoder layer `i`.
    pub fn layer_mut(&mut self, i: usize) -> (&mut B::Tensor, &mut B::Tensor) {
        (&mut self.k[i], &mut self.v[i])
    }
}
