//! `MllamaVisionModel` (transformers `modeling_mllama.py`), following Meta's reference where transformers 5.23
//! deviates (intermediate features are the INPUTS of the listed local layers):
//!
//! ```text
//! tiles [T, 3, S, S] -> conv (im2col + linear) -> + tanh(g_pre) * pre_tile[ar][t]  -> [CLS ; patches]  (P tokens)
//!   -> + (1 - tanh g) * pos[p] + tanh g * tile_pos[ar][t, p] -> layernorm_pre -> pad each tile to P_pad (8k)
//!   -> local layers (one sequence of T * P_pad tokens; padding attends only to real tokens), inputs kept
//!   -> layernorm_post -> + tanh(g_post) * post_tile[ar][t] -> global layers (tanh-gated branches)
//!   -> drop padding -> [global | intermediates interleaved] -> multi_modal_projector
//! ```
//! Every image runs all `max_num_tiles` tiles (the unused ones are zero pixels), as transformers does. The tile
//! and position tables are read on the host: they are added once per image.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::config::Activation;
use crate::io::mllama_config::MllamaVisionConfig;
use crate::io::image::PreparedImage;
use crate::model::layers::{im2col, LayerNorm, Linear, WeightLoader};

struct MllamaVisionEncoderLayer<B: Backend> {
    input_layernorm: LayerNorm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    post_attention_layernorm: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    /// `gate_attn`, `gate_ffn` of a global layer; a local layer adds its branches ungated.
    gates: Option<(B::Weight, B::Weight)>,
}

/// The rows of one image's token sequence that are real (tile in use, position below P) or padding: real rows
/// attend to every row, padding rows only to real ones (transformers' outer-product mask).
struct TokenMask {
    real: Vec<usize>,
    /// Per row: its row in `[attention over all ; attention over real keys]`.
    pick: Vec<usize>,
}

impl TokenMask {
    fn new(tiles_used: usize, tiles: usize, p: usize, p_pad: usize) -> Self {
        let rows = tiles * p_pad;
        let is_real = |r: usize| r / p_pad < tiles_used && r % p_pad < p;
        TokenMask {
            real: (0..rows).filter(|&r| is_real(r)).collect(),
            pick: (0..rows)
                .map(|r| if is_real(r) { r } else { rows + r })
                .collect(),
        }
    }
}

/// Host copies of the small tables added once per image.
struct Embeddings {
    class_embedding: Vec<f32>,
    /// `[P, D]`.
    position: Vec<f32>,
    /// `[ratios + 1, T * P * D]`.
    tile_position: Vec<f32>,
    position_gate: f32,
    /// `[ratios + 1, T * D]` each.
    pre_tile: Vec<f32>,
    pre_tile_gate: f32,
    post_tile: Vec<f32>,
    post_tile_gate: f32,
}

pub struct MllamaVisionModel<B: Backend> {
    cfg: MllamaVisionConfig,
    patch_embedding: B::Weight,
    embeddings: Embeddings,
    layernorm_pre: LayerNorm<B>,
    layernorm_post: LayerNorm<B>,
    transformer: Vec<MllamaVisionEncoderLayer<B>>,
    global_transformer: Vec<MllamaVisionEncoderLayer<B>>,
}

/// What the golden tests compare, per image: `[T * P, D]` after layernorm_pre, `[T * P_pad, D]` after the local
/// and global transformers, and `[T * P, vision_output_dim]` before the projector.
pub struct VisionTrace<B: Backend> {
    pub embeddings: B::Tensor,
    pub local_output: B::Tensor,
    pub global_output: B::Tensor,
    pub last_hidden_state: B::Tensor,
}

fn host<B: Backend>(b: &B, w: &B::Weight) -> Vec<f32> {
    b.to_host(&b.weight_to_tensor(w))
}

impl<B: Backend> MllamaVisionModel<B> {
    pub fn load(l: &WeightLoader<B>, prefix: &str, cfg: &MllamaVisionConfig) -> Result<Self> {
        let (d, t, p) = (cfg.hidden_size, cfg.max_num_tiles, cfg.tokens_per_tile());
        let ratios = cfg.supported_aspect_ratios.len() + 1;
        let b = l.backend;
        let table = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            Ok(host(b, &l.weight(&format!("{prefix}.{name}"), shape)?))
        };
        let gate = |name: &str| -> Result<f32> { Ok(table(name, &[1])?[0].tanh()) };
        let embeddings = Embeddings {
            class_embedding: table("class_embedding", &[d])?,
            position: table("gated_positional_embedding.embedding", &[p, d])?,
            tile_position: table(
                "gated_positional_embedding.tile_embedding.weight",
                &[ratios, t * p * d],
            )?,
            position_gate: gate("gated_positional_embedding.gate")?,
            pre_tile: table("pre_tile_positional_embedding.embedding.weight", &[ratios, t * d])?,
            pre_tile_gate: gate("pre_tile_positional_embedding.gate")?,
            post_tile: table("post_tile_positional_embedding.embedding.weight", &[ratios, t * d])?,
            post_tile_gate: gate("post_tile_positional_embedding.gate")?,
        };
        let layers = |group: &str, n: usize, gated: bool| {
            (0..n)
                .map(|i| load_layer(l, &format!("{prefix}.{group}.layers.{i}"), cfg, gated))
                .collect::<Result<Vec<_>>>()
        };
        Ok(MllamaVisionModel {
            patch_embedding: l.weight(
                &format!("{prefix}.patch_embedding.weight"),
                &[d, 3, cfg.patch_size, cfg.patch_size],
            )?,
            embeddings,
            // nn.LayerNorm's default eps, not norm_eps (transformers and Meta alike).
            layernorm_pre: l.layer_norm(&format!("{prefix}.layernorm_pre"), d, 1e-5)?,
            layernorm_post: l.layer_norm(&format!("{prefix}.layernorm_post"), d, 1e-5)?,
            transformer: layers("transformer", cfg.num_hidden_layers, false)?,
            global_transformer: layers("global_transformer", cfg.num_global_layers, true)?,
            cfg: cfg.clone(),
        })
    }

    /// One image's vision features before the projector, `[T * P, vision_output_dim]`, with the intermediate
    /// states the goldens record.
    pub fn forward(&self, b: &B, image: &PreparedImage) -> Result<VisionTrace<B>> {
        let cfg = &self.cfg;
        let (d, t, p, p_pad) = (
            cfg.hidden_size,
            cfg.max_num_tiles,
            cfg.tokens_per_tile(),
            cfg.padded_tokens_per_tile(),
        );
        let ar = cfg.aspect_ratio_id(image.tiles).ok_or_else(|| {
            Error::Invalid(format!(
                "image tiled {}x{} is not one of vision_config.supported_aspect_ratios {:?}",
                image.tiles.0, image.tiles.1, cfg.supported_aspect_ratios
            ))
        })?;
        let tile_len = 3 * cfg.image_size * cfg.image_size;
        if image.pixels.len() != t * tile_len {
            return Err(Error::Invalid(format!(
                "an image has {} pixel values, the vision tower takes {t} tiles of {tile_len}",
                image.pixels.len()
            )));
        }
        let patches: Vec<f32> = image
            .pixels
            .chunks(tile_len)
            .flat_map(|tile| im2col(tile, cfg.image_size, cfg.patch_size))
            .collect();
        let grid = cfg.image_size / cfg.patch_size;
        let patches = b.from_host(patches, t * grid * grid, 3 * cfg.patch_size * cfg.patch_size);
        let patch_tokens = b.to_host(&b.linear(&patches, &self.patch_embedding, None));
        let embedded = self.embed(&patch_tokens, ar);
        let embeddings = self.layernorm_pre.forward(b, &b.from_host(embedded, t * p, d));
        let padded = pad_tiles(&b.to_host(&embeddings), t, p, p_pad, d);
        let mask = TokenMask::new(image.num_tiles(), t, p, p_pad);
        let mut h = b.from_host(padded, t * p_pad, d);
        let mut intermediate = Vec::new();
        for (i, layer) in self.transformer.iter().enumerate() {
            if cfg.intermediate_layers_indices.contains(&i) {
                intermediate.push((i, b.to_host(&h)));
            }
            h = self.encoder_layer(b, layer, h, &mask);
        }
        let local_output = b.slice_rows(&h, 0, t * p_pad);
        let mut h = self.layernorm_post.forward(b, &h);
        let mut post = b.to_host(&h);
        self.add_tile_table(&mut post, &self.embeddings.post_tile, self.embeddings.post_tile_gate, ar, p_pad);
        h = b.from_host(post, t * p_pad, d);
        for layer in &self.global_transformer {
            h = self.encoder_layer(b, layer, h, &mask);
        }
        // Features in the order of intermediate_layers_indices, however the config lists them.
        let features: Vec<&[f32]> = cfg
            .intermediate_layers_indices
            .iter()
            .map(|i| {
                intermediate
                    .iter()
                    .find(|(j, _)| j == i)
                    .map(|(_, x)| x.as_slice())
                    .expect("every listed layer's input was kept")
            })
            .collect();
        let last = concat_features(&b.to_host(&h), &features, t, p, p_pad, d);
        Ok(VisionTrace {
            embeddings,
            local_output,
            global_output: h,
            last_hidden_state: b.from_host(last, t * p, cfg.vision_output_dim),
        })
    }

    /// Patch tokens `[T * g², D]` to the embedded tokens `[T * P, D]`: pre-tile embedding, CLS, gated positions.
    fn embed(&self, patch_tokens: &[f32], ar: usize) -> Vec<f32> {
        let e = &self.embeddings;
        let (d, t, p) = (self.cfg.hidden_size, self.cfg.max_num_tiles, self.cfg.tokens_per_tile());
        let mut patches = patch_tokens.to_vec();
        self.add_tile_table(&mut patches, &e.pre_tile, e.pre_tile_gate, ar, p - 1);
        let mut out = Vec::with_capacity(t * p * d);
        for tile in patches.chunks((p - 1) * d) {
            out.extend_from_slice(&e.class_embedding);
            out.extend_from_slice(tile);
        }
        let tile_pos = &e.tile_position[ar * t * p * d..(ar + 1) * t * p * d];
        let g = e.position_gate;
        for (i, x) in out.iter_mut().enumerate() {
            *x = *x + (1.0 - g) * e.position[i % (p * d)];
            *x = *x + g * tile_pos[i];
        }
        out
    }

    /// `x [T * per_tile, D] += gate * table[ar][tile]`: one D-wide row per tile, on each of its tokens.
    fn add_tile_table(&self, x: &mut [f32], table: &[f32], gate: f32, ar: usize, per_tile: usize) {
        let (d, t) = (self.cfg.hidden_size, self.cfg.max_num_tiles);
        let rows = &table[ar * t * d..(ar + 1) * t * d];
        for (r, row) in x.chunks_mut(d).enumerate() {
            let e = &rows[(r / per_tile) * d..(r / per_tile + 1) * d];
            for (v, &a) in row.iter_mut().zip(e) {
                *v += gate * a;
            }
        }
    }

    fn encoder_layer(
        &self,
        b: &B,
        layer: &MllamaVisionEncoderLayer<B>,
        mut h: B::Tensor,
        mask: &TokenMask,
    ) -> B::Tensor {
        let x = layer.input_layernorm.forward(b, &h);
        let (q, k, v) = (
            layer.q_proj.forward(b, &x),
            layer.k_proj.forward(b, &x),
            layer.v_proj.forward(b, &x),
        );
        let heads = self.cfg.attention_heads;
        let all = b.attention(&q, &k, &v, heads);
        let real = b.attention(
            &q,
            &b.gather_rows(&k, &mask.real),
            &b.gather_rows(&v, &mask.real),
            heads,
        );
        let a = b.gather_rows(&b.concat_rows(&all, &real), &mask.pick);
        let attn = layer.o_proj.forward(b, &a);
        match &layer.gates {
            Some((g, _)) => b.add_gated(&mut h, &attn, g),
            None => b.add_assign(&mut h, &attn),
        }
        let m = layer.fc1.forward_activated(b, &layer.post_attention_layernorm.forward(b, &h), Activation::Gelu);
        let m = layer.fc2.forward(b, &m);
        match &layer.gates {
            Some((_, g)) => b.add_gated(&mut h, &m, g),
            None => b.add_assign(&mut h, &m),
        }
        h
    }
}

fn load_layer<B: Backend>(
    l: &WeightLoader<B>,
    prefix: &str,
    cfg: &MllamaVisionConfig,
    gated: bool,
) -> Result<MllamaVisionEncoderLayer<B>> {
    let (d, m) = (cfg.hidden_size, cfg.intermediate_size);
    let eps = cfg.norm_eps as f32;
    Ok(MllamaVisionEncoderLayer {
        input_layernorm: l.layer_norm(&format!("{prefix}.input_layernorm"), d, eps)?,
        q_proj: l.linear(&format!("{prefix}.self_attn.q_proj"), d, d)?,
        k_proj: l.linear(&format!("{prefix}.self_attn.k_proj"), d, d)?,
        v_proj: l.linear(&format!("{prefix}.self_attn.v_proj"), d, d)?,
        o_proj: l.linear(&format!("{prefix}.self_attn.o_proj"), d, d)?,
        post_attention_layernorm: l.layer_norm(&format!("{prefix}.post_attention_layernorm"), d, eps)?,
        fc1: l.linear_bias(&format!("{prefix}.mlp.fc1"), m, d)?,
        fc2: l.linear_bias(&format!("{prefix}.mlp.fc2"), d, m)?,
        gates: if gated {
            Some((
                l.weight(&format!("{prefix}.gate_attn"), &[1])?,
                l.weight(&format!("{prefix}.gate_ffn"), &[1])?,
            ))
        } else {
            None
        },
    })
}

/// `[T * P, D]` to `[T * P_pad, D]`, zeros after each tile's P tokens.
fn pad_tiles(x: &[f32], t: usize, p: usize, p_pad: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; t * p_pad * d];
    for tile in 0..t {
        out[tile * p_pad * d..(tile * p_pad + p) * d]
            .copy_from_slice(&x[tile * p * d..(tile + 1) * p * d]);
    }
    out
}

/// The vision output without padding, `[T * P, D * (1 + k)]`: the global output, then the k intermediate
/// features interleaved (`torch.stack(dim=-1)`: column `D + c * k + j` is feature `c` of intermediate `j`).
fn concat_features(
    global: &[f32],
    features: &[&[f32]],
    t: usize,
    p: usize,
    p_pad: usize,
    d: usize,
) -> Vec<f32> {
    let k = features.len();
    let width = d * (1 + k);
    let mut out = vec![0f32; t * p * width];
    for tile in 0..t {
        for pos in 0..p {
            let src = (tile * p_pad + pos) * d;
            let row = &mut out[(tile * p + pos) * width..(tile * p + pos + 1) * width];
            row[..d].copy_from_slice(&global[src..src + d]);
            for c in 0..d {
                for (j, f) in features.iter().enumerate() {
                    row[d + c * k + j] = f[src + c];
                }
            }
        }
    }
    out
}
