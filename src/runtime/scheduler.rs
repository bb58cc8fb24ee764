//! The scheduler: which requests run, which of their rows each step computes, and which KV blocks and media slots
//! they hold. It is host-only (token ids, counts and block numbers; no tensor, no model), so every policy below is
//! unit-tested without a model; the engine (`runtime::engine`) executes the plans it returns.
//!
//! Each [`Scheduler::schedule`]:
//! 1. finishes requests asking for no new tokens, without running them;
//! 2. admits waiting requests first come, first served, while the KV pool can hold their tokens, the media cache
//!    their images, and the batch has room; a request admitted for the first time takes its media slots, and the
//!    plan asks for its images to be encoded into them (they stay for the request's life, preemption included);
//!    with the caches on, an image whose content a slot already holds shares that slot and is not encoded again,
//!    and the longest run of the prompt's full blocks already cached (same tokens, same images, same prefix:
//!    their [`block_key`]s) is shared instead of computed, so only the rest counts against the step's budget;
//! 3. chooses the step's rows under a token budget: every running sequence that is decoding contributes its one
//!    new token, then prompts contribute chunks (chunked prefill) in arrival order;
//! 4. grows block tables; when the pool runs dry the newest running sequence is preempted: its blocks are freed
//!    and it goes back to the queue in its arrival place, to be recomputed from its prompt and the tokens it has
//!    generated (overload slows requests down and never fails or loses one).
//!
//! After each step ([`Scheduler::commit`]) the prompt blocks that have become full are named by their content key:
//! when their holders finish they stay cached, idle, until the pool needs the room (least recently used first).
//! Only blocks of prompt rows are named and reused, as only prompt rows are looked up: a row is computed by the same
//! attention path whether it came from the cache or not ([`SeqStep::decode_from`]), so outputs are the same bits
//! with and without the cache.
//!
//! One cohesive thing over 500 lines: the policy (half the file) and its unit tests (the other half).

use std::collections::VecDeque;

use crate::backend::SeqStep;
use crate::cache::content::{block_key, ContentKey};
use crate::cache::pool::{BlockPool, SlotPool};
use crate::error::{Error, Result};

pub type RequestId = u64;

/// What the scheduler may hand out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Positions per KV-cache block.
    pub block_size: usize,
    /// Blocks in the KV pool (shared by all sequences).
    pub kv_blocks: usize,
    /// Images the media cache holds at once.
    pub media_slots: usize,
    /// Sequences per step at most.
    pub max_seqs: usize,
    /// Rows (prompt and decode tokens together) per step at most.
    pub max_step_tokens: usize,
    /// Whether full prompt blocks and images are cached by content and reused across requests.
    pub prefix_cache: bool,
}

/// What the caches saved since the scheduler started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Rows admitted requests had to compute (pending at admission, before cache hits).
    pub admitted_rows: usize,
    /// Of those, rows found in the prefix cache and not computed.
    pub prefix_hit_rows: usize,
    /// Images of requests admitted for the first time.
    pub admitted_images: usize,
    /// Of those, images whose content a media slot already held (not encoded again).
    pub media_hits: usize,
    /// Idle cached blocks whose content was dropped to make room.
    pub block_evictions: usize,
    /// Idle cached images whose slot was taken for another.
    pub media_evictions: usize,
}

/// A request as the scheduler sees it: its tokens, how many are computed, and what it holds.
#[derive(Debug)]
pub struct SeqState {
    pub id: RequestId,
    pub prompt_len: usize,
    /// Prompt and generated tokens; all but the last generated one are fed to the model.
    pub tokens: Vec<u32>,
    /// Per token: the request's image it attends to (-1: none).
    pub image_of_token: Vec<i32>,
    /// Positions whose K/V are in the cache.
    pub computed: usize,
    pub block_table: Vec<u32>,
    /// Media-cache slot of each of the request's images, taken at first admission and kept until the end.
    pub media_slots: Vec<u32>,
    /// The content key of each of the request's images (see `cache::content::image_key`).
    pub image_keys: Vec<ContentKey>,
    pub max_new_tokens: usize,
    /// Positions the sequence may use: prompt + new tokens, within the model's context.
    pub capacity: usize,
    /// Positions that may come from the prefix cache (rows whose logits the request reports must be computed).
    pub reusable: usize,
    /// The content key of each full block of the prompt (none with the prefix cache off).
    block_keys: Vec<ContentKey>,
    /// Blocks of the block table already named in the pool (or found there).
    named_blocks: usize,
}

impl SeqState {
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Whether it has all the tokens it may have.
    pub fn is_full(&self) -> bool {
        self.generated().len() >= self.max_new_tokens || self.tokens.len() > self.capacity
    }

    /// Tokens still to run through the model before the next one can be sampled.
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn num_images(&self) -> usize {
        self.image_keys.len()
    }

    fn has_media_slots(&self) -> bool {
        self.media_slots.len() == self.num_images()
    }

    /// The content keys of the prompt's full blocks: each block's tokens, the images its rows see, its parent's.
    fn prompt_block_keys(&self, block_size: usize) -> Vec<ContentKey> {
        let mut keys: Vec<ContentKey> = Vec::with_capacity(self.prompt_len / block_size);
        for j in 0..self.prompt_len / block_size {
            let rows = j * block_size..(j + 1) * block_size;
            let images = self.image_of_token[rows.clone()]
                .iter()
                .map(|&img| usize::try_from(img).ok().map(|i| self.image_keys[i]));
            let key = block_key(keys.last(), &self.tokens[rows], images);
            keys.push(key);
        }
        keys
    }

    /// The media slot its image `img` is in (-1: no image).
    fn slot_of(&self, img: i32) -> i32 {
        usize::try_from(img).map_or(-1, |j| self.media_slots[j] as i32)
    }
}

/// A sequence to start from a running one's prefix ([`Scheduler::fork`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fork {
    pub prompt: Vec<u32>,
    /// Per token: the image it attends to (-1: none), as for [`Scheduler::add`].
    pub image_of_token: Vec<i32>,
    /// KV blocks of the parent to share, at most (never more than the parent has computed).
    pub shared_blocks: usize,
    pub max_new_tokens: usize,
    pub capacity: usize,
    /// Positions it may take from the prefix cache when it is admitted again after a preemption.
    pub reusable: usize,
}

/// A request admitted for the first time: its images go into these slots, one per image in order; those marked
/// `encode` are to be encoded, the others' slots already hold their content (the media cache by content).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaJob {
    pub id: RequestId,
    pub slots: Vec<u32>,
    pub encode: Vec<bool>,
}

/// One sequence's rows in a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// The token ids of its rows.
    pub ids: Vec<u32>,
    /// Its rows as the backend lays them out (images as media slots).
    pub step: SeqStep,
    /// Whether its last row's logits give its next token (all its pending tokens are computed by this step).
    pub sampled: bool,
}

/// What one step does, in order.
#[derive(Debug, Default)]
pub struct StepPlan {
    /// Requests that asked for no new tokens, finished without running; their blocks and slots are free.
    pub finished: Vec<SeqState>,
    /// Images to encode before the rows run.
    pub encode: Vec<MediaJob>,
    /// The step's rows, sequence after sequence in arrival order.
    pub seqs: Vec<ScheduledSeq>,
}

pub struct Scheduler {
    limits: Limits,
    blocks: BlockPool,
    media: SlotPool,
    /// Requests not running, in arrival order (preempted ones go back in their arrival place).
    waiting: VecDeque<SeqState>,
    /// Running requests, in arrival order.
    running: Vec<SeqState>,
    next_id: RequestId,
    preemptions: usize,
    stats: CacheStats,
}

impl Scheduler {
    pub fn new(limits: Limits) -> Result<Self> {
        let l = &limits;
        if l.block_size == 0 || l.kv_blocks == 0 || l.max_seqs == 0 || l.max_step_tokens == 0 {
            return Err(Error::Invalid(format!(
                "engine limits must be positive: {limits:?}"
            )));
        }
        Ok(Scheduler {
            blocks: BlockPool::new(l.kv_blocks, l.block_size),
            media: SlotPool::new(l.media_slots),
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            preemptions: 0,
            stats: CacheStats::default(),
        })
    }

    pub fn blocks(&self) -> &BlockPool {
        &self.blocks
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn media_slots_used(&self) -> usize {
        self.media.total() - self.media.available()
    }

    /// Times a sequence was preempted to make room.
    pub fn preemptions(&self) -> usize {
        self.preemptions
    }

    /// What the prefix and media caches saved so far.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            block_evictions: self.blocks.evictions(),
            media_evictions: self.media.evictions(),
            ..self.stats
        }
    }

    /// Queues a request of `prompt` tokens (each attending to the image `image_of_token` gives, -1 for none, of
    /// the images keyed `image_keys`) that may use `capacity` positions, of which the first `reusable` may come
    /// from the prefix cache; refuses one it could never run: more images than the media cache holds, more
    /// positions than the whole KV pool.
    pub fn add(
        &mut self,
        prompt: Vec<u32>,
        image_of_token: Vec<i32>,
        image_keys: Vec<ContentKey>,
        reusable: usize,
        max_new_tokens: usize,
        capacity: usize,
    ) -> Result<RequestId> {
        self.check_fits(image_keys.len(), capacity)?;
        let id = self.next_id;
        self.next_id += 1;
        let seq = SeqState {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            image_of_token,
            computed: 0,
            block_table: Vec::new(),
            media_slots: Vec::new(),
            image_keys,
            max_new_tokens,
            capacity,
            reusable,
            block_keys: Vec::new(),
            named_blocks: 0,
        };
        let seq = self.with_block_keys(seq);
        self.waiting.push_back(seq);
        Ok(id)
    }

    fn with_block_keys(&self, mut seq: SeqState) -> SeqState {
        if self.limits.prefix_cache {
            seq.block_keys = seq.prompt_block_keys(self.limits.block_size);
        }
        seq
    }

    /// Refuses a request it could never run: more images than the media cache holds, more positions than the
    /// whole KV pool.
    pub fn check_fits(&self, num_images: usize, capacity: usize) -> Result<()> {
        if num_images > self.media.total() {
            return Err(Error::Invalid(format!(
                "{num_images} images, more than the media cache holds ({})",
                self.media.total()
            )));
        }
        let blocks = self.blocks.blocks_for(capacity);
        if blocks > self.blocks.total_blocks() {
            return Err(Error::Invalid(format!(
                "a request of {capacity} positions needs {blocks} KV blocks, more than the pool's {}",
                self.blocks.total_blocks()
            )));
        }
        Ok(())
    }

    /// Ids for `n` sequences to be forked later ([`Scheduler::fork`]), taken now so that they keep the arrival
    /// place of the request they come from.
    pub fn reserve_ids(&mut self, n: usize) -> Vec<RequestId> {
        let ids = (self.next_id..self.next_id + n as RequestId).collect();
        self.next_id += n as RequestId;
        ids
    }

    /// Starts the reserved sequence `id` of `prompt` from the running `parent`: it shares (without copying) the
    /// parent's first `shared_blocks` KV blocks, which hold the first `shared_blocks * block_size` positions of
    /// `prompt` (refused where the tokens disagree), and all the parent's media slots; it computes the rest
    /// itself. It runs at once where the batch has room, else waits in its arrival place with its shares (given
    /// up if admission runs out of blocks: see `admit`). A fork that is preempted gives up its shares and is
    /// recomputed from its prompt, as any sequence.
    pub fn fork(&mut self, parent: RequestId, id: RequestId, child: Fork) -> Result<()> {
        let bs = self.limits.block_size;
        let p = self.running_mut(parent);
        let shared = child.shared_blocks.min(p.computed / bs);
        if p.tokens[..shared * bs] != child.prompt[..shared * bs] {
            return Err(Error::Invalid(format!(
                "request {id} shares request {parent}'s first {} positions but not their tokens",
                shared * bs
            )));
        }
        let runs_now = self.running.len() < self.limits.max_seqs;
        let p = self.running_mut(parent);
        let block_table = p.block_table[..shared].to_vec();
        let media_slots = p.media_slots.clone();
        let image_keys = p.image_keys.clone();
        self.blocks.share(&block_table);
        self.media.share(&media_slots);
        let seq = self.with_block_keys(SeqState {
            id,
            prompt_len: child.prompt.len(),
            tokens: child.prompt,
            image_of_token: child.image_of_token,
            computed: shared * bs,
            block_table,
            media_slots,
            image_keys,
            max_new_tokens: child.max_new_tokens,
            capacity: child.capacity,
            reusable: child.reusable,
            block_keys: Vec::new(),
            named_blocks: shared,
        });
        if runs_now {
            self.running.push(seq);
        } else {
            let at = self
                .waiting
                .iter()
                .position(|w| w.id > id)
                .unwrap_or(self.waiting.len());
            self.waiting.insert(at, seq);
        }
        Ok(())
    }

    /// Plans the next step (see the module doc); its `seqs` are empty when nothing can run.
    pub fn schedule(&mut self) -> StepPlan {
        let finished = self.take_empty_requests();
        let encode = self.admit();
        let rows = self.choose_rows();
        let seqs = self.scheduled(&rows);
        StepPlan {
            finished,
            encode,
            seqs,
        }
    }

    /// Records that `plan`'s rows ran: their K/V are in the cache, and the prompt blocks they filled are named.
    pub fn commit(&mut self, plan: &StepPlan) {
        let bs = self.limits.block_size;
        for s in &plan.seqs {
            let i = self.running_index(s.id);
            let seq = &mut self.running[i];
            seq.computed += s.step.q_rows;
            let full = (seq.computed / bs).min(seq.block_keys.len());
            for j in seq.named_blocks..full {
                self.blocks
                    .name(seq.block_table[j], seq.block_keys[j], &seq.tokens[j * bs..(j + 1) * bs]);
            }
            seq.named_blocks = seq.named_blocks.max(full);
        }
    }

    /// Appends a sampled token to a running sequence (it attends to the image its last token did).
    pub fn append(&mut self, id: RequestId, token: u32) -> &SeqState {
        let seq = self.running_mut(id);
        let image = *seq.image_of_token.last().expect("prompts are not empty");
        seq.tokens.push(token);
        seq.image_of_token.push(image);
        seq
    }

    /// Removes a running sequence and frees its blocks and media slots.
    pub fn finish(&mut self, id: RequestId) -> SeqState {
        let i = self.running_index(id);
        let seq = self.running.remove(i);
        self.release(seq)
    }

    /// Drops a request wherever it is (queued or running) and frees what it holds; `None` if it is unknown or
    /// already finished.
    pub fn cancel(&mut self, id: RequestId) -> Option<SeqState> {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i).expect("index in range")
        };
        Some(self.release(seq))
    }

    fn running_index(&self, id: RequestId) -> usize {
        self.running
            .iter()
            .position(|s| s.id == id)
            .unwrap_or_else(|| panic!("request {id} is not running"))
    }

    fn running_mut(&mut self, id: RequestId) -> &mut SeqState {
        let i = self.running_index(id);
        &mut self.running[i]
    }

    fn release(&mut self, mut seq: SeqState) -> SeqState {
        self.blocks.release(&mut seq.block_table);
        self.media.release(&mut seq.media_slots);
        seq
    }

    fn take_empty_requests(&mut self) -> Vec<SeqState> {
        let (empty, rest): (Vec<_>, Vec<_>) =
            self.waiting.drain(..).partition(|s| s.max_new_tokens == 0);
        self.waiting = rest.into();
        empty.into_iter().map(|s| self.release(s)).collect()
    }

    /// Moves waiting requests to running, first come first served, while there is room for all their tokens and
    /// images; returns the media jobs of those admitted for the first time.
    fn admit(&mut self) -> Vec<MediaJob> {
        let mut jobs = Vec::new();
        while self.running.len() < self.limits.max_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let first_admission = !seq.has_media_slots();
            let Some(fresh) = self.take_media(&mut seq) else {
                self.waiting.push_front(seq);
                break;
            };
            let pending = seq.pending();
            let hits = self.take_cached_prefix(&mut seq);
            if !self.blocks.grow(&mut seq.block_table, seq.tokens.len()) {
                // Waiting forks may hold shared blocks; they give them up before admission stalls, so that
                // blocks are only ever held by sequences that can run (no deadlock).
                if !self.unshare_waiting() || !self.blocks.grow(&mut seq.block_table, seq.tokens.len()) {
                    self.give_back_admission(&mut seq, hits, first_admission);
                    self.waiting.push_front(seq);
                    break;
                }
            }
            self.stats.admitted_rows += pending;
            self.stats.prefix_hit_rows += hits * self.limits.block_size;
            if first_admission {
                self.stats.admitted_images += fresh.len();
                self.stats.media_hits += fresh.iter().filter(|&&f| !f).count();
                self.name_media(&seq, &fresh);
                jobs.push(MediaJob {
                    id: seq.id,
                    slots: seq.media_slots.clone(),
                    encode: fresh,
                });
            }
            self.running.push(seq);
        }
        jobs
    }

    /// Gives `seq` (admitted for the first time) a media slot per image: the slot already holding its content where
    /// the cache has it, else a free one; returns which slots are fresh (to be encoded), or `None` (and nothing
    /// taken) when too few are free. A sequence that has its slots takes none (all are kept, not fresh).
    fn take_media(&mut self, seq: &mut SeqState) -> Option<Vec<bool>> {
        if seq.has_media_slots() {
            return Some(Vec::new());
        }
        let mut fresh = Vec::with_capacity(seq.num_images());
        for key in &seq.image_keys {
            let found = self.limits.prefix_cache.then(|| self.media.lookup(key)).flatten();
            match found.or_else(|| self.media.allocate(1).map(|u| u[0])) {
                Some(slot) => {
                    seq.media_slots.push(slot);
                    fresh.push(found.is_none());
                }
                None => {
                    self.media.release(&mut seq.media_slots);
                    return None;
                }
            }
        }
        Some(fresh)
    }

    /// Names the fresh media slots of an admitted sequence by their images' content (once they are to be encoded).
    fn name_media(&mut self, seq: &SeqState, fresh: &[bool]) {
        if !self.limits.prefix_cache {
            return;
        }
        for ((&slot, key), _) in seq.media_slots.iter().zip(&seq.image_keys).zip(fresh).filter(|(_, &f)| f) {
            self.media.name(slot, *key);
        }
    }

    /// Shares the longest run of `seq`'s first prompt blocks the cache holds (never its last row, whose logits it
    /// needs, nor rows past `reusable`) into its empty block table; returns how many.
    fn take_cached_prefix(&mut self, seq: &mut SeqState) -> usize {
        if !seq.block_table.is_empty() {
            return 0;
        }
        let bs = self.limits.block_size;
        let most = (seq.reusable.min(seq.tokens.len() - 1) / bs).min(seq.block_keys.len());
        for j in 0..most {
            let tokens = &seq.tokens[j * bs..(j + 1) * bs];
            match self.blocks.lookup(&seq.block_keys[j], tokens) {
                Some(block) => seq.block_table.push(block),
                None => break,
            }
        }
        let hits = seq.block_table.len();
        seq.computed = hits * bs;
        seq.named_blocks = hits;
        hits
    }

    /// Undoes what an admission that does not fit took: the cached blocks it found, and the media slots of a
    /// first admission.
    fn give_back_admission(&mut self, seq: &mut SeqState, hits: usize, first_admission: bool) {
        if hits > 0 {
            self.blocks.release(&mut seq.block_table);
            seq.computed = 0;
            seq.named_blocks = 0;
        }
        if first_admission {
            self.media.release(&mut seq.media_slots);
        }
    }

    /// Each running sequence's rows for this step: decodes first (one row each), then prompt chunks in arrival
    /// order, within the token budget; grows block tables, preempting the newest sequences when the pool is dry.
    /// Returns the rows of every running sequence (some 0) in running order.
    fn choose_rows(&mut self) -> Vec<usize> {
        let mut budget = self.limits.max_step_tokens;
        let mut rows = vec![0usize; self.running.len()];
        for (i, seq) in self.running.iter().enumerate() {
            if seq.pending() == 1 && budget > 0 {
                rows[i] = 1;
                budget -= 1;
            }
        }
        for (i, seq) in self.running.iter().enumerate() {
            if seq.pending() > 1 && budget > 0 {
                rows[i] = seq.pending().min(budget);
                budget -= rows[i];
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if rows[i] > 0 {
                let needed = self.running[i].computed + rows[i];
                while !self.blocks.grow(&mut self.running[i].block_table, needed) {
                    let victim = self.running.len() - 1;
                    self.preempt(victim);
                    rows.truncate(victim);
                    if victim == i {
                        break;
                    }
                }
            }
            i += 1;
        }
        rows
    }

    /// Releases the blocks of every waiting sequence but the one being admitted (out of the queue: forks waiting
    /// with shared blocks, which will compute their prompts whole); whether any was released.
    fn unshare_waiting(&mut self) -> bool {
        let mut released = false;
        for seq in self.waiting.iter_mut() {
            if !seq.block_table.is_empty() {
                self.blocks.release(&mut seq.block_table);
                seq.computed = 0;
                seq.named_blocks = 0;
                released = true;
            }
        }
        released
    }

    /// Frees `running[i]`'s blocks and queues it again in its arrival place, to be recomputed.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        self.blocks.release(&mut seq.block_table);
        seq.computed = 0;
        seq.named_blocks = 0;
        let at = self
            .waiting
            .iter()
            .position(|w| w.id > seq.id)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
        self.preemptions += 1;
    }

    fn scheduled(&self, rows: &[usize]) -> Vec<ScheduledSeq> {
        let planned = self.running.iter().zip(rows).filter(|&(_, &r)| r > 0);
        planned
            .map(|(seq, &rows)| {
                let range = seq.computed..seq.computed + rows;
                ScheduledSeq {
                    id: seq.id,
                    ids: seq.tokens[range.clone()].to_vec(),
                    step: SeqStep {
                        q_rows: rows,
                        kv_len: range.end,
                        block_table: seq.block_table.clone(),
                        image_of_row: seq.image_of_token[range.clone()]
                            .iter()
                            .map(|&img| seq.slot_of(img))
                            .collect(),
                        decode_from: seq.prompt_len,
                    },
                    sampled: range.end == seq.tokens.len(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(kv_blocks: usize, max_step_tokens: usize) -> Limits {
        Limits {
            block_size: 4,
            kv_blocks,
            media_slots: 3,
            max_seqs: 4,
            max_step_tokens,
            prefix_cache: false,
        }
    }

    /// A request of `n` prompt tokens, its image (if any) seen from the second token on.
    fn add(s: &mut Scheduler, n: usize, images: usize, new_tokens: usize) -> RequestId {
        let image_of = (0..n as i32).map(|t| if images > 0 && t > 0 { 0 } else { -1 });
        s.add(
            vec![7; n],
            image_of.collect(),
            (0..images as u8).map(|i| [i; 32]).collect(),
            n,
            new_tokens,
            n + new_tokens,
        )
        .unwrap()
    }

    /// Runs a plan: commits its rows and appends a token to every sampled sequence.
    fn run(s: &mut Scheduler, plan: &StepPlan) {
        s.commit(plan);
        for seq in plan.seqs.iter().filter(|q| q.sampled) {
            s.append(seq.id, 1);
        }
    }

    fn rows(plan: &StepPlan) -> Vec<(RequestId, usize)> {
        plan.seqs.iter().map(|s| (s.id, s.step.q_rows)).collect()
    }

    #[test]
    fn decodes_go_first_then_prompt_chunks_in_arrival_order_within_the_budget() {
        let mut s = Scheduler::new(limits(100, 8)).unwrap();
        let a = add(&mut s, 3, 0, 5);
        let plan = s.schedule();
        assert_eq!(rows(&plan), vec![(a, 3)]);
        assert!(plan.seqs[0].sampled);
        run(&mut s, &plan);
        let b = add(&mut s, 10, 0, 5);
        let c = add(&mut s, 6, 0, 5);
        let plan = s.schedule();
        assert_eq!(
            rows(&plan),
            vec![(a, 1), (b, 7)],
            "a decodes, b takes the rest of the budget"
        );
        assert_eq!(plan.seqs[1].ids.len(), 7);
        assert!(!plan.seqs[1].sampled, "b's prompt is not all computed");
        run(&mut s, &plan);
        let plan = s.schedule();
        assert_eq!(rows(&plan), vec![(a, 1), (b, 3), (c, 4)]);
        assert_eq!(plan.seqs[1].step.kv_len, 10);
        assert!(plan.seqs[1].sampled && !plan.seqs[2].sampled);
    }

    #[test]
    fn admission_waits_for_blocks_and_media_slots_first_come_first_served() {
        let mut s = Scheduler::new(limits(3, 64)).unwrap();
        let a = add(&mut s, 8, 2, 4);
        let b = add(&mut s, 2, 2, 1);
        let c = add(&mut s, 1, 0, 1);
        let plan = s.schedule();
        assert_eq!(
            plan.encode,
            vec![MediaJob {
                id: a,
                slots: vec![0, 1],
                encode: vec![true, true],
            }]
        );
        assert_eq!(
            rows(&plan),
            vec![(a, 8)],
            "b needs 2 slots, 1 is free; c waits behind b"
        );
        assert_eq!(
            plan.seqs[0].step.image_of_row[..3],
            [-1, 0, 0],
            "image 0 is in slot 0"
        );
        assert_eq!(s.waiting(), 2);
        run(&mut s, &plan);
        s.finish(a);
        assert_eq!(s.blocks().free_blocks(), 3);
        assert_eq!(s.media_slots_used(), 0);
        let plan = s.schedule();
        assert_eq!(plan.encode.len(), 1);
        assert_eq!(plan.encode[0].id, b);
        assert_eq!(rows(&plan), vec![(b, 2), (c, 1)]);
    }

    #[test]
    fn a_dry_pool_preempts_the_newest_which_keeps_its_slots_and_arrival_place() {
        let mut s = Scheduler::new(limits(3, 64)).unwrap();
        let a = add(&mut s, 4, 0, 8);
        let b = add(&mut s, 4, 1, 8);
        let plan = s.schedule();
        assert_eq!(rows(&plan), vec![(a, 4), (b, 4)]);
        run(&mut s, &plan);
        // a's fifth position needs a second block, b's too: one block is free.
        let plan = s.schedule();
        assert_eq!(rows(&plan), vec![(a, 1)]);
        assert_eq!(s.preemptions(), 1);
        assert_eq!((s.running(), s.waiting()), (1, 1));
        assert_eq!(
            s.media_slots_used(),
            1,
            "a preempted request keeps its images"
        );
        run(&mut s, &plan);
        let c = add(&mut s, 1, 0, 1);
        s.finish(a);
        let plan = s.schedule();
        assert!(plan.encode.is_empty(), "b's images are already encoded");
        assert_eq!(
            rows(&plan),
            vec![(b, 5), (c, 1)],
            "b recomputes its prompt and token, before c"
        );
    }

    #[test]
    fn requests_that_can_never_run_are_refused_and_empty_ones_finish_at_once() {
        let mut s = Scheduler::new(limits(3, 64)).unwrap();
        let err = s.add(vec![1; 4], vec![-1; 4], vec![[0; 32]; 4], 4, 1, 5).unwrap_err();
        assert!(
            err.to_string()
                .contains("more than the media cache holds (3)"),
            "{err}"
        );
        let err = s.add(vec![1; 4], vec![-1; 4], Vec::new(), 4, 9, 13).unwrap_err();
        assert!(
            err.to_string()
                .contains("needs 4 KV blocks, more than the pool's 3"),
            "{err}"
        );
        let empty = add(&mut s, 2, 1, 0);
        let plan = s.schedule();
        assert_eq!(plan.finished.len(), 1);
        assert_eq!(plan.finished[0].id, empty);
        assert!(plan.seqs.is_empty() && plan.encode.is_empty());
        assert!(Scheduler::new(limits(0, 64)).is_err());
    }

    #[test]
    fn cancel_frees_a_request_wherever_it_is() {
        let mut s = Scheduler::new(limits(2, 64)).unwrap();
        let a = add(&mut s, 7, 1, 1);
        let b = add(&mut s, 2, 1, 1);
        let plan = s.schedule();
        assert_eq!(rows(&plan), vec![(a, 7)]);
        assert!(s.cancel(b).is_some(), "b was waiting");
        assert!(s.cancel(a).is_some(), "a was running");
        assert!(s.cancel(a).is_none());
        assert_eq!(s.blocks().free_blocks(), 2);
        assert_eq!(s.media_slots_used(), 0);
    }

    #[test]
    fn a_fork_shares_the_prefix_blocks_and_media_slots_and_computes_only_the_rest() {
        let mut s = Scheduler::new(limits(8, 64)).unwrap();
        let parent = add(&mut s, 10, 1, 1);
        let plan = s.schedule();
        assert_eq!(rows(&plan), vec![(parent, 10)]);
        s.commit(&plan);
        assert_eq!(s.blocks().free_blocks(), 8 - 3);
        let [child] = s.reserve_ids(1)[..] else { unreachable!() };
        let mut prompt = vec![7; 10];
        prompt.extend([3, 4, 5]);
        let fork = Fork {
            image_of_token: vec![0; 13],
            prompt: prompt.clone(),
            shared_blocks: 2,
            max_new_tokens: 1,
            capacity: 14,
            reusable: 10,
        };
        s.fork(parent, child, fork.clone()).unwrap();
        s.finish(parent);
        assert_eq!(s.blocks().free_blocks(), 8 - 2, "the child still holds the two shared blocks");
        assert_eq!(s.media_slots_used(), 1, "and the image's slot");
        let plan = s.schedule();
        assert!(plan.encode.is_empty(), "the image is not encoded again");
        assert_eq!(rows(&plan), vec![(child, 5)], "positions 8 .. 13 only");
        assert_eq!(plan.seqs[0].step.block_table.len(), 4);
        s.commit(&plan);
        s.finish(child);
        assert_eq!(s.blocks().free_blocks(), 8);
        assert_eq!(s.media_slots_used(), 0);
        // Tokens that disagree with the parent's are refused.
        let parent = add(&mut s, 10, 0, 1);
        let plan = s.schedule();
        s.commit(&plan);
        let [child] = s.reserve_ids(1)[..] else { unreachable!() };
        prompt[1] = 9;
        assert!(s.fork(parent, child, Fork { prompt, ..fork }).is_err());
    }

    fn cached_limits(kv_blocks: usize) -> Limits {
        Limits {
            prefix_cache: true,
            ..limits(kv_blocks, 64)
        }
    }

    /// A request of `tokens` whose image (keyed `image`) is seen from position `image_from` on.
    fn add_seen(s: &mut Scheduler, tokens: &[u32], image: Option<(u8, usize)>, new_tokens: usize) -> RequestId {
        let image_of = (0..tokens.len()).map(|t| match image {
            Some((_, from)) if t >= from => 0,
            _ => -1,
        });
        let keys = image.map(|(k, _)| vec![[k; 32]]).unwrap_or_default();
        let n = tokens.len();
        s.add(tokens.to_vec(), image_of.collect(), keys, n, new_tokens, n + new_tokens)
            .unwrap()
    }

    /// Runs every step until nothing is left to run; returns the rows each request computed.
    fn drain(s: &mut Scheduler) -> HashMap<RequestId, usize> {
        let mut computed = HashMap::new();
        for _ in 0..100 {
            let plan = s.schedule();
            if plan.seqs.is_empty() {
                return computed;
            }
            for q in &plan.seqs {
                *computed.entry(q.id).or_default() += q.step.q_rows;
            }
            run(s, &plan);
            for q in plan.seqs.iter().filter(|q| q.sampled) {
                let seq = s.running.iter().find(|r| r.id == q.id).unwrap();
                if seq.is_full() {
                    s.finish(q.id);
                }
            }
        }
        panic!("the scheduler never drained");
    }

    use std::collections::HashMap;

    #[test]
    fn a_prompt_seen_before_reuses_its_full_blocks_and_computes_only_the_rest() {
        let mut s = Scheduler::new(cached_limits(16)).unwrap();
        let prompt: Vec<u32> = (0..11).collect();
        let a = add_seen(&mut s, &prompt, Some((1, 5)), 1);
        let plan = s.schedule();
        assert_eq!(plan.encode[0].encode, vec![true]);
        drain(&mut s);
        assert_eq!(s.blocks().cached_blocks(), 2, "the prompt's two full blocks");
        let b = add_seen(&mut s, &prompt, Some((1, 5)), 1);
        let plan = s.schedule();
        assert_eq!(plan.encode[0].encode, vec![false], "the image's slot still holds it");
        assert_eq!(rows(&plan), vec![(b, 3)], "positions 8 .. 11 only");
        assert!(plan.seqs[0].sampled);
        drain(&mut s);
        // One pixel more or less is another key: blocks before the image's first row are shared, none after.
        let c = add_seen(&mut s, &prompt, Some((2, 5)), 1);
        let plan = s.schedule();
        assert_eq!(plan.encode[0].encode, vec![true]);
        assert_eq!(rows(&plan), vec![(c, 7)], "block 0 (no image) is shared, block 1 sees the other image");
        drain(&mut s);
        // The last row is always computed (its logits give the next token), even when every block is cached.
        let d = add_seen(&mut s, &prompt[..8], Some((1, 5)), 1);
        assert_eq!(rows(&s.schedule()), vec![(d, 4)]);
        let stats = s.cache_stats();
        assert_eq!((stats.admitted_images, stats.media_hits), (4, 2));
        assert_eq!((stats.admitted_rows, stats.prefix_hit_rows), (11 * 3 + 8, 8 + 4 + 4));
        assert_ne!(a, b);
    }

    #[test]
    fn rows_a_request_scores_are_never_taken_from_the_cache() {
        let mut s = Scheduler::new(cached_limits(16)).unwrap();
        let prompt: Vec<u32> = (0..13).collect();
        add_seen(&mut s, &prompt, None, 1);
        drain(&mut s);
        let scored = s
            .add(prompt.clone(), vec![-1; 13], Vec::new(), 5, 1, 14)
            .unwrap();
        assert_eq!(rows(&s.schedule()), vec![(scored, 9)], "block 0 only: position 5 on is scored");
    }

    #[test]
    fn idle_cached_blocks_are_evicted_oldest_first_and_never_while_held() {
        let mut s = Scheduler::new(cached_limits(6)).unwrap();
        let first: Vec<u32> = (0..9).collect();
        let second: Vec<u32> = (100..109).collect();
        add_seen(&mut s, &first, None, 1);
        drain(&mut s);
        add_seen(&mut s, &second, None, 1);
        drain(&mut s);
        assert_eq!(s.blocks().cached_blocks(), 4, "both prompts' two full blocks, idle");
        // Three blocks: the two empty ones, then the block idle the longest (the first prompt's last).
        let long = add_seen(&mut s, &(200..211).collect::<Vec<_>>(), None, 1);
        assert_eq!(rows(&s.schedule()), vec![(long, 11)]);
        assert_eq!(s.cache_stats().block_evictions, 1);
        drain(&mut s);
        let again = add_seen(&mut s, &second, None, 1);
        assert_eq!(rows(&s.schedule()), vec![(again, 1)], "the second prompt is still cached whole");
        drain(&mut s);
        let first_again = add_seen(&mut s, &first, None, 1);
        assert_eq!(rows(&s.schedule()), vec![(first_again, 5)], "the first prompt's first block only");
        drain(&mut s);
        assert_eq!(s.blocks().free_blocks(), 6, "nothing is held once all finish");
    }
}
