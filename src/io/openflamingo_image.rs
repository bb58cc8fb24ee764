//! Image preprocessing identical to open_clip 2.20.0's eval transform as OpenFlamingo uses it
//! (`image_transform(image_size, is_train=False)`, transform.py L119-132): torchvision's `Resize(S, BICUBIC)` of the
//! short side (the long side `int(S * long / short)`) by Pillow's resampler in the image's own mode (an image with
//! alpha premultiplied, as Pillow resizes RGBA), `CenterCrop(S)` at `round((L - S) / 2)` (half to even, Python's
//! `round`), then `convert('RGB')`, which drops alpha without compositing, `ToTensor` (/255) and `Normalize` with
//! OpenAI's mean and std, in f32. The decoder has already expanded palette images, which Pillow would resize
//! with NEAREST in P mode: those can differ.

use image::DynamicImage;

use crate::io::image::{resize_interleaved, Filter, Interleaved8, PreparedImage};

/// OpenAI CLIP's normalisation (open_clip `constants.py`).
pub const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// An image's pixels as the vision encoder reads them: `[3, size, size]`.
pub fn preprocess(img: &DynamicImage, size: usize) -> PreparedImage {
    let src = interleaved(img);
    let (w, h) = (src.width, src.height);
    let (out_w, out_h) = if w <= h { (size, size * h / w) } else { (size * w / h, size) };
    let mut resized = resize_interleaved(src, out_w, out_h, Filter::Bicubic);
    if resized.channels == 4 {
        unpremultiply(&mut resized.data);
    }
    let (top, left) = (centre_offset(out_h, size), centre_offset(out_w, size));
    let ch = resized.channels;
    let mut pixels = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let at = ((top + y) * out_w + left + x) * ch;
            for c in 0..3 {
                let v = resized.data[at + c] as f32 / 255.0;
                pixels[c * size * size + y * size + x] = (v - OPENAI_MEAN[c]) / OPENAI_STD[c];
            }
        }
    }
    PreparedImage::whole(pixels)
}

/// The image as the resampler sees it in Pillow: RGB (grey expanded, which resizes the same), or premultiplied
/// RGBA where it has alpha (Pillow's `RGBa`).
fn interleaved(img: &DynamicImage) -> Interleaved8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let (channels, data) = if img.color().has_alpha() {
        let mut data = img.to_rgba8().into_raw();
        premultiply(&mut data);
        (4, data)
    } else {
        (3, img.to_rgb8().into_raw())
    };
    Interleaved8 {
        width,
        height,
        channels,
        data,
    }
}

/// Pillow's `rgbA2rgba` (Convert.c): each colour times alpha / 255, rounded as its `MULDIV255`.
fn premultiply(rgba: &mut [u8]) {
    for px in rgba.chunks_exact_mut(4) {
        let a = px[3] as u32;
        for c in &mut px[..3] {
            let tmp = *c as u32 * a + 128;
            *c = (((tmp >> 8) + tmp) >> 8) as u8;
        }
    }
}

/// Pillow's `rgba2rgbA` (Convert.c): each colour times 255 / alpha, truncated and clipped; alpha 0 or 255 left as is.
fn unpremultiply(rgba: &mut [u8]) {
    for px in rgba.chunks_exact_mut(4) {
        let a = px[3] as u32;
        if a == 0 || a == 255 {
            continue;
        }
        for c in &mut px[..3] {
            *c = (255 * *c as u32 / a).min(255) as u8;
        }
    }
}

/// torchvision's `CenterCrop` offset `int(round((length - size) / 2))`: Python rounds a half to the even side.
fn centre_offset(length: usize, size: usize) -> usize {
    let d = length - size;
    let floor = d / 2;
    match d % 2 == 1 && floor % 2 == 1 {
        true => floor + 1,
        false => floor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_offsets_round_half_to_even() {
        // (65 - 42) / 2 = 11.5 -> 12; 21 / 2 = 10.5 -> 10; 4 / 2 = 2.
        assert_eq!(centre_offset(65, 42), 12);
        assert_eq!(centre_offset(63, 42), 10);
        assert_eq!(centre_offset(46, 42), 2);
        assert_eq!(centre_offset(42, 42), 0);
    }

    #[test]
    fn premultiplied_round_trip_is_pillows() {
        let mut px = [200, 100, 0, 128, 10, 20, 30, 0, 7, 8, 9, 255];
        premultiply(&mut px);
        assert_eq!(px, [100, 50, 0, 128, 0, 0, 0, 0, 7, 8, 9, 255]);
        unpremultiply(&mut px);
        assert_eq!(px, [199, 99, 0, 128, 0, 0, 0, 0, 7, 8, 9, 255]);
    }
}
