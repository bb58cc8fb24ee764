//! The self-attention KV cache of one sequence: per decoder layer, K and V `[capacity, hidden]`, preallocated, filled
//! in order. (The paged, multi-sequence cache of the batching runtime builds on the same per-layer layout.)

use crate::backend::Backend;

pub struct LayerKv<B: Backend> {
    pub k: B::Tensor,
    pub v: B::Tensor,
    len: usize,
}

impl<B: Backend> LayerKv<B> {
    /// Writes the new rows after the cached ones and returns the number of rows now valid.
    pub fn append(&mut self, b: &B, k: &B::Tensor, v: &B::Tensor) -> usize {
        b.write_rows(&mut self.k, self.len, k);
        b.write_rows(&mut self.v, self.len, v);
        self.len + b.dims(k).0
    }
}

pub struct KvCache<B: Backend> {
    layers: Vec<LayerKv<B>>,
    len: usize,
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(b: &B, layers: usize, capacity: usize, width: usize) -> Self {
        let layers = (0..layers)
            .map(|_| LayerKv {
                k: b.zeros(capacity, width),
                v: b.zeros(capacity, width),
                len: 0,
            })
            .collect();
        KvCache {
            layers,
            len: 0,
            capacity,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut LayerKv<B> {
        &mut self.layers[i]
    }

    /// Marks `n` more positions as cached in every layer (after each layer appended them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
        for l in &mut self.layers {
            l.len = self.len;
        }
    }
}
