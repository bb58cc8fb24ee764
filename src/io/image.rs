//! Image preprocessing identical to transformers' PIL path for IDEFICS (`IdeficsImageProcessorPil`):
//! decode -> RGB (alpha composited over white, as IDEFICS' `convert_to_rgb` does) -> resize straight to
//! `image_size`² with Pillow's bicubic resampler -> x / 255 -> (x - mean) / std, laid out [3, H, W].
//!
//! The resampler is a re-implementation of Pillow's `ImagingResample` for 8-bit images (Resample.c): separable,
//! horizontal pass then vertical pass, filter support widened by the downscale factor (antialiasing), coefficients
//! quantised to 22 fractional bits and each pass rounded and clipped to 8 bits. Matching those integer steps is what
//! keeps us within one level in 255 of transformers on every pixel.

use std::io::Read;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use image::{DynamicImage, ImageReader};

use crate::error::{Error, Result};
use crate::io::config::PreprocessorConfig;

/// Pixels of one image at most, by default: 50 Mpx (an 8192 x 6144 photograph). Decoding one that size takes at
/// most [`decode_bytes`] = 350 MB at its peak (the decoder's RGBA buffer and our RGB copy); the model sees it at
/// 224 x 224 whatever its size.
pub const DEFAULT_MAX_PIXELS: u64 = 50_000_000;

/// Bytes of metadata (ICC profiles, text, EXIF) a decoder may hold beside the pixels.
const METADATA_BYTES: u64 = 16 << 20;

/// One image as its family's preprocessor leaves it: the pixels the vision tower reads (IDEFICS: `[3, S, S]`;
/// Llama 3.2 Vision: `[max_image_tiles, 3, tile, tile]`) and the grid of tiles the image fills ((1, 1) when the
/// family does not tile).
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedImage {
    pub pixels: Vec<f32>,
    pub tiles: (usize, usize),
}

impl PreparedImage {
    /// An untiled image.
    pub fn whole(pixels: Vec<f32>) -> Self {
        PreparedImage {
            pixels,
            tiles: (1, 1),
        }
    }

    pub fn num_tiles(&self) -> usize {
        self.tiles.0 * self.tiles.1
    }
}

/// An 8-bit RGB image, pixels interleaved row-major.
#[derive(Clone, Debug)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Peak bytes that decoding a `pixels`-pixel image to RGB takes: the decoder's RGBA buffer, our RGB copy, and the
/// metadata the decoder may hold.
pub fn decode_bytes(pixels: u64) -> u64 {
    pixels.saturating_mul(4 + 3).saturating_add(METADATA_BYTES)
}

/// Memory that image decodes may hold at once, shared by every request being prepared: a decode waits until its
/// peak ([`decode_bytes`]) fits, so many large images in flight queue instead of exhausting memory.
#[derive(Debug)]
pub struct DecodeBudget {
    total: u64,
    free: Mutex<u64>,
    freed: Condvar,
}

impl DecodeBudget {
    pub fn new(total: u64) -> Self {
        DecodeBudget {
            total,
            free: Mutex::new(total),
            freed: Condvar::new(),
        }
    }

    /// Holds `bytes` of the budget until the guard drops; waits while other decodes hold too much.
    fn reserve(&self, bytes: u64) -> Reservation<'_> {
        let bytes = bytes.min(self.total);
        let mut free = self.free.lock().expect("decode budget lock");
        while *free < bytes {
            free = self.freed.wait(free).expect("decode budget lock");
        }
        *free -= bytes;
        Reservation {
            budget: self,
            bytes,
        }
    }
}

struct Reservation<'a> {
    budget: &'a DecodeBudget,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.budget.free.lock().expect("decode budget lock") += self.bytes;
        self.budget.freed.notify_all();
    }
}

/// What one image may cost to decode.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits<'a> {
    /// Pixels of the image, and of any frame in it (a GIF frame may be larger than its logical screen).
    pub max_pixels: u64,
    /// Memory shared with other decodes, if any.
    pub budget: Option<&'a DecodeBudget>,
}

impl DecodeLimits<'_> {
    pub fn pixels(max_pixels: u64) -> DecodeLimits<'static> {
        DecodeLimits {
            max_pixels,
            budget: None,
        }
    }
}

/// Reads an image file: only a regular file, and only up to `max_bytes` (`/dev/zero` or a FIFO is refused, not
/// read until memory runs out or forever).
pub fn read_image_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let err = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    crate::io::files::regular_file(path, max_bytes).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidInput => {
            err(source.to_string())
        }
        e => e,
    })?;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max_bytes + 1).read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(err(format!(
            "grew past the limit of {max_bytes} bytes while read"
        )));
    }
    Ok(bytes)
}

/// Image files larger than this are not read (PNG at its worst stores 4 bytes a pixel, plus metadata).
pub fn max_file_bytes(limits: &DecodeLimits) -> u64 {
    decode_bytes(limits.max_pixels)
}

/// Decodes PNG, JPEG, WebP or GIF (first frame) and converts it to RGB, within `limits`.
pub fn load_rgb(path: &Path, limits: &DecodeLimits) -> Result<Rgb8> {
    load_image(path, limits).map(to_rgb)
}

/// [`load_rgb`] keeping the image in the decoder's own form (with its alpha channel, where it has one).
pub fn load_image(path: &Path, limits: &DecodeLimits) -> Result<DynamicImage> {
    let bytes = read_image_file(path, max_file_bytes(limits))?;
    decode(&bytes, path, limits)
}

/// Decodes an encoded image (PNG, JPEG, WebP, GIF; format from its bytes) to RGB. Refuses empty images and ones
/// over `limits.max_pixels` from their header, then decodes with the decoder's own allocation limit set to what
/// such an image needs, so a frame larger than its header says, or metadata chunks that inflate, are refused
/// while decoding instead of allocated. `source` names it in errors (a file, or e.g. a request's image part).
pub fn decode_rgb(bytes: &[u8], source: &Path, limits: &DecodeLimits) -> Result<Rgb8> {
    decode(bytes, source, limits).map(to_rgb)
}

/// [`decode_rgb`] keeping the image in the decoder's own form (with its alpha channel, where it has one).
pub fn decode(bytes: &[u8], source: &Path, limits: &DecodeLimits) -> Result<DynamicImage> {
    let err = |message: String| Error::Image {
        path: source.to_path_buf(),
        message,
    };
    if bytes.is_empty() {
        return Err(err("the image is empty (0 bytes)".into()));
    }
    // Each pass with the decoder's own allocation limit: metadata only for the header, then what an image of
    // this size needs. (A PNG's oversized ICC profile is cut off at the limit and dropped, never inflated whole.)
    let reader = |max_alloc: u64| {
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(max_alloc);
        let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::io(source, e))?;
        reader.limits(limits);
        Ok::<_, Error>(reader)
    };
    let (w, h) = reader(METADATA_BYTES)?
        .into_dimensions()
        .map_err(|e| err(format!("cannot read the image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(err(format!(
            "the image is {w}x{h} pixels: nothing to look at"
        )));
    }
    let pixels = w as u64 * h as u64;
    let max = limits.max_pixels;
    if pixels > max {
        return Err(err(format!(
            "the image is {w}x{h} = {pixels} pixels, over the limit of {max} (--max-image-pixels)"
        )));
    }
    let _held = limits.budget.map(|b| b.reserve(decode_bytes(pixels)));
    // The decoder's buffers: an RGBA frame of this image's size (a frame larger than the header's screen is
    // refused), and metadata.
    let decoded = reader(pixels * 4 + METADATA_BYTES)?.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => err(format!(
            "decoding needs more memory than a {w}x{h} image may take (--max-image-pixels {max}): a frame \
             larger than the header says, or oversized metadata ({e})"
        )),
        e => err(format!("cannot decode: {e}")),
    })?;
    Ok(decoded)
}

pub fn to_rgb(img: DynamicImage) -> Rgb8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = match img {
        DynamicImage::ImageRgb8(rgb) => rgb.into_raw(),
        DynamicImage::ImageLuma8(l) => l.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        other => other
            .to_rgba8()
            .pixels()
            .flat_map(|p| composite_over_white(p.0))
            .collect(),
    };
    Rgb8 {
        width,
        height,
        data,
    }
}

/// Pillow's `alpha_composite(white, src)` (AlphaComposite.c) for an opaque white destination.
fn composite_over_white([r, g, b, a]: [u8; 4]) -> [u8; 3] {
    if a == 0 {
        return [255, 255, 255];
    }
    const PRECISION_BITS: u32 = 7;
    let a = a as u32;
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let shift_div255 = |v: u32| ((v >> 8) + v) >> 8;
    let mix = |c: u8| {
        let tmp = c as u32 * coef1 + 255 * coef2;
        (shift_div255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    };
    [mix(r), mix(g), mix(b)]
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling filters: support (in input pixels at scale 1) and kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Bicubic => bicubic(x),
        }
    }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: the first input index and the fixed-point weights of the inputs it reads.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` samples to `out_size`.
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero, then clamp: kept verbatim so the windows match Pillow's.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            *kx = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *kx;
        }
        for x in 0..xmax {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// An 8-bit image of `channels` interleaved channels, row-major: what the resampler works on (RGB, or
/// premultiplied RGBA).
#[derive(Clone, Debug)]
pub struct Interleaved8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

/// One separable pass over an interleaved image: along x when `horizontal`, else along y.
fn resample_pass(src: &Interleaved8, out_w: usize, out_h: usize, horizontal: bool, filter: Filter) -> Interleaved8 {
    let coeffs = if horizontal {
        precompute_coeffs(src.width, out_w, filter)
    } else {
        precompute_coeffs(src.height, out_h, filter)
    };
    let ch = src.channels;
    let mut data = vec![0u8; out_w * out_h * ch];
    for y in 0..out_h {
        for x in 0..out_w {
            let o = if horizontal { x } else { y };
            let (min, len) = coeffs.bounds[o];
            let k = &coeffs.weights[o * coeffs.ksize..o * coeffs.ksize + len];
            for c in 0..ch {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    let (sx, sy) = if horizontal {
                        (min + i, y)
                    } else {
                        (x, min + i)
                    };
                    acc += src.data[(sy * src.width + sx) * ch + c] as i64 * w as i64;
                }
                data[(y * out_w + x) * ch + c] = clip8(acc);
            }
        }
    }
    Interleaved8 {
        width: out_w,
        height: out_h,
        channels: ch,
        data,
    }
}

/// Pillow's `Image.resize((w, h), filter)` of an interleaved image: horizontal pass first, each pass only where
/// the size changes.
pub fn resize_interleaved(img: Interleaved8, out_w: usize, out_h: usize, filter: Filter) -> Interleaved8 {
    let mut cur = img;
    if out_w != cur.width {
        cur = resample_pass(&cur, out_w, cur.height, true, filter);
    }
    if out_h != cur.height {
        cur = resample_pass(&cur, out_w, out_h, false, filter);
    }
    cur
}

/// Pillow's `Image.resize((w, h), filter)` of an RGB image.
pub fn resize(img: &Rgb8, out_w: usize, out_h: usize, filter: Filter) -> Rgb8 {
    let view = Interleaved8 {
        width: img.width,
        height: img.height,
        channels: 3,
        data: img.data.clone(),
    };
    let out = resize_interleaved(view, out_w, out_h, filter);
    Rgb8 {
        width: out.width,
        height: out.height,
        data: out.data,
    }
}

/// Resized, rescaled and normalised pixels, [3, size, size] channel-major: what the vision encoder reads.
pub fn preprocess(img: &Rgb8, cfg: &PreprocessorConfig) -> Vec<f32> {
    let n = cfg.image_size;
    let resized = resize(img, n, n, Filter::Bicubic);
    let mut out = vec![0f32; 3 * n * n];
    for c in 0..3 {
        for i in 0..n * n {
            let v = resized.data[i * 3 + c] as f32 * cfg.rescale_factor;
            out[c * n * n + i] = (v - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(451, 32), (32, 32), (10, 42), (300, 224)] {
            let c = precompute_coeffs(i, o, Filter::Bicubic);
            for x in 0..o {
                let s: i64 = c.weights[x * c.ksize..(x + 1) * c.ksize]
                    .iter()
                    .map(|&w| w as i64)
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= c.ksize as i64,
                    "{i}->{o} at {x}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = Rgb8 {
            width: 37,
            height: 23,
            data: vec![200; 37 * 23 * 3],
        };
        let out = resize(&img, 16, 16, Filter::Bicubic);
        assert!(out.data.iter().all(|&v| v == 200));
    }

    #[test]
    fn transparent_pixels_become_white_and_opaque_stay() {
        assert_eq!(composite_over_white([10, 20, 30, 0]), [255, 255, 255]);
        assert_eq!(composite_over_white([10, 20, 30, 255]), [10, 20, 30]);
        let half = composite_over_white([0, 0, 0, 128]);
        assert!((126..=128).contains(&half[0]), "{half:?}");
    }
}
