//! Roofline floors: the FLOPs each stage of a model must do and the fewest bytes it must move, from its
//! configuration (IDEFICS: [`Costs`]; Llama 3.2 Vision: [`MllamaCosts`]; OpenFlamingo: [`OpenFlamingoCosts`]; all as
//! [`Floors`]), so that a measured time can be set beside the least time the hardware allows
//! (`max(FLOPs / matmul FLOP/s, bytes / copy bandwidth)`, per stage). The accounting is that of
//! `shared/docs/perf_floors.py` (FLOPs = 2 per multiply-add; norms, biases and element-wise ops left out), made
//! general over configurations; for idefics-9b it gives that script's numbers (tested).

use crate::backend::Ceilings;
use crate::io::config::IdeficsConfig;
use crate::io::mllama_config::MllamaConfig;

/// What the benchmarks set measured times beside, for any family.
pub trait Floors {
    /// Every parameter.
    fn total_params(&self) -> f64;
    /// Parameters a decode step reads.
    fn decode_params(&self) -> f64;
    /// Bytes per weight as the backend reads them.
    fn weight_bytes(&self) -> f64;
    /// The vision tower on one image.
    fn vision(&self) -> Work;
    /// Least time for everything one image takes before the decoder (vision tower, resampler or projector).
    fn image_floor(&self, c: &Ceilings) -> f64;
    /// The language model over a `tokens`-token prompt with one image, LM head on the last token.
    fn prefill(&self, tokens: usize) -> Work;
    /// One decode step of `batch` sequences with `context` cached positions each.
    fn decode_step(&self, batch: usize, context: usize) -> Work;
}

/// Work of one stage: FLOPs done and bytes moved through memory.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    pub flops: f64,
    pub bytes: f64,
}

impl Work {
    /// The least time the ceilings allow, in seconds.
    pub fn floor(&self, c: &Ceilings) -> f64 {
        (self.flops / c.matmul_flops_per_s).max(self.bytes / c.copy_bytes_per_s)
    }
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work {
            flops: self.flops + o.flops,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// Parameter counts of a configuration's parts (weights only).
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub decoder_layer: f64,
    /// Embedding table and LM head together (same shape).
    pub embed_and_head: f64,
    pub cross_qo: f64,
    /// The K and V projections of the image tokens, run once per image (cached for decode).
    pub cross_kv: f64,
    pub cross_mlp: f64,
    pub vision: f64,
    pub perceiver: f64,
}

/// A configuration's accounting, with the storage width of its weights and KV cache.
pub struct Costs<'a> {
    cfg: &'a IdeficsConfig,
    pub params: Params,
    /// Bytes per weight as the backend reads them.
    pub weight_bytes: f64,
    /// Bytes per cached K or V element.
    pub kv_bytes: f64,
}

impl<'a> Costs<'a> {
    pub fn new(cfg: &'a IdeficsConfig, weight_bytes: f64, kv_bytes: f64) -> Self {
        Costs {
            params: params(cfg),
            cfg,
            weight_bytes,
            kv_bytes,
        }
    }

    fn layers(&self) -> f64 {
        self.cfg.num_hidden_layers as f64
    }

    fn cross_layers(&self) -> f64 {
        self.cfg.num_cross_layers() as f64
    }

    /// Every parameter.
    pub fn total_params(&self) -> f64 {
        let p = &self.params;
        self.layers() * p.decoder_layer
            + p.embed_and_head
            + self.cross_layers() * (p.cross_qo + p.cross_kv + p.cross_mlp)
            + p.vision
            + p.perceiver
    }

    /// Parameters a decode step reads: decoder layers, LM head, cross-attention q/o and MLP (image K/V cached, no
    /// vision tower, no perceiver, one embedding row).
    pub fn decode_params(&self) -> f64 {
        let p = &self.params;
        self.layers() * p.decoder_layer
            + p.embed_and_head / 2.0
            + self.cross_layers() * (p.cross_qo + p.cross_mlp)
    }

    /// The vision encoder on one image.
    pub fn vision(&self) -> Work {
        let v = &self.cfg.vision_config;
        let (n, d) = (v.num_positions() as f64, v.embed_dim as f64);
        let layer = 4.0 * d * d + 2.0 * d * v.intermediate_size as f64;
        let patch_len = (3 * v.patch_size * v.patch_size) as f64;
        Work {
            flops: v.num_hidden_layers as f64 * (2.0 * n * layer + 4.0 * n * n * d)
                + 2.0 * (n - 1.0) * patch_len * d,
            bytes: self.params.vision * self.weight_bytes,
        }
    }

    /// The perceiver resampler on one image's vision tokens.
    pub fn perceiver(&self) -> Work {
        if !self.cfg.use_resampler {
            return Work::default();
        }
        let p = &self.cfg.perceiver_config;
        let d = self.cfg.vision_config.embed_dim as f64;
        let inner = (p.resampler_n_heads * p.resampler_head_dim) as f64;
        let lat = p.resampler_n_latents as f64;
        let kv_len = self.cfg.vision_config.num_positions() as f64 + lat;
        let per_block = 2.0 * lat * d * inner
            + 4.0 * kv_len * d * inner
            + 4.0 * lat * kv_len * inner
            + 2.0 * lat * inner * d
            + 16.0 * lat * d * d;
        Work {
            flops: p.resampler_depth as f64 * per_block,
            bytes: self.params.perceiver * self.weight_bytes,
        }
    }

    /// The language model over a `tokens`-token prompt with one image (causal attention, the image's K/V computed
    /// in every cross-attention block, LM head on the last token only), every weight read once.
    pub fn prefill(&self, tokens: usize) -> Work {
        let p = &self.params;
        let (t, h) = (tokens as f64, self.cfg.hidden_size as f64);
        let img = self.cfg.image_tokens_per_image() as f64;
        let (l, x) = (self.layers(), self.cross_layers());
        let flops = 2.0 * t * l * p.decoder_layer
            + l * 2.0 * t * t * h
            + 2.0 * t * x * (p.cross_qo + p.cross_mlp)
            + 2.0 * img * x * p.cross_kv
            + x * 4.0 * t * img * h
            + p.embed_and_head;
        let weights = l * p.decoder_layer
            + p.embed_and_head / 2.0
            + x * (p.cross_qo + p.cross_kv + p.cross_mlp);
        Work {
            flops,
            bytes: weights * self.weight_bytes,
        }
    }

    /// One decode step of `batch` sequences with `context` cached positions each: the live weights once, and each
    /// sequence's self-attention K/V and its image's cross-attention K/V.
    pub fn decode_step(&self, batch: usize, context: usize) -> Work {
        let (b, ctx, h) = (batch as f64, context as f64, self.cfg.hidden_size as f64);
        let img = self.cfg.image_tokens_per_image() as f64;
        let (l, x) = (self.layers(), self.cross_layers());
        let attention = l * 4.0 * ctx * h + x * 4.0 * img * h;
        let kv_elements = l * 2.0 * ctx * h + x * 2.0 * img * h;
        decode_work(self.decode_params(), self.weight_bytes, self.kv_bytes, b, attention, kv_elements)
    }
}

impl Floors for Costs<'_> {
    fn total_params(&self) -> f64 {
        Costs::total_params(self)
    }
    fn decode_params(&self) -> f64 {
        Costs::decode_params(self)
    }
    fn weight_bytes(&self) -> f64 {
        self.weight_bytes
    }
    fn vision(&self) -> Work {
        Costs::vision(self)
    }
    fn image_floor(&self, c: &Ceilings) -> f64 {
        Costs::vision(self).floor(c) + self.perceiver().floor(c)
    }
    fn prefill(&self, tokens: usize) -> Work {
        Costs::prefill(self, tokens)
    }
    fn decode_step(&self, batch: usize, context: usize) -> Work {
        Costs::decode_step(self, batch, context)
    }
}

/// Llama 3.2 Vision's accounting: the vision tower runs every tile slot of an image (`max_num_tiles` x P_pad
/// tokens, local then global layers), the projector and every cross-attention layer's K/V run once per image
/// (`max_num_tiles` x P tokens), the self-attention layers use grouped-query K/V.
pub struct MllamaCosts<'a> {
    cfg: &'a MllamaConfig,
    pub weight_bytes: f64,
    pub kv_bytes: f64,
}

impl<'a> MllamaCosts<'a> {
    pub fn new(cfg: &'a MllamaConfig, weight_bytes: f64, kv_bytes: f64) -> Self {
        MllamaCosts {
            cfg,
            weight_bytes,
            kv_bytes,
        }
    }

    fn dims(&self) -> (f64, f64, f64, f64) {
        let t = &self.cfg.text_config;
        (t.hidden_size as f64, t.kv_width() as f64, t.intermediate_size as f64, t.vocab_size as f64)
    }

    fn self_layers(&self) -> f64 {
        self.cfg.text_config.self_attention_layers().len() as f64
    }

    fn cross_layers(&self) -> f64 {
        self.cfg.text_config.cross_attention_layers.len() as f64
    }

    /// q, k, v, o and the SwiGLU MLP of one decoder layer (self- or cross-attention alike).
    fn layer_params(&self) -> f64 {
        let (h, kv, i, _) = self.dims();
        2.0 * h * h + 2.0 * h * kv + 3.0 * h * i
    }

    /// The K and V projections a cross-attention layer runs on image tokens.
    fn cross_kv_params(&self) -> f64 {
        let (h, kv, _, _) = self.dims();
        2.0 * h * kv
    }

    fn vision_layer_params(&self) -> f64 {
        let v = &self.cfg.vision_config;
        let d = v.hidden_size as f64;
        4.0 * d * d + 2.0 * d * v.intermediate_size as f64
    }

    fn vision_params(&self) -> f64 {
        let v = &self.cfg.vision_config;
        let (d, t, p) = (v.hidden_size as f64, v.max_num_tiles as f64, v.tokens_per_tile() as f64);
        let ratios = v.supported_aspect_ratios.len() as f64 + 1.0;
        (v.num_hidden_layers + v.num_global_layers) as f64 * self.vision_layer_params()
            + (3 * v.patch_size * v.patch_size) as f64 * d
            + p * d
            + ratios * (t * p * d + 2.0 * t * d)
    }

    fn projector_params(&self) -> f64 {
        self.cfg.vision_config.vision_output_dim as f64 * self.cfg.text_config.hidden_size as f64
    }

    /// Key rows of one image in every cross-attention layer.
    fn image_tokens(&self) -> f64 {
        let v = &self.cfg.vision_config;
        (v.max_num_tiles * v.tokens_per_tile()) as f64
    }

    /// The projector and every cross-attention layer's K/V on one image.
    fn image_kv(&self) -> Work {
        let n = self.image_tokens();
        let weights = self.projector_params() + self.cross_layers() * self.cross_kv_params();
        Work {
            flops: 2.0 * n * weights,
            bytes: weights * self.weight_bytes,
        }
    }
}

impl Floors for MllamaCosts<'_> {
    fn total_params(&self) -> f64 {
        let (h, _, _, vocab) = self.dims();
        (self.self_layers() + self.cross_layers()) * self.layer_params()
            + (2.0 * vocab + 8.0) * h
            + self.vision_params()
            + self.projector_params()
    }

    /// Every decoder layer but the cross-attention K/V (cached), the LM head, one embedding row.
    fn decode_params(&self) -> f64 {
        let (h, _, _, vocab) = self.dims();
        (self.self_layers() + self.cross_layers()) * self.layer_params()
            - self.cross_layers() * self.cross_kv_params()
            + vocab * h
    }

    fn weight_bytes(&self) -> f64 {
        self.weight_bytes
    }

    /// Every tile slot's P_pad tokens through the local and global layers (attention over all of them), and the
    /// patch embedding.
    fn vision(&self) -> Work {
        let v = &self.cfg.vision_config;
        let d = v.hidden_size as f64;
        let n = (v.max_num_tiles * v.padded_tokens_per_tile()) as f64;
        let patches = (v.max_num_tiles * (v.tokens_per_tile() - 1)) as f64;
        let layers = (v.num_hidden_layers + v.num_global_layers) as f64;
        Work {
            flops: layers * (2.0 * n * self.vision_layer_params() + 4.0 * n * n * d)
                + 2.0 * patches * (3 * v.patch_size * v.patch_size) as f64 * d,
            bytes: self.vision_params() * self.weight_bytes,
        }
    }

    fn image_floor(&self, c: &Ceilings) -> f64 {
        self.vision().floor(c) + self.image_kv().floor(c)
    }

    fn prefill(&self, tokens: usize) -> Work {
        let (h, _, _, vocab) = self.dims();
        let t = tokens as f64;
        let (s, x) = (self.self_layers(), self.cross_layers());
        let no_kv = self.layer_params() - self.cross_kv_params();
        let flops = 2.0 * t * s * self.layer_params()
            + s * 2.0 * t * t * h
            + 2.0 * t * x * no_kv
            + x * 4.0 * t * self.image_tokens() * h
            + 2.0 * vocab * h;
        let weights = s * self.layer_params() + x * no_kv + vocab * h;
        Work {
            flops,
            bytes: weights * self.weight_bytes,
        }
    }

    /// The live weights once, each sequence's self-attention K/V (grouped) and its image's cross-attention K/V.
    fn decode_step(&self, batch: usize, context: usize) -> Work {
        let (h, kv, _, _) = self.dims();
        let (b, ctx, img) = (batch as f64, context as f64, self.image_tokens());
        let (s, x) = (self.self_layers(), self.cross_layers());
        let attention = s * 4.0 * ctx * h + x * 4.0 * img * h;
        let kv_elements = s * 2.0 * ctx * kv + x * 2.0 * img * kv;
        decode_work(self.decode_params(), self.weight_bytes, self.kv_bytes, b, attention, kv_elements)
    }
}

/// The sizes OpenFlamingo's accounting needs: its decoder (MPT or GPT-NeoX: multi-head attention, a 2-matrix MLP),
/// the checkpoint's gated blocks and vocabulary, and open_clip's ViT. The resampler (6 layers of 8 x 64 heads, 64
/// latents, 4x feed-forward) and the gated blocks' cross-attention (8 x 64 heads over an image's 64 latents, 4x
/// feed-forward) are fixed in OpenFlamingo's code.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenFlamingoDims {
    pub width: usize,
    pub layers: usize,
    pub mlp: usize,
    pub cross_blocks: usize,
    pub vocab: usize,
    /// MPT's LM head is its input embeddings; GPT-NeoX has its own.
    pub tied_head: bool,
    pub vision_width: usize,
    pub vision_layers: usize,
    pub vision_mlp: usize,
    pub patch_size: usize,
    pub patch_tokens: usize,
}

const OF_INNER: f64 = 512.0;
const OF_LATENTS: f64 = 64.0;
const OF_RESAMPLER_LAYERS: f64 = 6.0;

/// OpenFlamingo's accounting: open_clip's ViT over the patch tokens and CLS, the resampler, and every gated block's
/// K/V once per image (its 64 latents); prefill and decode through the decoder layers and gated blocks.
pub struct OpenFlamingoCosts {
    dims: OpenFlamingoDims,
    pub weight_bytes: f64,
    pub kv_bytes: f64,
}

impl OpenFlamingoCosts {
    pub fn new(dims: OpenFlamingoDims, weight_bytes: f64, kv_bytes: f64) -> Self {
        OpenFlamingoCosts { dims, weight_bytes, kv_bytes }
    }

    fn layer_params(&self) -> f64 {
        let (d, m) = (self.dims.width as f64, self.dims.mlp as f64);
        4.0 * d * d + 2.0 * d * m
    }

    /// A gated block's weights that rows read: to_q, to_out and the feed-forward.
    fn cross_row_params(&self) -> f64 {
        let d = self.dims.width as f64;
        2.0 * d * OF_INNER + 8.0 * d * d
    }

    /// A gated block's to_kv, run on image latents.
    fn cross_kv_params(&self) -> f64 {
        self.dims.vision_width as f64 * 2.0 * OF_INNER
    }

    fn cross_blocks(&self) -> f64 {
        self.dims.cross_blocks as f64
    }

    fn embedding_params(&self) -> f64 {
        (self.dims.vocab * self.dims.width) as f64
    }

    fn vision_layer_params(&self) -> f64 {
        let dv = self.dims.vision_width as f64;
        4.0 * dv * dv + 2.0 * dv * self.dims.vision_mlp as f64
    }

    fn vision_params(&self) -> f64 {
        let v = &self.dims;
        v.vision_layers as f64 * self.vision_layer_params() + (3 * v.patch_size * v.patch_size * v.vision_width) as f64
    }

    fn resampler_layer_params(&self) -> f64 {
        let dv = self.dims.vision_width as f64;
        3.0 * dv * OF_INNER + OF_INNER * dv + 8.0 * dv * dv
    }

    /// The resampler on one image: 64 latent queries over the patch tokens and the latents.
    fn resampler(&self) -> Work {
        let dv = self.dims.vision_width as f64;
        let kv_len = self.dims.patch_tokens as f64 + OF_LATENTS;
        let per_layer = 2.0 * OF_LATENTS * dv * OF_INNER
            + 4.0 * kv_len * dv * OF_INNER
            + 4.0 * OF_LATENTS * kv_len * OF_INNER
            + 2.0 * OF_LATENTS * OF_INNER * dv
            + 16.0 * OF_LATENTS * dv * dv;
        Work {
            flops: OF_RESAMPLER_LAYERS * per_layer,
            bytes: OF_RESAMPLER_LAYERS * self.resampler_layer_params() * self.weight_bytes,
        }
    }

    /// Every gated block's K/V of one image's latents.
    fn image_kv(&self) -> Work {
        let weights = self.cross_blocks() * self.cross_kv_params();
        Work { flops: 2.0 * OF_LATENTS * weights, bytes: weights * self.weight_bytes }
    }

    /// Parameters prefill and decode rows read: every layer, every gated block but its K/V, the LM head.
    fn row_params(&self) -> f64 {
        self.dims.layers as f64 * self.layer_params() + self.cross_blocks() * self.cross_row_params()
            + self.embedding_params()
    }
}

impl Floors for OpenFlamingoCosts {
    fn total_params(&self) -> f64 {
        let heads = if self.dims.tied_head { 1.0 } else { 2.0 };
        self.dims.layers as f64 * self.layer_params()
            + self.cross_blocks() * (self.cross_row_params() + self.cross_kv_params())
            + heads * self.embedding_params()
            + self.vision_params()
            + OF_RESAMPLER_LAYERS * self.resampler_layer_params()
            + OF_LATENTS * self.dims.vision_width as f64
    }

    fn decode_params(&self) -> f64 {
        self.row_params()
    }

    fn weight_bytes(&self) -> f64 {
        self.weight_bytes
    }

    fn vision(&self) -> Work {
        let v = &self.dims;
        let (n, dv) = ((v.patch_tokens + 1) as f64, v.vision_width as f64);
        Work {
            flops: v.vision_layers as f64 * (2.0 * n * self.vision_layer_params() + 4.0 * n * n * dv)
                + 2.0 * v.patch_tokens as f64 * (3 * v.patch_size * v.patch_size) as f64 * dv,
            bytes: self.vision_params() * self.weight_bytes,
        }
    }

    fn image_floor(&self, c: &Ceilings) -> f64 {
        self.vision().floor(c) + self.resampler().floor(c) + self.image_kv().floor(c)
    }

    fn prefill(&self, tokens: usize) -> Work {
        let (t, d) = (tokens as f64, self.dims.width as f64);
        let l = self.dims.layers as f64;
        let flops = 2.0 * t * (l * self.layer_params() + self.cross_blocks() * self.cross_row_params())
            + l * 2.0 * t * t * d
            + self.cross_blocks() * 4.0 * t * OF_LATENTS * OF_INNER
            + 2.0 * self.embedding_params();
        Work { flops, bytes: self.row_params() * self.weight_bytes }
    }

    /// The live weights once, each sequence's self-attention K/V and its image's latents' K/V in every gated block.
    fn decode_step(&self, batch: usize, context: usize) -> Work {
        let (b, ctx, d) = (batch as f64, context as f64, self.dims.width as f64);
        let (l, x) = (self.dims.layers as f64, self.cross_blocks());
        let attention = l * 4.0 * ctx * d + x * 4.0 * OF_LATENTS * OF_INNER;
        let kv_elements = l * 2.0 * ctx * d + x * 2.0 * OF_LATENTS * OF_INNER;
        decode_work(self.decode_params(), self.weight_bytes, self.kv_bytes, b, attention, kv_elements)
    }
}

/// A decode step of `batch` sequences, for any family: the live weights (`params` of `weight_bytes` each) read
/// once, each sequence doing `attention` FLOPs over `kv_elements` cached K/V elements of `kv_bytes` each.
fn decode_work(params: f64, weight_bytes: f64, kv_bytes: f64, batch: f64, attention: f64, kv_elements: f64) -> Work {
    Work {
        flops: batch * (2.0 * params + attention),
        bytes: params * weight_bytes + batch * kv_elements * kv_bytes,
    }
}

fn params(cfg: &IdeficsConfig) -> Params {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let v = &cfg.vision_config;
    let (dv, mv) = (v.embed_dim as f64, v.intermediate_size as f64);
    let p = &cfg.perceiver_config;
    let inner = (p.resampler_n_heads * p.resampler_head_dim) as f64;
    let perceiver_block = 3.0 * dv * inner + inner * dv + 8.0 * dv * dv;
    Params {
        decoder_layer: 4.0 * h * h + 3.0 * h * i,
        embed_and_head: 2.0 * cfg.total_vocab() as f64 * h,
        cross_qo: 2.0 * h * h,
        cross_kv: 2.0 * dv * h,
        cross_mlp: 3.0 * h * i,
        vision: v.num_hidden_layers as f64 * (4.0 * dv * dv + 2.0 * dv * mv)
            + (3 * v.patch_size * v.patch_size) as f64 * dv
            + v.num_positions() as f64 * dv,
        perceiver: match cfg.use_resampler {
            true => p.resampler_depth as f64 * perceiver_block + p.resampler_n_latents as f64 * dv,
            false => 0.0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::idefics::synthetic::Preset;

    fn close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance * expected.abs(),
            "{actual} vs {expected}"
        );
    }

    /// The numbers `shared/docs/perf_floors.py` prints for idefics-9b (its vocabulary leaves out the 2 additional
    /// tokens, hence the small tolerance).
    #[test]
    fn idefics_9b_matches_perf_floors_py() {
        let cfg = Preset::Idefics9b.config().unwrap();
        let c = Costs::new(&cfg, 2.0, 2.0);
        close(c.total_params(), 8.928e9, 1e-3);
        close(c.decode_params() * 2.0, 15.92e9, 1e-3);
        close(c.vision().flops, 334.6e9, 1e-3);
        close(c.perceiver().flops, 29.0e9, 2e-3);
        close(c.prefill(64).flops, 1014e9, 1e-3);
        let h200 = Ceilings {
            copy_bytes_per_s: 4.3e12,
            matmul_flops_per_s: 790e12,
            method: String::new(),
        };
        close(c.decode_step(1, 0).floor(&h200) * 1e3, 3.70, 2e-3);
        close(c.vision().floor(&h200) * 1e3, 0.42, 1e-2);
    }

    /// OpenFlamingo-9B (vitl-mpt7b): the parameter count of every tensor of the checkpoint as `flamingo convert`
    /// lays it out (tests/real_scale.rs lists them: 8,131,465,232; the floors leave out norms, biases, the CLS and
    /// position embeddings and open_clip's unused projection), and the decode step's weights.
    #[test]
    fn openflamingo_9b_counts_the_checkpoints_parameters() {
        let dims = OpenFlamingoDims {
            width: 4096, layers: 32, mlp: 16384, cross_blocks: 8, vocab: 50280, tied_head: true,
            vision_width: 1024, vision_layers: 24, vision_mlp: 4096, patch_size: 14, patch_tokens: 256,
        };
        let c = OpenFlamingoCosts::new(dims, 2.0, 2.0);
        close(c.total_params(), 8_131_465_232.0, 3e-4);
        // MPT-7B's layers (6.44e9), the gated blocks' q/out/feed-forward (1.11e9) and the tied head (0.21e9).
        close(c.decode_params(), 7.757e9, 1e-3);
    }

    /// Llama 3.2 11B Vision: the parameter count of the real checkpoint (tests/data/mllama-11b-shapes.json,
    /// 10,670,220,835; the floors leave out norms and biases).
    #[test]
    fn mllama_11b_counts_the_checkpoints_parameters() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mllama-11b-config.json");
        let cfg = MllamaConfig::from_file(&path).unwrap();
        let c = MllamaCosts::new(&cfg, 2.0, 2.0);
        close(c.total_params(), 10_670_220_835.0, 1e-4);
        // A decode step reads every decoder weight but the cross-attention K/V projections, and one LM head.
        assert!(c.decode_params() < c.total_params() - c.vision_params());
        assert!(c.vision().flops > 1e12, "four padded tiles through 40 layers");
    }
}
