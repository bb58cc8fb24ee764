//! The media cache: for every image of every live request, each gated cross-attention block's K and V, computed
//! once at admission and read by every decode step until the request ends (other engines recompute them per step).
//! Per cross-attention block one K pool and one V pool `[slots * tokens_per_image, hidden]`; an image owns one
//! slot (handed out by the scheduler's [`SlotPool`](crate::cache::pool::SlotPool)), so the cross-attention kernels
//! address it as `slot * tokens_per_image`.

use crate::backend::Backend;

/// One cross-attention block's keys and values for a request's images, `[images * tokens_per_image, hidden]`.
pub struct ImageKv<B: Backend> {
    pub k: B::Tensor,
    pub v: B::Tensor,
}

/// What the cross-attention of a row whose latest image is in a slot reads: that slot's first `rows` key rows
/// (an image may fill only part of its slot: Llama 3.2 Vision's unused tiles), after those of the slot `after`
/// when the two images are seen together (consecutive `<|image|>` tokens), and so on back along the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotView {
    pub rows: usize,
    pub after: Option<u32>,
}

pub struct MediaCache<B: Backend> {
    k: Vec<B::Tensor>,
    v: Vec<B::Tensor>,
    tokens_per_image: usize,
    slots: usize,
    views: Vec<SlotView>,
}

impl<B: Backend> MediaCache<B> {
    pub fn new(b: &B, blocks: usize, slots: usize, tokens_per_image: usize, width: usize) -> Self {
        let pool = || b.zeros(slots * tokens_per_image, width);
        MediaCache {
            k: (0..blocks).map(|_| pool()).collect(),
            v: (0..blocks).map(|_| pool()).collect(),
            tokens_per_image,
            slots,
            views: vec![
                SlotView {
                    rows: tokens_per_image,
                    after: None,
                };
                slots
            ],
        }
    }

    /// Sets what a row seeing `slot` attends to (by default: all of its rows, and no other slot).
    pub fn set_view(&mut self, slot: u32, view: SlotView) {
        assert!(view.rows <= self.tokens_per_image, "a slot holds {} rows", self.tokens_per_image);
        self.views[slot as usize] = view;
    }

    /// Pool rows a row whose latest image sits in `slot` attends to, earliest image first.
    pub fn visible_rows(&self, slot: u32) -> Vec<usize> {
        let mut chain = vec![slot];
        while let Some(prev) = self.views[*chain.last().expect("non-empty") as usize].after {
            assert!(chain.len() <= self.slots, "media slot views form a cycle");
            chain.push(prev);
        }
        let n = self.tokens_per_image;
        chain
            .iter()
            .rev()
            .flat_map(|&s| {
                let start = s as usize * n;
                start..start + self.views[s as usize].rows
            })
            .collect()
    }

    pub fn tokens_per_image(&self) -> usize {
        self.tokens_per_image
    }

    pub fn total_slots(&self) -> usize {
        self.slots
    }

    /// Stores images' K/V (per block `[images * tokens_per_image, hidden]`, as `cross_kv` computes them) at
    /// `slots`, one slot per image in order.
    pub fn write(&mut self, b: &B, per_block: &[ImageKv<B>], slots: &[u32]) {
        assert_eq!(
            per_block.len(),
            self.k.len(),
            "one K/V pair per cross-attention block"
        );
        let n = self.tokens_per_image;
        for ((kv, k_pool), v_pool) in per_block.iter().zip(&mut self.k).zip(&mut self.v) {
            for (i, &slot) in slots.iter().enumerate() {
                assert!(
                    (slot as usize) < self.slots,
                    "media slot {slot} out of range"
                );
                let at = slot as usize * n;
                b.write_rows(k_pool, at, &b.slice_rows(&kv.k, i * n, n));
                b.write_rows(v_pool, at, &b.slice_rows(&kv.v, i * n, n));
            }
        }
    }

    /// K and V pools of cross-attention block `i`.
    pub fn block(&self, i: usize) -> (&B::Tensor, &B::Tensor) {
        (&self.k[i], &self.v[i])
    }
}
