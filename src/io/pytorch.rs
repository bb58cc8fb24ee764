//! PyTorch checkpoints read without Python: `torch.save`'s zip format (`checkpoint.pt`, `pytorch_model*.bin`),
//! a zip holding `<archive>/data.pkl` (the pickled state dict) and one entry `<archive>/data/<key>` per storage.
//!
//! The pickle is read by a restricted unpickler that knows only what state dicts are made of: dicts (and
//! `collections.OrderedDict`), tuples, lists, numbers, strings, tensors rebuilt by `torch._utils._rebuild_tensor_v2`
//! from storages named by persistent ids (`torch.FloatStorage` and the other typed storages). Any other global is
//! refused with an error naming it; nothing in the file is ever called or executed (there is nothing that could
//! be: the unpickler builds values, it has no way to run code). A tensor's bytes are found in place: its storage's
//! zip entry must be stored uncompressed (as `torch.save` writes them), so the weights are memory-mapped like a
//! safetensors file's. Tensors must be contiguous (row-major strides), as saved state dicts are.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// The largest `data.pkl` read: the pickle holds names and shapes only, never weights.
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// One tensor of a checkpoint: its dtype and shape, and where its bytes lie in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the file.
    pub start: usize,
    pub len: usize,
}

/// The tensors of the checkpoint at `path`, in the pickle's order. A dict whose only tensors sit under a
/// `state_dict` or `model_state_dict` key (a training checkpoint) is read as that state dict.
pub fn read_state_dict(path: &Path) -> Result<Vec<StoredTensor>> {
    let bad = |message: String| Error::Checkpoint { path: path.to_path_buf(), message };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip archive ({e})")))?;
    let pickle_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_owned))
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .ok_or_else(|| bad("no data.pkl entry (a checkpoint saved by torch.save holds one)".into()))?;
    let prefix = pickle_name.strip_suffix("data.pkl").unwrap_or_default().to_owned();
    let pickle = {
        let entry = zip.by_name(&pickle_name).map_err(|e| bad(format!("{pickle_name}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(bad(format!("{pickle_name} is {} bytes, over the {MAX_PICKLE_BYTES} a state dict needs", entry.size())));
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(entry, MAX_PICKLE_BYTES), &mut bytes)
            .map_err(|e| bad(format!("{pickle_name}: {e}")))?;
        bytes
    };
    let value = Unpickler::new(&pickle).run().map_err(|m| bad(format!("{pickle_name}: {m}")))?;
    let tensors = state_dict(value).map_err(|m| bad(format!("{pickle_name}: {m}")))?;
    tensors
        .into_iter()
        .map(|(name, t)| locate(&mut zip, &prefix, name, t).map_err(bad))
        .collect()
}

/// Where tensor `t`'s bytes are in the file: its storage entry must be stored, and hold it.
fn locate(zip: &mut zip::ZipArchive<File>, prefix: &str, name: String, t: Tensor) -> std::result::Result<StoredTensor, String> {
    let entry_name = format!("{prefix}data/{}", t.storage.key);
    let entry = zip.by_name(&entry_name).map_err(|e| format!("tensor `{name}`: storage {entry_name}: {e}"))?;
    if entry.compression() != zip::CompressionMethod::Stored {
        return Err(format!("tensor `{name}`: storage {entry_name} is compressed; only stored entries can be mapped"));
    }
    let size = t.storage.dtype.bitsize() / 8;
    let numel: usize = t.shape.iter().product();
    let row_major = row_major_strides(&t.shape);
    let contiguous = t.shape.iter().zip(t.stride.iter().zip(&row_major)).all(|(&d, (s, r))| d == 1 || s == r);
    if t.stride.len() != t.shape.len() || !contiguous {
        return Err(format!("tensor `{name}`: strides {:?} for shape {:?} are not contiguous", t.stride, t.shape));
    }
    let (start, len) = (t.offset * size, numel * size);
    if (start + len) as u64 > entry.size() {
        return Err(format!(
            "tensor `{name}`: {len} bytes at {start} run past its storage {entry_name} ({} bytes)",
            entry.size()
        ));
    }
    Ok(StoredTensor { name, dtype: t.storage.dtype, shape: t.shape, start: entry.data_start() as usize + start, len })
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// The named tensors of an unpickled state dict.
fn state_dict(value: Value) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let Value::Dict(items) = value else {
        return Err(format!("the pickle holds {}, not a state dict", value.kind()));
    };
    if !items.iter().any(|(_, v)| matches!(v, Value::Tensor(_))) {
        for (k, v) in &items {
            if matches!(k, Value::Str(s) if s == "state_dict" || s == "model_state_dict") {
                return state_dict(v.clone());
            }
        }
    }
    items
        .into_iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(name), Value::Tensor(t)) => Some(Ok((name, t))),
            (Value::Str(_), _) => None, // non-tensor entries (a step count, a config) are not weights
            (k, _) => Some(Err(format!("a state dict key that is {}, not a string", k.kind()))),
        })
        .collect()
}

/// A storage named by a persistent id: `('storage', <type>, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
struct Storage {
    dtype: safetensors::Dtype,
    key: String,
}

#[derive(Debug, Clone, PartialEq)]
struct Tensor {
    storage: Storage,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The globals a state dict may name; anything else is refused.
#[derive(Debug, Clone, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    StorageType(safetensors::Dtype),
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage(Storage),
    Tensor(Tensor),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a global",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

/// The global `module.name`, if a state dict may use it.
fn allowed_global(module: &str, name: &str) -> std::result::Result<Global, String> {
    use safetensors::Dtype as D;
    let storage = |d| Ok(Global::StorageType(d));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch", "FloatStorage") => storage(D::F32),
        ("torch", "HalfStorage") => storage(D::F16),
        ("torch", "BFloat16Storage") => storage(D::BF16),
        ("torch", "DoubleStorage") => storage(D::F64),
        ("torch", "LongStorage") => storage(D::I64),
        ("torch", "IntStorage") => storage(D::I32),
        ("torch", "ShortStorage") => storage(D::I16),
        ("torch", "CharStorage") => storage(D::I8),
        ("torch", "ByteStorage") => storage(D::U8),
        ("torch", "BoolStorage") => storage(D::BOOL),
        _ => Err(format!(
            "it names the global `{module}.{name}`, which a state dict never needs; refused (nothing in the file is run)"
        )),
    }
}

struct Unpickler<'a> {
    bytes: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

type Step = std::result::Result<(), String>;

impl<'a> Unpickler<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Unpickler { bytes, at: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn pop(&mut self) -> std::result::Result<Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(format!("a value popped past a mark at byte {}", self.at));
        }
        self.stack.pop().ok_or_else(|| format!("stack empty at byte {}", self.at))
    }

    /// The values pushed since the last mark.
    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or_else(|| format!("no mark at byte {}", self.at))?;
        Ok(self.stack.split_off(m))
    }

    fn text(&mut self, n: usize) -> std::result::Result<String, String> {
        let at = self.at;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| format!("a string at byte {at} is not UTF-8"))
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.bytes[self.at..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("an unterminated GLOBAL")?;
        let s = self.text(n)?;
        self.at += 1;
        Ok(s)
    }

    /// Runs the pickle to its STOP; returns the value it built.
    fn run(mut self) -> std::result::Result<Value, String> {
        loop {
            let at = self.at;
            let op = self.u8()?;
            if op == b'.' {
                return self.pop();
            }
            self.step(op).map_err(|m| format!("{m} (opcode 0x{op:02x} at byte {at})"))?;
        }
    }

    fn step(&mut self, op: u8) -> Step {
        match op {
            0x80 => drop(self.u8()?),        // PROTO
            0x95 => drop(self.take(8)?),     // FRAME
            b'}' => self.stack.push(Value::Dict(Vec::new())),
            b']' => self.stack.push(Value::List(Vec::new())),
            b')' => self.stack.push(Value::Tuple(Vec::new())),
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'(' => self.marks.push(self.stack.len()),
            b'X' => {
                let n = self.u32()? as usize;
                let s = self.text(n)?;
                self.stack.push(Value::Str(s));
            }
            0x8c => {
                let n = self.u8()? as usize;
                let s = self.text(n)?;
                self.stack.push(Value::Str(s));
            }
            b'K' => {
                let v = self.u8()?;
                self.stack.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
                self.stack.push(Value::Int(v.into()));
            }
            b'J' => {
                let v = self.u32()? as i32;
                self.stack.push(Value::Int(v.into()));
            }
            0x8a => {
                let n = self.u8()? as usize;
                if n > 8 {
                    return Err(format!("a {n}-byte integer"));
                }
                let b = self.take(n)?;
                let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 };
                let mut le = [fill; 8];
                le[..n].copy_from_slice(b);
                self.stack.push(Value::Int(i64::from_le_bytes(le)));
            }
            b'G' => {
                let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                self.stack.push(Value::Float(v));
            }
            b'q' => {
                let k = self.u8()?.into();
                self.memoize(k)?;
            }
            b'r' => {
                let k = self.u32()?;
                self.memoize(k)?;
            }
            0x94 => {
                let k = self.memo.len() as u32;
                self.memoize(k)?;
            }
            b'h' => {
                let k = self.u8()?.into();
                self.recall(k)?;
            }
            b'j' => {
                let k = self.u32()?;
                self.recall(k)?;
            }
            b'c' => {
                let (module, name) = (self.line()?, self.line()?);
                self.stack.push(Value::Global(allowed_global(&module, &name)?));
            }
            0x93 => {
                let (name, module) = (self.pop()?, self.pop()?);
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err("STACK_GLOBAL of values that are not strings".into());
                };
                self.stack.push(Value::Global(allowed_global(&module, &name)?));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = (0..n).map(|_| self.pop()).collect::<std::result::Result<Vec<_>, _>>()?;
                items.reverse();
                self.stack.push(Value::Tuple(items));
            }
            b'Q' => {
                let pid = self.pop()?;
                self.stack.push(Value::Storage(persistent_storage(pid)?));
            }
            b'R' => {
                let (args, callable) = (self.pop()?, self.pop()?);
                self.stack.push(reduce(callable, args)?);
            }
            b's' => {
                let (v, k) = (self.pop()?, self.pop()?);
                self.dict_top()?.push((k, v));
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd number of values".into());
                }
                let mut pairs = Vec::with_capacity(items.len() / 2);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                self.dict_top()?.extend(pairs);
            }
            b'a' => {
                let v = self.pop()?;
                self.list_top()?.push(v);
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.list_top()?.extend(items);
            }
            // BUILD: the state an OrderedDict or a tensor is given after it is made (a state dict's `_metadata`,
            // a parameter's attributes): nothing a weight's bytes depend on.
            b'b' => drop(self.pop()?),
            _ => return Err("an opcode a state dict does not use".into()),
        }
        Ok(())
    }

    fn memoize(&mut self, k: u32) -> Step {
        let top = self.stack.last().ok_or("memoizing an empty stack")?.clone();
        self.memo.insert(k, top);
        Ok(())
    }

    fn recall(&mut self, k: u32) -> Step {
        let v = self.memo.get(&k).ok_or_else(|| format!("memo {k} was never stored"))?.clone();
        self.stack.push(v);
        Ok(())
    }

    fn dict_top(&mut self) -> std::result::Result<&mut Vec<(Value, Value)>, String> {
        match self.stack.last_mut() {
            Some(Value::Dict(items)) => Ok(items),
            other => Err(format!("setting an item of {}", other.map_or("nothing", |v| v.kind()))),
        }
    }

    fn list_top(&mut self) -> std::result::Result<&mut Vec<Value>, String> {
        match self.stack.last_mut() {
            Some(Value::List(items)) => Ok(items),
            other => Err(format!("appending to {}", other.map_or("nothing", |v| v.kind()))),
        }
    }
}

/// `('storage', <storage type>, key, location, numel)`.
fn persistent_storage(pid: Value) -> std::result::Result<Storage, String> {
    match pid {
        Value::Tuple(t) => match t.as_slice() {
            [Value::Str(tag), Value::Global(Global::StorageType(dtype)), Value::Str(key), _, Value::Int(_)]
                if tag == "storage" =>
            {
                Ok(Storage { dtype: *dtype, key: key.clone() })
            }
            _ => Err(format!("a persistent id that is not a typed storage: {t:?}")),
        },
        other => Err(format!("a persistent id that is {}", other.kind())),
    }
}

/// A call the state dict asks for: only `OrderedDict()` and `_rebuild_tensor_v2(...)` are made, as values.
fn reduce(callable: Value, args: Value) -> std::result::Result<Value, String> {
    let Value::Tuple(args) = args else {
        return Err(format!("REDUCE with arguments that are {}", args.kind()));
    };
    match callable {
        Value::Global(Global::OrderedDict) => Ok(Value::Dict(Vec::new())),
        Value::Global(Global::RebuildTensorV2) => match args.as_slice() {
            [Value::Storage(storage), Value::Int(offset), Value::Tuple(size), Value::Tuple(stride), ..] => {
                Ok(Value::Tensor(Tensor {
                    storage: storage.clone(),
                    offset: usize::try_from(*offset).map_err(|_| "a negative storage offset")?,
                    shape: dims(size)?,
                    stride: dims(stride)?,
                }))
            }
            _ => Err("_rebuild_tensor_v2 with arguments that are not (storage, offset, size, stride, ...)".into()),
        },
        other => Err(format!("a call of {}", other.kind())),
    }
}

fn dims(values: &[Value]) -> std::result::Result<Vec<usize>, String> {
    values
        .iter()
        .map(|v| match v {
            Value::Int(i) => usize::try_from(*i).map_err(|_| format!("a negative dimension {i}")),
            other => Err(format!("a dimension that is {}", other.kind())),
        })
        .collect()
}

/// Is `path` a PyTorch zip checkpoint (by its name: `.pt`, `.pth`, `.bin`, `.ckpt`)?
pub fn is_checkpoint(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("pt" | "pth" | "bin" | "ckpt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pickle calling `os.system` is refused, naming the global, before anything could happen.
    #[test]
    fn a_pickle_naming_any_other_global_is_refused_naming_it() {
        let evil = b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.";
        let err = Unpickler::new(evil).run().unwrap_err();
        assert!(err.contains("`os.system`") && err.contains("refused"), "{err}");
        let builtins = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94.";
        let err = Unpickler::new(builtins).run().unwrap_err();
        assert!(err.contains("`builtins.eval`"), "{err}");
    }

    #[test]
    fn a_state_dict_of_one_tensor_unpickles() {
        // {'w': _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 6), 0, (2, 3), (3, 1), False, OrderedDict())}
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x06tq\x07QK\x00K\x02K\x03\x86q\x08K\x03K\x01\x86q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs.";
        let tensors = state_dict(Unpickler::new(p).run().unwrap()).unwrap();
        assert_eq!(tensors.len(), 1);
        let (name, t) = &tensors[0];
        assert_eq!((name.as_str(), t.shape.as_slice(), t.stride.as_slice()), ("w", &[2, 3][..], &[3, 1][..]));
        assert_eq!(t.storage, Storage { dtype: safetensors::Dtype::F32, key: "0".into() });
        for cut in 0..p.len() {
            assert!(Unpickler::new(&p[..cut]).run().is_err(), "truncated at {cut}");
        }
    }
}
