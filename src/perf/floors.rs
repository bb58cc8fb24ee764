//! Roofline floors: the FLOPs each stage of an IDEFICS model must do and the fewest bytes it must move, from its
//! configuration, so that a measured time can be set beside the least time the hardware allows
//! (`max(FLOPs / matmul FLOP/s, bytes / copy bandwidth)`, per stage). The accounting is that of
//! `shared/docs/perf_floors.py` (FLOPs = 2 per multiply-add; norms, biases and element-wise ops left out), made
//! general over configurations; for idefics-9b it gives that script's numbers (tested).

use crate::backend::Ceilings;
use crate::io::config::IdeficsConfig;

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
        Work {
            flops: b * (2.0 * self.decode_params() + attention),
            bytes: self.decode_params() * self.weight_bytes + b * kv_elements * self.kv_bytes,
        }
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
}
