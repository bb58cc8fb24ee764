//! Weights as Hugging Face ships them: `model.safetensors`, or shards listed by `model.safetensors.index.json`.
//!
//! Every file is memory-mapped, never read whole: a tensor is a byte range of a mapping, widened to f32 only inside
//! the ops that use it, so idefics-9b (17.9 GB in bf16) runs on a 24 GB machine.
//!
//! A store can also be generated in memory ([`WeightStore::generated`]): each tensor is filled when it is asked for,
//! so a model of any size can be built for benchmarks without writing its weights to disk, and a backend that copies
//! weights elsewhere (a GPU) holds only one tensor on the host at a time.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::pytorch::StoredTensor;

/// Storage dtypes the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The engine's dtype for a stored one it reads.
    fn of(stored: safetensors::Dtype) -> Option<DType> {
        match stored {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            _ => None,
        }
    }

    fn stored(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
        }
    }
}

/// Where a tensor's bytes are.
#[derive(Clone)]
enum Data {
    /// A byte range of a mapped file.
    Mapped {
        mmap: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    /// A generated buffer, held as 4-byte words so f32 data is aligned (the CPU backend borrows it in place).
    Owned { words: Arc<Vec<u32>>, len: usize },
}

/// One tensor of a store: where its bytes are, and what they hold.
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    /// The file it was read from, or a `<description>` of a generated store (for messages).
    pub path: Arc<PathBuf>,
    pub dtype: DType,
    pub shape: Vec<usize>,
    data: Data,
}

impl TensorRef {
    /// The index of its first NaN or infinite value, if it has one (a checkpoint that would poison every output
    /// silently). Scanned in parallel, exponent bits only.
    pub fn first_non_finite(&self) -> Option<usize> {
        use rayon::prelude::*;
        let bytes = self.bytes();
        let (size, is_bad): (usize, fn(&[u8]) -> bool) = match self.dtype {
            DType::F32 => (4, |b| {
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
            }),
            DType::BF16 => (2, |b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
            DType::F16 => (2, |b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
        };
        const CHUNK: usize = 1 << 20;
        bytes
            .par_chunks(CHUNK)
            .enumerate()
            .find_map_first(|(c, chunk)| {
                let at = chunk.chunks_exact(size).position(is_bad)?;
                Some(c * CHUNK / size + at)
            })
    }

    /// An f32 tensor of zeros, standing for a weight a checkpoint leaves out (MPT's LayerNorms without a bias).
    pub fn zeros(name: &str, shape: &[usize]) -> TensorRef {
        let len = shape.iter().product::<usize>() * 4;
        TensorRef {
            name: name.to_string(),
            path: Arc::new(PathBuf::from("<zeros>")),
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: Data::Owned { words: Arc::new(vec![0; len / 4]), len },
        }
    }

    /// Rows `range` of its leading dimension (a fused projection's part, e.g. open_clip's `in_proj_weight`).
    pub fn rows(&self, range: std::ops::Range<usize>) -> TensorRef {
        let row_bytes = self.shape[1..].iter().product::<usize>() * self.dtype.size();
        assert!(range.end <= self.shape[0], "rows {range:?} of {} in {}", self.shape[0], self.name);
        let (from, len) = (range.start * row_bytes, range.len() * row_bytes);
        let data = match &self.data {
            Data::Mapped { mmap, start, .. } => Data::Mapped { mmap: mmap.clone(), start: start + from, len },
            Data::Owned { .. } => {
                let mut part = vec![0u32; len.div_ceil(4)];
                bytemuck::cast_slice_mut::<u32, u8>(&mut part)[..len]
                    .copy_from_slice(&self.bytes()[from..from + len]);
                Data::Owned { words: Arc::new(part), len }
            }
        };
        let mut shape = self.shape.clone();
        shape[0] = range.len();
        TensorRef {
            name: format!("{}[{}..{}]", self.name, range.start, range.end),
            path: self.path.clone(),
            dtype: self.dtype,
            shape,
            data,
        }
    }

    /// Rows of several ranges of its leading dimension, in order, as one tensor (GPT-NeoX's fused
    /// `query_key_value`, whose q, k and v rows interleave by head): one range stays mapped, several are copied.
    pub fn rows_of(&self, ranges: &[std::ops::Range<usize>]) -> TensorRef {
        if let [one] = ranges {
            return self.rows(one.clone());
        }
        let parts: Vec<TensorRef> = ranges.iter().map(|r| self.rows(r.clone())).collect();
        let len: usize = parts.iter().map(|p| p.bytes().len()).sum();
        let mut words = vec![0u32; len.div_ceil(4)];
        let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..len];
        let mut at = 0;
        for p in &parts {
            bytes[at..at + p.bytes().len()].copy_from_slice(p.bytes());
            at += p.bytes().len();
        }
        let mut shape = self.shape.clone();
        shape[0] = ranges.iter().map(|r| r.len()).sum();
        TensorRef {
            name: format!("{}[{} row ranges]", self.name, ranges.len()),
            path: self.path.clone(),
            dtype: self.dtype,
            shape,
            data: Data::Owned { words: Arc::new(words), len },
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Mapped { mmap, start, len } => &mmap[*start..*start + *len],
            Data::Owned { words, len } => &bytemuck::cast_slice(words.as_slice())[..*len],
        }
    }
}

/// Fills a generated tensor's little-endian bytes, given its name, dtype and shape.
pub type Generator = dyn Fn(&str, DType, &[usize], &mut [u8]) + Send + Sync;

/// Where an entry's bytes come from.
enum Source {
    File {
        file: usize,
        start: usize,
        len: usize,
    },
    Generated,
}

struct Entry {
    source: Source,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
}

struct MappedFile {
    path: Arc<PathBuf>,
    mmap: Arc<Mmap>,
}

/// All the tensors of a model, by name: read from a model directory, or generated.
pub struct WeightStore {
    files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
    description: String,
    generator: Option<Arc<Generator>>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl WeightStore {
    /// Maps `model.safetensors`, or every shard that `model.safetensors.index.json` names; where there are none,
    /// the same for PyTorch's `pytorch_model.bin` (and its index).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let pytorch = !dir.join("model.safetensors").exists()
            && !dir.join("model.safetensors.index.json").exists()
            && (dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists());
        let base = if pytorch { "pytorch_model.bin" } else { "model.safetensors" };
        let index_path = dir.join(format!("{base}.index.json"));
        let single = dir.join(base);
        if index_path.exists() {
            let index: ShardIndex = crate::io::config::read_json(&index_path)?;
            let mut shards: Vec<String> = index.weight_map.values().cloned().collect();
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            let store = Self::open_files(&paths, format!("{}", index_path.display()))?;
            for (name, shard) in &index.weight_map {
                let file = dir.join(shard);
                match store.entries.get(name).map(|e| &e.source) {
                    Some(Source::File { file: f, .. })
                        if *store.files[*f].path.as_ref() == file => {}
                    _ => {
                        return Err(Error::MissingTensor {
                            name: name.clone(),
                            searched: format!(
                                "{} (the shard {} names)",
                                file.display(),
                                index_path.display()
                            ),
                        })
                    }
                }
            }
            Ok(store)
        } else if single.exists() {
            Self::open_files(&[single.clone()], format!("{}", single.display()))
        } else {
            Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors and no model.safetensors.index.json in the model directory",
                ),
            ))
        }
    }

    /// Maps the given files; a tensor name present in two files is an error.
    pub fn open_files(paths: &[PathBuf], description: String) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for path in paths {
            let (mmap, tensors) = if crate::io::pytorch::is_checkpoint(path) {
                (map_checkpoint(path)?, crate::io::pytorch::read_state_dict(path)?)
            } else {
                let (mmap, data_start, metadata) = map_file(path)?;
                (mmap, safetensors_entries(data_start, &metadata))
            };
            let file = files.len();
            for t in tensors {
                let name = t.name;
                let entry = Entry {
                    source: Source::File { file, start: t.start, len: t.len },
                    dtype: t.dtype,
                    shape: t.shape,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    let (path, message) = (path.clone(), format!("tensor `{name}` appears in more than one file"));
                    return Err(if crate::io::pytorch::is_checkpoint(&path) {
                        Error::Checkpoint { path, message }
                    } else {
                        Error::Safetensors { path, message }
                    });
                }
            }
            files.push(MappedFile {
                path: Arc::new(path.clone()),
                mmap: Arc::new(mmap),
            });
        }
        Ok(WeightStore {
            files,
            entries,
            description,
            generator: None,
        })
    }

    /// One namespace over several stores, as a model assembled from parts loads them: each part's tensors whose
    /// names start with its `strip` prefix, renamed to `add` + the rest of the name (others dropped), parts in
    /// order, a later part's tensor replacing an earlier one's of the same name (OpenFlamingo's
    /// `load_state_dict(checkpoint, strict=False)` over the language model it wraps).
    pub fn merged(parts: Vec<(WeightStore, &str, &str)>, description: String) -> Self {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (store, strip, add) in parts {
            assert!(store.generator.is_none(), "generated stores are not merged");
            let first_file = files.len();
            files.extend(store.files);
            for (name, mut entry) in store.entries {
                let Some(rest) = name.strip_prefix(strip) else { continue };
                if let Source::File { file, .. } = &mut entry.source {
                    *file += first_file;
                }
                entries.insert(format!("{add}{rest}"), entry);
            }
        }
        WeightStore {
            files,
            entries,
            description,
            generator: None,
        }
    }

    /// A store of the given tensors whose bytes `generator` writes each time one is asked for (nothing is kept, so
    /// it must give the same bytes every time). `description` names the store in messages.
    pub fn generated(
        tensors: Vec<(String, DType, Vec<usize>)>,
        description: String,
        generator: Arc<Generator>,
    ) -> Self {
        let entries = tensors
            .into_iter()
            .map(|(name, dtype, shape)| {
                let entry = Entry {
                    source: Source::Generated,
                    dtype: dtype.stored(),
                    shape,
                };
                (name, entry)
            })
            .collect();
        WeightStore {
            files: Vec::new(),
            entries,
            description,
            generator: Some(generator),
        }
    }

    /// The tensor `name`, checked against the shape the config implies. Shapes that differ only by leading/trailing
    /// ones (e.g. a `[1,1,D]` gate read as `[D]`) are not accepted silently: the caller states the stored shape.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<TensorRef> {
        let t = self.get_any_shape(name)?;
        if t.shape != expected {
            return Err(Error::TensorShape {
                path: t.path.as_ref().clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: t.shape,
            });
        }
        Ok(t)
    }

    /// The tensor `name` whatever its shape (the caller checks it).
    pub fn get_any_shape(&self, name: &str) -> Result<TensorRef> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            searched: self.description.clone(),
        })?;
        let path = match &e.source {
            Source::File { file, .. } => self.files[*file].path.clone(),
            Source::Generated => Arc::new(PathBuf::from(&self.description)),
        };
        let dtype = DType::of(e.dtype).ok_or_else(|| Error::TensorDtype {
            path: path.as_ref().clone(),
            name: name.to_string(),
            expected: "F32, BF16, F16".into(),
            actual: format!("{:?}", e.dtype),
        })?;
        let data = match e.source {
            Source::File { file, start, len } => Data::Mapped {
                mmap: self.files[file].mmap.clone(),
                start,
                len,
            },
            Source::Generated => self.generate(name, dtype, &e.shape),
        };
        Ok(TensorRef {
            name: name.to_string(),
            path,
            dtype,
            shape: e.shape.clone(),
            data,
        })
    }

    fn generate(&self, name: &str, dtype: DType, shape: &[usize]) -> Data {
        let generator = self
            .generator
            .as_ref()
            .expect("generated entries come with a generator");
        let len = shape.iter().product::<usize>() * dtype.size();
        let mut words = vec![0u32; len.div_ceil(4)];
        generator(
            name,
            dtype,
            shape,
            &mut bytemuck::cast_slice_mut(&mut words)[..len],
        );
        Data::Owned {
            words: Arc::new(words),
            len,
        }
    }

    /// Whether the tensors are generated in memory rather than read from files.
    pub fn is_generated(&self) -> bool {
        self.generator.is_some()
    }

    /// Elements of every tensor.
    pub fn params(&self) -> usize {
        self.entries
            .values()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// Bytes of every tensor when each element of a stored dtype takes `width(dtype)` bytes (tensors of dtypes the
    /// engine does not read count as stored).
    pub fn bytes_as(&self, width: impl Fn(DType) -> usize) -> usize {
        self.entries
            .values()
            .map(|e| {
                let w = DType::of(e.dtype).map_or(e.dtype.bitsize() / 8, &width);
                e.shape.iter().product::<usize>() * w
            })
            .sum()
    }

    /// Bytes of every tensor as stored.
    pub fn bytes(&self) -> usize {
        self.bytes_as(DType::size)
    }

    /// Writes every tensor the engine reads (F32, BF16, F16: other dtypes, such as the boolean masks old
    /// checkpoints carry, are dropped) whose name `keep` accepts into one safetensors file at `path`, as stored,
    /// streamed from the mapped files. Returns how many it wrote.
    pub fn write_safetensors(&self, path: &Path, keep: impl Fn(&str) -> bool) -> Result<usize> {
        let mut names: Vec<&String> = self
            .entries
            .iter()
            .filter(|(name, e)| DType::of(e.dtype).is_some() && keep(name))
            .map(|(name, _)| name)
            .collect();
        names.sort();
        let tensors = names.iter().map(|n| self.get_any_shape(n)).collect::<Result<Vec<_>>>()?;
        let failed = |e: safetensors::SafeTensorError| Error::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let views = tensors
            .iter()
            .map(|t| {
                let view = safetensors::tensor::TensorView::new(t.dtype.stored(), t.shape.clone(), t.bytes());
                Ok((t.name.clone(), view.map_err(failed)?))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, path).map_err(failed)?;
        Ok(tensors.len())
    }

    /// Every tensor: name, shape and storage dtype name, sorted by name.
    pub fn summary(&self) -> Vec<(String, Vec<usize>, String)> {
        let mut all: Vec<_> = self
            .entries
            .iter()
            .map(|(n, e)| (n.clone(), e.shape.clone(), format!("{:?}", e.dtype)))
            .collect();
        all.sort();
        all
    }
}

/// Maps one file and parses (and validates) its header: returns the mapping, the offset where tensor data
/// starts, and the header.
/// A safetensors file's tensors, where they lie in the file.
fn safetensors_entries(data_start: usize, metadata: &safetensors::tensor::Metadata) -> Vec<StoredTensor> {
    metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| StoredTensor {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: data_start + info.data_offsets.0,
            len: info.data_offsets.1 - info.data_offsets.0,
        })
        .collect()
}

/// Maps a PyTorch checkpoint, whose tensors `pytorch::read_state_dict` locates.
fn map_checkpoint(path: &Path) -> Result<Mmap> {
    crate::io::files::regular_file(path, u64::MAX)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: as in `map_file`.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn map_file(path: &Path) -> Result<(Mmap, usize, safetensors::tensor::Metadata)> {
    crate::io::files::regular_file(path, u64::MAX)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(Error::Safetensors {
            path: path.to_path_buf(),
            message: format!("file is {file_len} bytes, shorter than the 8-byte header length"),
        });
    }
    // SAFETY: the mapping is read-only; a file changed underneath a running engine is outside what it guards against.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            message: describe_safetensors_error(&e, file_len),
        })?;
    Ok((mmap, 8 + header_len, metadata))
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, file_len: u64) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            format!("the header's tensors do not end where the file ends ({file_len} bytes): truncated or padded")
        }
        E::InvalidHeaderLength => {
            format!("the header length runs past the end of the file ({file_len} bytes): truncated or not safetensors")
        }
        E::HeaderTooLarge => {
            "the header length is implausibly large: corrupt or not safetensors".into()
        }
        other => format!("{other}"),
    }
}
