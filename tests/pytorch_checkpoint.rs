//! PyTorch checkpoints (`torch.save`'s zip format) read without Python: every tensor of the OpenFlamingo fixtures'
//! `checkpoint.pt`, language-model `pytorch_model*.bin` and open_clip `.bin` files has the name, dtype, shape and
//! values that `torch.load` gives (`torch_tensors.json`, written by `scripts/torch-checkpoint-listing.py`), read in
//! place from the memory-mapped file; a pickle that names any other global is refused naming it, with nothing run.

mod common;

use std::collections::BTreeMap;
use std::io::Write;

use common::fixture_dir;
use flamingo::io::safetensors::{DType, WeightStore};
use flamingo::Error;

#[derive(serde::Deserialize)]
struct Listed {
    dtype: String,
    shape: Vec<usize>,
    /// A number, or "inf", "-inf", "nan" (JSON has none of them).
    sum: serde_json::Value,
}

impl Listed {
    fn sum(&self) -> f64 {
        match &self.sum {
            serde_json::Value::String(s) => s.parse().expect("inf, -inf or nan"),
            v => v.as_f64().expect("a number"),
        }
    }
}

fn values(t: &flamingo::io::safetensors::TensorRef) -> Vec<f64> {
    let b = t.bytes();
    match t.dtype {
        DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        DType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
    }
}

#[test]
fn every_tensor_of_every_openflamingo_checkpoint_is_what_torch_load_gives() {
    let mut files = 0;
    for fixture in ["tiny-openflamingo-a", "tiny-openflamingo-b", "tiny-openflamingo-c"] {
        let dir = fixture_dir(fixture);
        let text = std::fs::read_to_string(dir.join("torch_tensors.json")).unwrap();
        let listing: BTreeMap<String, BTreeMap<String, Listed>> = serde_json::from_str(&text).unwrap();
        for (file, tensors) in listing {
            let path = dir.join(&file);
            let store = WeightStore::open_files(std::slice::from_ref(&path), file.clone()).unwrap();
            let summary = store.summary();
            assert_eq!(summary.len(), tensors.len(), "{fixture}/{file}: tensor count");
            for (name, want) in &tensors {
                let what = format!("{fixture}/{file}: {name}");
                match store.get_any_shape(name) {
                    Ok(t) => {
                        let dtype = match t.dtype {
                            DType::F32 => "float32",
                            DType::F16 => "float16",
                            DType::BF16 => "bfloat16",
                        };
                        assert_eq!((dtype, &t.shape), (want.dtype.as_str(), &want.shape), "{what}");
                        let (sum, want): (f64, f64) = (values(&t).iter().sum(), want.sum());
                        let close = (sum - want).abs() <= 1e-9 * want.abs().max(1.0);
                        assert!(close || sum == want || (sum.is_nan() && want.is_nan()), "{what}: sum {sum} vs {want}");
                    }
                    // Masks and other non-float buffers are listed, and refused by name when asked for as weights.
                    Err(Error::TensorDtype { name: n, actual, .. }) => {
                        assert_eq!((want.dtype.as_str(), n.as_str(), actual.as_str()), ("bool", name.as_str(), "BOOL"), "{what}");
                    }
                    Err(e) => panic!("{what}: {e}"),
                }
            }
            files += 1;
        }
    }
    assert_eq!(files, 11, "every checkpoint file of the three fixtures");
}

/// A zip in `torch.save`'s layout holding `pickle` as its data.pkl.
fn checkpoint_with(dir: &std::path::Path, pickle: &[u8]) -> std::path::PathBuf {
    let path = dir.join("checkpoint.pt");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/data/0", stored).unwrap();
    zip.write_all(&[0u8; 24]).unwrap();
    zip.finish().unwrap();
    path
}

#[test]
fn a_checkpoint_whose_pickle_would_run_code_is_refused_naming_the_global() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    // pickle.dumps of os.system("touch <marker>"), protocol 2: loading it with pickle would create the file.
    let command = format!("touch {}", marker.display());
    let mut evil = b"\x80\x02cos\nsystem\nq\x00X".to_vec();
    evil.extend((command.len() as u32).to_le_bytes());
    evil.extend(command.as_bytes());
    evil.extend(b"q\x01\x85q\x02Rq\x03.");
    let path = checkpoint_with(dir.path(), &evil);
    let err = WeightStore::open_files(std::slice::from_ref(&path), "evil".into()).err().expect("refused");
    let message = err.to_string();
    assert!(matches!(err, Error::Checkpoint { .. }), "{message}");
    assert!(message.contains("`os.system`") && message.contains("checkpoint.pt"), "{message}");
    assert!(!marker.exists(), "nothing was run");
}

#[test]
fn a_tensor_reaching_past_its_storage_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // {'w': _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 6), 0, (2, 4), (4, 1), False, OrderedDict())}:
    // 8 floats from a 24-byte storage.
    let pickle = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x06tq\x07QK\x00K\x02K\x04\x86q\x08K\x04K\x01\x86q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs.";
    let path = checkpoint_with(dir.path(), pickle);
    let message = WeightStore::open_files(&[path], "past".into()).err().expect("refused").to_string();
    assert!(message.contains("tensor `w`") && message.contains("run past its storage"), "{message}");
}
