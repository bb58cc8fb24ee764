//! Host-only bookkeeping of the caches' units: which KV blocks and media-cache slots are free. The scheduler owns
//! these; the caches themselves (`kv_cache`, `media_cache`) are only device storage addressed by block and slot.

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

    /// Returns every unit of `units` to the pool and empties it.
    pub fn release(&mut self, units: &mut Vec<u32>) {
        self.free.append(units);
        debug_assert!(self.free.len() <= self.total, "a unit was released twice");
    }
}

/// The KV pool's blocks of `block_size` positions, as block tables take them.
#[derive(Debug)]
pub struct BlockPool {
    blocks: SlotPool,
    block_size: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        BlockPool {
            blocks: SlotPool::new(num_blocks),
            block_size,
        }
    }

    /// The block past the pool's, never given to a sequence: where the padding rows of a recorded decode step (one
    /// padded to its batch size) write their K/V. The KV cache holds it (see `PagedKvCache::new`).
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
        self.blocks.release(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_all_or_nothing_and_release_gives_units_back() {
        let mut pool = SlotPool::new(3);
        let mut two = pool.allocate(2).unwrap();
        assert_eq!(two, vec![1, 0]);
        assert!(pool.allocate(2).is_none(), "only one unit is free");
        assert_eq!(pool.available(), 1);
        pool.release(&mut two);
        assert!(two.is_empty());
        assert_eq!(pool.available(), 3);
    }

    #[test]
    fn tables_grow_by_whole_blocks_and_keep_what_they_have_when_dry() {
        let mut pool = BlockPool::new(3, 4);
        let mut table = Vec::new();
        assert!(pool.grow(&mut table, 5));
        assert_eq!(table.len(), 2);
        assert!(
            pool.grow(&mut table, 8),
            "8 positions fit in the 2 blocks held"
        );
        assert_eq!(pool.free_blocks(), 1);
        assert!(
            !pool.grow(&mut table, 13),
            "13 positions need 4 blocks, 3 exist"
        );
        assert_eq!(table.len(), 2);
        assert_eq!(pool.padding_block(), 3);
        pool.release(&mut table);
        assert_eq!(pool.free_blocks(), 3);
    }
}
