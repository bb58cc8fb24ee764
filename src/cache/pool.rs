//! Host-only bookkeeping of the caches' units: which KV blocks and media-cache slots are free. The scheduler owns
//! these; the caches themselves (`kv_cache`, `media_cache`) are only device storage addressed by block and slot.

/// A free list of fixed-size units (KV blocks, media-cache image slots), reference-counted so that sequences forked
/// from one prefix share its units: O(1) per unit allocated, shared or released.
#[derive(Debug)]
pub struct SlotPool {
    free: Vec<u32>,
    /// Holders of each unit (0: free).
    refs: Vec<u32>,
}

impl SlotPool {
    pub fn new(total: usize) -> Self {
        // Reversed so that allocation hands out low ids first (easier to read in traces).
        SlotPool {
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// `n` units, each with one holder, or `None` (and nothing taken) when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        let start = self.free.len().checked_sub(n)?;
        let units = self.free.split_off(start);
        units.iter().for_each(|&u| self.refs[u as usize] = 1);
        Some(units)
    }

    /// One more holder of each of `units` (all held already).
    pub fn share(&mut self, units: &[u32]) {
        for &u in units {
            debug_assert!(self.refs[u as usize] > 0, "unit {u} is shared while free");
            self.refs[u as usize] += 1;
        }
    }

    /// Gives up one hold of every unit of `units` and empties it; a unit nobody holds any more is free again.
    pub fn release(&mut self, units: &mut Vec<u32>) {
        for u in units.drain(..) {
            let refs = &mut self.refs[u as usize];
            debug_assert!(*refs > 0, "unit {u} was released twice");
            *refs -= 1;
            if *refs == 0 {
                self.free.push(u);
            }
        }
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

    /// Gives up the hold of every block of `table` (a block no other table shares is free again) and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.blocks.release(table);
    }

    /// One more holder of each block of `table` (a forked sequence sharing them).
    pub fn share(&mut self, table: &[u32]) {
        self.blocks.share(table);
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
    fn a_shared_unit_is_free_only_when_its_last_holder_releases_it() {
        let mut pool = SlotPool::new(2);
        let mut a = pool.allocate(1).unwrap();
        let mut b = a.clone();
        pool.share(&b);
        pool.release(&mut a);
        assert_eq!(pool.available(), 1, "b still holds it");
        pool.release(&mut b);
        assert_eq!(pool.available(), 2);
        assert_eq!(pool.allocate(2).unwrap().len(), 2);
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
