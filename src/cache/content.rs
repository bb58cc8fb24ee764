//! Content keys: what a cached KV block or media slot holds, named by a 256-bit BLAKE3 hash of everything its
//! values depend on, so that requests that agree on it share one copy (prefix caching, the media cache by content).
//!
//! - An image's key hashes its decoded, preprocessed pixels (the exact f32 bits the vision tower reads), its tile
//!   grid, and, when it is seen together with the image before it (consecutive image tokens), that image's key: two
//!   images differing in one pixel never share a key. The same picture directly after another is a slot of its
//!   own, since a slot's view (what rows seeing it attend to) names the slot before it.
//! - A KV block's key hashes its parent block's key (so it names the whole prefix up to it), its token ids, and per
//!   row the key of the image the row attends to (a zero key for none): a row's K/V depend on nothing else.

/// A 256-bit content hash.
pub type ContentKey = [u8; 32];

/// Key of a row that attends to no image.
const NO_IMAGE: ContentKey = [0; 32];

/// The key of an image of `pixels` in a `tiles` grid, seen after the image keyed `after` where there is one.
pub fn image_key(pixels: &[f32], tiles: (usize, usize), after: Option<&ContentKey>) -> ContentKey {
    let mut h = blake3::Hasher::new();
    h.update(b"image");
    h.update(&(tiles.0 as u64).to_le_bytes());
    h.update(&(tiles.1 as u64).to_le_bytes());
    h.update(&[after.is_some() as u8]);
    h.update(after.unwrap_or(&NO_IMAGE));
    h.update(bytemuck::cast_slice(pixels));
    *h.finalize().as_bytes()
}

/// The key of a KV block after the block keyed `parent` (none for a sequence's first), holding `tokens` whose rows
/// attend to the images keyed `row_images` (`None`: no image).
pub fn block_key(
    parent: Option<&ContentKey>,
    tokens: &[u32],
    row_images: impl Iterator<Item = Option<ContentKey>>,
) -> ContentKey {
    let mut h = blake3::Hasher::new();
    h.update(b"kv-block");
    h.update(&[parent.is_some() as u8]);
    h.update(parent.unwrap_or(&NO_IMAGE));
    h.update(bytemuck::cast_slice(tokens));
    for key in row_images {
        h.update(&[key.is_some() as u8]);
        h.update(&key.unwrap_or(NO_IMAGE));
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pixel_one_token_or_one_image_changes_the_key() {
        let pixels = vec![0.25f32; 12];
        let mut other = pixels.clone();
        other[7] = f32::from_bits(other[7].to_bits() + 1);
        let a = image_key(&pixels, (1, 1), None);
        assert_eq!(a, image_key(&pixels, (1, 1), None));
        assert_ne!(a, image_key(&other, (1, 1), None), "one pixel, one ulp");
        assert_ne!(a, image_key(&pixels, (1, 2), None), "the tile grid");
        assert_ne!(a, image_key(&pixels, (1, 1), Some(&a)), "seen after another image");
        let b = image_key(&other, (1, 1), None);
        let block = |parent, tokens: &[u32], images: &[Option<ContentKey>]| {
            block_key(parent, tokens, images.iter().copied())
        };
        let k = block(None, &[1, 2], &[None, Some(a)]);
        assert_eq!(k, block(None, &[1, 2], &[None, Some(a)]));
        assert_ne!(k, block(None, &[1, 3], &[None, Some(a)]));
        assert_ne!(k, block(None, &[1, 2], &[None, Some(b)]));
        assert_ne!(k, block(None, &[1, 2], &[Some(a), None]));
        assert_ne!(k, block(Some(&k), &[1, 2], &[None, Some(a)]), "another parent");
    }
}
