//! Host-only bookkeeping of the caches' units: which KV blocks and media-cache slots are free, who holds each, and
//! what content each holds. The scheduler owns these; the caches themselves (`kv_cache`, `media_cache`) are only
//! device storage addressed by block and slot.

use std::collections::{BTreeMap, HashMap};

use crate::cache::content::ContentKey;

/// Fixed-size units (KV blocks, media-cache image slots), reference-counted so that sequences share units, and
/// content-addressed so that a unit whose content is named by a [`ContentKey`] keeps it after its last holder
/// leaves: an idle unit is found again by its key until the pool needs it for something else, and then the one
/// idle the longest is taken (least recently used). A unit somebody holds is never handed out.
#[derive(Debug)]
pub struct SlotPool {
    /// Free units with no content worth keeping.
    empty: Vec<u32>,
    /// Holders of each unit (0: free).
    refs: Vec<u32>,
    /// The content each unit holds, where it is named.
    key_of: Vec<Option<ContentKey>>,
    by_key: HashMap<ContentKey, u32>,
    /// Free units with named content, by when they became free (the oldest is taken first).
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    clock: u64,
    evictions: usize,
}

impl SlotPool {
    pub fn new(total: usize) -> Self {
        // Reversed so that allocation hands out low ids first (easier to read in traces).
        SlotPool {
            empty: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            key_of: vec![None; total],
            by_key: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: vec![0; total],
            clock: 0,
            evictions: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Units nobody holds (empty or idle with content).
    pub fn available(&self) -> usize {
        self.empty.len() + self.idle.len()
    }

    /// Units holding named content, held or idle.
    pub fn named(&self) -> usize {
        self.by_key.len()
    }

    /// Idle units whose content was dropped to make room.
    pub fn evictions(&self) -> usize {
        self.evictions
    }

    /// `n` units, each with one holder, or `None` (and nothing taken) when fewer are free: empty units first, then
    /// the units idle the longest, whose content is forgotten.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.available() < n {
            return None;
        }
        let from_empty = n.min(self.empty.len());
        let mut units = self.empty.split_off(self.empty.len() - from_empty);
        while units.len() < n {
            let (_, u) = self.idle.pop_first().expect("counted as available");
            let key = self.key_of[u as usize].take().expect("idle units are named");
            self.by_key.remove(&key);
            self.evictions += 1;
            units.push(u);
        }
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

    /// The unit holding `key`, with one more holder (taken back from the idle units if nobody held it), or `None`.
    pub fn lookup(&mut self, key: &ContentKey) -> Option<u32> {
        let u = *self.by_key.get(key)?;
        if self.refs[u as usize] == 0 {
            self.idle.remove(&self.idle_since[u as usize]);
        }
        self.refs[u as usize] += 1;
        Some(u)
    }

    /// Names the content of the held `unit`; false (and the unit left unnamed) where another unit holds it already.
    pub fn name(&mut self, unit: u32, key: ContentKey) -> bool {
        debug_assert!(self.refs[unit as usize] > 0, "unit {unit} is named while free");
        if self.by_key.contains_key(&key) || self.key_of[unit as usize].is_some() {
            return false;
        }
        self.by_key.insert(key, unit);
        self.key_of[unit as usize] = Some(key);
        true
    }

    /// Gives up one hold of every unit of `units` and empties it, last unit first (so a sequence's last blocks are
    /// the first of its blocks to be taken); a unit nobody holds any more is free again, idle where it is named.
    pub fn release(&mut self, units: &mut Vec<u32>) {
        for u in units.drain(..).rev() {
            let refs = &mut self.refs[u as usize];
            debug_assert!(*refs > 0, "unit {u} was released twice");
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            if self.key_of[u as usize].is_some() {
                self.clock += 1;
                self.idle_since[u as usize] = self.clock;
                self.idle.insert(self.clock, u);
            } else {
                self.empty.push(u);
            }
        }
    }
}

/// The KV pool's blocks of `block_size` positions, as block tables take them. A full block of prompt rows can be
/// named by its [`block_key`](crate::cache::content::block_key) (prefix caching); its token ids are kept beside it,
/// so that a key found is confirmed against the tokens before the block is reused.
#[derive(Debug)]
pub struct BlockPool {
    blocks: SlotPool,
    block_size: usize,
    /// The token ids of each named block.
    tokens: Vec<Vec<u32>>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        BlockPool {
            blocks: SlotPool::new(num_blocks),
            block_size,
            tokens: vec![Vec::new(); num_blocks],
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

    /// Blocks nobody holds (including idle named ones, which are taken when no empty block is left).
    pub fn free_blocks(&self) -> usize {
        self.blocks.available()
    }

    /// Blocks whose content is named (held or idle).
    pub fn cached_blocks(&self) -> usize {
        self.blocks.named()
    }

    /// Idle named blocks whose content was dropped to make room.
    pub fn evictions(&self) -> usize {
        self.blocks.evictions()
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

    /// The block named `key` holding `tokens`, with one more holder, or `None`.
    pub fn lookup(&mut self, key: &ContentKey, tokens: &[u32]) -> Option<u32> {
        let block = self.blocks.lookup(key)?;
        if self.tokens[block as usize] == tokens {
            return Some(block);
        }
        self.blocks.release(&mut vec![block]);
        None
    }

    /// Names the held, full `block`, which holds `tokens` (false where another block has that content already).
    pub fn name(&mut self, block: u32, key: ContentKey, tokens: &[u32]) -> bool {
        debug_assert_eq!(tokens.len(), self.block_size, "only full blocks are named");
        let named = self.blocks.name(block, key);
        if named {
            self.tokens[block as usize] = tokens.to_vec();
        }
        named
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

    #[test]
    fn named_units_stay_findable_while_idle_and_the_oldest_idle_is_taken_first() {
        let mut pool = SlotPool::new(3);
        let (ka, kb) = ([1u8; 32], [2u8; 32]);
        let mut a = pool.allocate(1).unwrap();
        let mut b = pool.allocate(1).unwrap();
        assert!(pool.name(a[0], ka) && pool.name(b[0], kb));
        assert!(!pool.name(b[0], ka), "a key names one unit");
        pool.release(&mut a);
        pool.release(&mut b);
        assert_eq!((pool.available(), pool.named()), (3, 2));
        let mut again = vec![pool.lookup(&ka).expect("idle a is found")];
        assert_eq!(pool.available(), 2, "a is held again");
        let mut c = pool.allocate(2).unwrap();
        assert_eq!(pool.evictions(), 1, "the empty unit, then b, the oldest idle");
        assert!(pool.lookup(&kb).is_none(), "b's content is gone");
        assert!(pool.allocate(1).is_none(), "a held unit is never handed out");
        assert_eq!(pool.lookup(&ka), Some(again[0]));
        pool.release(&mut again);
        pool.release(&mut c);
    }

    #[test]
    fn a_named_block_is_reused_only_for_the_same_tokens() {
        let mut pool = BlockPool::new(2, 2);
        let mut table = Vec::new();
        assert!(pool.grow(&mut table, 2));
        assert!(pool.name(table[0], [9; 32], &[4, 5]));
        pool.release(&mut table);
        assert!(pool.lookup(&[9; 32], &[4, 6]).is_none(), "a key whose tokens differ is a miss");
        assert_eq!(pool.free_blocks(), 2);
        assert_eq!(pool.lookup(&[9; 32], &[4, 5]), Some(0));
        assert_eq!(pool.free_blocks(), 1);
    }
}
