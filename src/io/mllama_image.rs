//! Image preprocessing identical to transformers' PIL path for Llama 3.2 Vision (`MllamaImageProcessorPil`):
//! best-fit canvas of square tiles, bilinear resize that keeps the aspect ratio, zero padding bottom and right,
//! rescale and CLIP normalisation, tiles cut row-major and packed to `max_image_tiles` with all-zero extra tiles.

use crate::io::image::{resize, Filter, PreparedImage, Rgb8};
use crate::io::mllama_config::{tile_grids, MllamaPreprocessorConfig};

/// `get_optimal_tiled_canvas`: the grid whose canvas needs the least upscaling (or, if every canvas is smaller,
/// the least downscaling), ties to the smallest area; returns (rows, columns) of tiles.
pub fn optimal_grid(height: usize, width: usize, tile: usize, max_tiles: usize) -> (usize, usize) {
    let grids = tile_grids(max_tiles);
    let scale = |&(h, w): &(usize, usize)| {
        let sh = (h * tile) as f64 / height as f64;
        let sw = (w * tile) as f64 / width as f64;
        sh.min(sw)
    };
    let scales: Vec<f64> = grids.iter().map(scale).collect();
    let up = scales.iter().copied().filter(|&s| s >= 1.0).reduce(f64::min);
    let chosen = up.unwrap_or_else(|| scales.iter().copied().fold(f64::MIN, f64::max));
    grids
        .iter()
        .zip(&scales)
        .filter(|(_, &s)| s == chosen)
        .map(|(g, _)| *g)
        .min_by_key(|&(h, w)| h * w)
        .expect("the chosen scale is one of the grids'")
}

/// `get_image_size_fit_to_canvas`: (height, width) after resizing into a `canvas_h` x `canvas_w` canvas, the
/// aspect ratio kept, never below one tile (an image already between tile and canvas size keeps its size).
pub fn fit_to_canvas(
    height: usize,
    width: usize,
    canvas_h: usize,
    canvas_w: usize,
    tile: usize,
) -> (usize, usize) {
    let target_w = width.clamp(tile, canvas_w);
    let target_h = height.clamp(tile, canvas_h);
    let scale_h = target_h as f64 / height as f64;
    let scale_w = target_w as f64 / width as f64;
    let floor_or_one = |x: f64| (x.floor() as usize).max(1);
    if scale_w < scale_h {
        (floor_or_one(height as f64 * scale_w).min(target_h), target_w)
    } else {
        (target_h, floor_or_one(width as f64 * scale_h).min(target_w))
    }
}

/// Tiles an RGB image as the processor does.
pub fn preprocess(img: &Rgb8, cfg: &MllamaPreprocessorConfig) -> PreparedImage {
    let tile = cfg.tile_size;
    let grid = optimal_grid(img.height, img.width, tile, cfg.max_image_tiles);
    let (canvas_h, canvas_w) = (grid.0 * tile, grid.1 * tile);
    let (h, w) = fit_to_canvas(img.height, img.width, canvas_h, canvas_w, tile);
    let resized = resize(img, w, h, Filter::Bilinear);
    let mut pixels = vec![0f32; cfg.max_image_tiles * 3 * tile * tile];
    // Padding is zero in uint8, so it normalises to -mean/std like any black pixel.
    let value = |y: usize, x: usize, c: usize| -> f32 {
        let u8v = if y < h && x < w {
            resized.data[(y * w + x) * 3 + c]
        } else {
            0
        };
        let scaled = (u8v as f64 * cfg.rescale_factor) as f32;
        (scaled - cfg.image_mean[c]) / cfg.image_std[c]
    };
    for r in 0..grid.0 {
        for col in 0..grid.1 {
            let t = r * grid.1 + col;
            for c in 0..3 {
                for y in 0..tile {
                    for x in 0..tile {
                        pixels[((t * 3 + c) * tile + y) * tile + x] =
                            value(r * tile + y, col * tile + x, c);
                    }
                }
            }
        }
    }
    PreparedImage {
        pixels,
        tiles: grid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_in_transformers_order() {
        assert_eq!(
            tile_grids(4),
            vec![(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
        );
    }

    #[test]
    fn an_image_beyond_every_canvas_shrinks_into_the_largest_that_fits_best() {
        // 1000x50 wants far more than 4 tiles: transformers downscales into the widest canvas, keeping the ratio.
        assert_eq!(optimal_grid(50, 1000, 56, 4), (1, 4));
        assert_eq!(fit_to_canvas(50, 1000, 56, 224, 56), (11, 224));
        assert_eq!(optimal_grid(3000, 20, 56, 4), (4, 1));
        assert_eq!(fit_to_canvas(3000, 20, 224, 56, 56), (224, 1));
    }

    #[test]
    fn canvas_choice_matches_the_fixtures() {
        // tiny-mllama-a/b (golden.json image_tiling).
        assert_eq!(optimal_grid(64, 128, 56, 4), (1, 2));
        assert_eq!(fit_to_canvas(64, 128, 56, 112, 56), (56, 112));
        assert_eq!(optimal_grid(155, 40, 28, 4), (4, 1));
        assert_eq!(fit_to_canvas(155, 40, 112, 28, 28), (108, 28));
        assert_eq!(optimal_grid(22, 20, 28, 4), (1, 1));
        assert_eq!(fit_to_canvas(22, 20, 28, 28, 28), (28, 25));
        assert_eq!(optimal_grid(64, 70, 28, 4), (2, 2));
        assert_eq!(fit_to_canvas(64, 70, 56, 56, 28), (51, 56));
    }
}
