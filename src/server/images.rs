//! Images named in requests: `data:` URLs (base64 PNG, JPEG, WebP, GIF) always; local files only under the folder
//! `--allow-local-images` names; remote `http://` URLs only with `--allow-remote-images`. Every image is size-checked
//! before decoding, decoded within the pixel limit (frames and metadata included) and a memory budget shared by all
//! requests being prepared, and turned into the model's pixels before the next one is decoded.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;

use crate::io::image::{decode_rgb, DecodeBudget, DecodeLimits, Rgb8};
use crate::server::openai::ApiError;

/// Where images may come from, and how big they may be.
#[derive(Clone, Debug)]
pub struct ImagePolicy {
    pub local_root: Option<PathBuf>,
    pub allow_remote: bool,
    pub max_bytes: usize,
    pub max_pixels: u64,
    pub max_images: usize,
    /// Memory every request's image decodes share.
    pub decode_budget: Arc<DecodeBudget>,
}

impl ImagePolicy {
    /// Fetches and decodes every image of a request, in order, each handed to `prepare` (and dropped) before the
    /// next is decoded.
    pub fn load_all<T>(
        &self,
        urls: &[String],
        prepare: impl Fn(&Rgb8) -> T,
    ) -> Result<Vec<T>, ApiError> {
        if urls.len() > self.max_images {
            return Err(ApiError::bad(format!(
                "{} images in one request; the limit is {}",
                urls.len(),
                self.max_images
            )));
        }
        urls.iter()
            .enumerate()
            .map(|(i, url)| self.load(i, url).map(|image| prepare(&image)))
            .collect()
    }

    fn load(&self, index: usize, url: &str) -> Result<Rgb8, ApiError> {
        let name = PathBuf::from(format!("image {index}"));
        let bytes = if let Some(rest) = url.strip_prefix("data:") {
            self.data_url(index, rest)?
        } else if url.starts_with("http://") || url.starts_with("https://") {
            self.remote(index, url)?
        } else {
            self.local(index, url.strip_prefix("file://").unwrap_or(url))?
        };
        let limits = DecodeLimits {
            max_pixels: self.max_pixels,
            budget: Some(&self.decode_budget),
        };
        decode_rgb(&bytes, &name, &limits).map_err(ApiError::from_engine)
    }

    fn data_url(&self, index: usize, rest: &str) -> Result<Vec<u8>, ApiError> {
        let (meta, data) = rest.split_once(',').ok_or_else(|| {
            ApiError::bad(format!(
                "image {index}: a data URL needs a comma before its data"
            ))
        })?;
        if !meta.ends_with(";base64") {
            return Err(ApiError::bad(format!(
                "image {index}: only base64 data URLs are supported (data:image/png;base64,...)"
            )));
        }
        if data.len() / 4 * 3 > self.max_bytes {
            return Err(self.too_big(index, data.len() / 4 * 3));
        }
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ApiError::bad(format!("image {index}: invalid base64: {e}")))
    }

    fn remote(&self, index: usize, url: &str) -> Result<Vec<u8>, ApiError> {
        if !self.allow_remote {
            return Err(ApiError::bad(format!(
                "image {index}: remote image URLs are disabled (start the server with --allow-remote-images); \
                 send the image as a base64 data URL"
            )));
        }
        let response = ureq::get(url)
            .call()
            .map_err(|e| ApiError::bad(format!("image {index}: cannot fetch {url}: {e}")))?;
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(self.max_bytes as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ApiError::bad(format!("image {index}: reading {url}: {e}")))?;
        if bytes.len() > self.max_bytes {
            return Err(self.too_big(index, bytes.len()));
        }
        Ok(bytes)
    }

    fn local(&self, index: usize, path: &str) -> Result<Vec<u8>, ApiError> {
        let Some(root) = &self.local_root else {
            return Err(ApiError::bad(format!(
                "image {index}: {path:?} is not a data: or http(s) URL, and local files are disabled \
                 (start the server with --allow-local-images DIR)"
            )));
        };
        let outside = || {
            ApiError::bad(format!(
                "image {index}: {path:?} is not a readable file inside the allowed folder {}",
                root.display()
            ))
        };
        let full = root.join(path).canonicalize().map_err(|_| outside())?;
        if !full.starts_with(root) {
            return Err(outside());
        }
        let size = std::fs::metadata(&full).map_err(|_| outside())?.len() as usize;
        if size > self.max_bytes {
            return Err(self.too_big(index, size));
        }
        std::fs::read(&full).map_err(|_| outside())
    }

    fn too_big(&self, index: usize, bytes: usize) -> ApiError {
        ApiError::bad(format!(
            "image {index}: {bytes} bytes, over the limit of {} bytes",
            self.max_bytes
        ))
    }
}

/// The canonical form of the folder local images may come from.
pub fn canonical_root(dir: &Path) -> crate::error::Result<PathBuf> {
    dir.canonicalize()
        .map_err(|e| crate::error::Error::io(dir, e))
}
