//! Images named in requests: `data:` URLs (base64 PNG, JPEG, WebP, GIF) always; local files only under the folder
//! `--allow-local-images` names; remote `http://` URLs only with `--allow-remote-images`. Every image is size-checked
//! before decoding, decoded within the pixel limit (frames and metadata included) and a memory budget shared by all
//! requests being prepared, and turned into the model's pixels before the next one is decoded. A request whose
//! client has gone stops fetching (checked before every image and between the chunks of a remote one).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use image::DynamicImage;

use crate::io::image::{decode, read_image_file, DecodeBudget, DecodeLimits};
use crate::server::openai::ApiError;

/// Where images may come from, and how big they may be.
#[derive(Clone, Debug)]
pub struct ImagePolicy {
    pub local_root: Option<PathBuf>,
    pub allow_remote: bool,
    /// The whole of one remote fetch at most.
    pub fetch_timeout: Duration,
    pub max_bytes: usize,
    pub max_pixels: u64,
    pub max_images: usize,
    /// Memory every request's image decodes share.
    pub decode_budget: Arc<DecodeBudget>,
}

impl ImagePolicy {
    /// Fetches and decodes every image of a request, in order, each handed to `prepare` (and dropped) before the
    /// next is decoded; stops when `gone` is set (the client left).
    pub fn load_all<T>(
        &self,
        urls: &[String],
        prepare: impl Fn(DynamicImage) -> T,
        gone: &AtomicBool,
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
            .map(|(i, url)| self.load(i, url, gone).map(&prepare))
            .collect()
    }

    fn load(&self, index: usize, url: &str, gone: &AtomicBool) -> Result<DynamicImage, ApiError> {
        if gone.load(Ordering::Relaxed) {
            return Err(client_gone(index, url));
        }
        let name = PathBuf::from(format!("image {index}"));
        let bytes = if let Some(rest) = url.strip_prefix("data:") {
            self.data_url(index, rest)?
        } else if url.starts_with("http://") || url.starts_with("https://") {
            self.remote(index, url, gone)?
        } else {
            self.local(index, url.strip_prefix("file://").unwrap_or(url))?
        };
        let limits = DecodeLimits {
            max_pixels: self.max_pixels,
            budget: Some(&self.decode_budget),
        };
        decode(&bytes, &name, &limits).map_err(ApiError::from_engine)
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

    fn remote(&self, index: usize, url: &str, gone: &AtomicBool) -> Result<Vec<u8>, ApiError> {
        if !self.allow_remote {
            return Err(ApiError::bad(format!(
                "image {index}: remote image URLs are disabled (start the server with --allow-remote-images); \
                 send the image as a base64 data URL"
            )));
        }
        let deadline = Instant::now() + self.fetch_timeout;
        let response = self.follow_redirects(index, url, deadline)?;
        let mut bytes = Vec::new();
        let mut reader = response.into_reader().take(self.max_bytes as u64 + 1);
        let mut chunk = [0u8; 64 << 10];
        loop {
            if past(deadline) {
                return Err(self.timed_out(index, url));
            }
            if gone.load(Ordering::Relaxed) {
                return Err(client_gone(index, url));
            }
            let n = reader.read(&mut chunk).map_err(|e| match past(deadline) {
                true => self.timed_out(index, url),
                false => ApiError::bad(format!("image {index}: reading {url}: {e}")),
            })?;
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&chunk[..n]);
        }
        if bytes.len() > self.max_bytes {
            return Err(self.too_big(index, bytes.len()));
        }
        Ok(bytes)
    }

    /// GETs `url`, following at most [`MAX_REDIRECTS`] redirects, each to an http(s) URL (a redirect elsewhere,
    /// e.g. to `file://`, is refused), every step within the time left before `deadline`.
    fn follow_redirects(
        &self,
        index: usize,
        url: &str,
        deadline: Instant,
    ) -> Result<ureq::Response, ApiError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out(index, &url));
            }
            let agent = ureq::AgentBuilder::new()
                .redirects(0)
                .timeout_connect(left)
                .timeout(left)
                .build();
            let response = match agent.get(&url).call() {
                Ok(r) => r,
                Err(ureq::Error::Status(code, _)) => {
                    return Err(ApiError::bad(format!(
                        "image {index}: fetching {url} gave HTTP {code}"
                    )))
                }
                Err(_) if past(deadline) => return Err(self.timed_out(index, &url)),
                Err(e) => {
                    return Err(ApiError::bad(format!(
                        "image {index}: cannot fetch {url}: {e}"
                    )))
                }
            };
            if !(300..400).contains(&response.status()) {
                return Ok(response);
            }
            url = redirect_target(&url, response.header("location")).ok_or_else(|| {
                ApiError::bad(format!(
                    "image {index}: {url} redirects to {:?}, which is not an http(s) URL",
                    response.header("location").unwrap_or_default()
                ))
            })?;
        }
        Err(ApiError::bad(format!(
            "image {index}: more than {MAX_REDIRECTS} redirects fetching {url}"
        )))
    }

    fn timed_out(&self, index: usize, url: &str) -> ApiError {
        ApiError::bad(format!(
            "image {index}: fetching {url} took longer than {} s (--image-fetch-timeout-secs)",
            self.fetch_timeout.as_secs()
        ))
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
        // Regular files only: a FIFO inside the folder would block the request forever.
        read_image_file(&full, self.max_bytes as u64)
            .map_err(|e| ApiError::bad(format!("image {index}: {e}")))
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

/// The error of a fetch stopped because its client left (nobody reads it; logs and metrics do).
fn client_gone(index: usize, url: &str) -> ApiError {
    let what = if url.starts_with("data:") { "a data URL" } else { url };
    ApiError::bad(format!("image {index}: the client left; stopped loading {what}"))
}

/// Whether `deadline` has come (within the slack of a socket timeout set to end at it).
fn past(deadline: Instant) -> bool {
    Instant::now() + Duration::from_millis(100) >= deadline
}

/// Redirects one remote fetch may follow.
const MAX_REDIRECTS: usize = 5;

/// Where a redirect from `from` to `location` leads, if it is an http(s) URL (a relative location is resolved
/// against `from`).
fn redirect_target(from: &str, location: Option<&str>) -> Option<String> {
    let location = location?.trim();
    if location.starts_with("http://") || location.starts_with("https://") {
        return Some(location.to_string());
    }
    if location.contains("://") || location.starts_with("//") {
        return None;
    }
    let scheme_end = from.find("://")? + 3;
    let host_end = from[scheme_end..]
        .find('/')
        .map_or(from.len(), |i| scheme_end + i);
    let (origin, path) = from.split_at(host_end);
    if location.starts_with('/') {
        return Some(format!("{origin}{location}"));
    }
    let dir = path.rfind('/').map_or("/", |i| &path[..=i]);
    Some(format!("{origin}{dir}{location}"))
}

#[cfg(test)]
mod tests {
    use super::redirect_target;

    #[test]
    fn redirects_resolve_to_http_urls_only() {
        let from = "http://host:8/a/b.png";
        let to = |l: &str| redirect_target(from, Some(l));
        assert_eq!(to("https://x/y.png").as_deref(), Some("https://x/y.png"));
        assert_eq!(to("/c.png").as_deref(), Some("http://host:8/c.png"));
        assert_eq!(to("c.png").as_deref(), Some("http://host:8/a/c.png"));
        assert_eq!(
            redirect_target("http://host", Some("c.png")).as_deref(),
            Some("http://host/c.png")
        );
        for bad in ["file:///etc/passwd", "ftp://x/y", "//evil/x", "gopher://x"] {
            assert_eq!(to(bad), None, "{bad}");
        }
        assert_eq!(redirect_target(from, None), None);
    }
}
