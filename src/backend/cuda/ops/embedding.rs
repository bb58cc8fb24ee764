//! `embedding` (kernels/embedding.cu): token rows from the embedding table and IDEFICS's additional one.

use crate::backend::cuda::context::{CudaBackend, CudaTensor, CudaWeight};
use crate::backend::cuda::launchers::Embedding;
use crate::error::{Error, Result};

pub(in crate::backend::cuda) fn embedding(
    b: &CudaBackend,
    ids: &[u32],
    table: &CudaWeight,
    extra: Option<&CudaWeight>,
) -> Result<CudaTensor> {
    let (vocab_a, vocab_b) = (table.rows, extra.map_or(0, |e| e.rows));
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_a + vocab_b) {
        return Err(Error::Invalid(format!(
            "token id {id} is beyond the {} embedding rows",
            vocab_a + vocab_b
        )));
    }
    if let Some(e) = extra {
        assert_eq!(
            e.cols, table.cols,
            "the additional embedding differs in width"
        );
    }
    let out = b.alloc(ids.len(), table.cols);
    // A recorded step reads its ids from its layout's buffer, where each replay writes the new ones.
    // (Copied out first: asserting under the lock would poison it.)
    let recorded = (b.recording.lock().expect("recording lock").as_ref()).map(|r| (r.rows, r.ids));
    let recorded = recorded.map(|(rows, ptr)| {
        assert_eq!(rows, ids.len(), "a recorded step embeds its own ids");
        ptr
    });
    let uploaded = recorded
        .is_none()
        .then(|| b.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>()));
    let kernel = Embedding {
        out: out.ptr(),
        ids: recorded.unwrap_or_else(|| uploaded.as_ref().expect("uploaded").ptr),
        n_tokens: ids.len(),
        table_a: table.ptr,
        vocab_a,
        table_b: extra.map_or(0, |e| e.ptr),
        vocab_b,
        dim: table.cols,
    };
    b.run(&kernel, (ids.len() as u32, 1, 1), 128);
    Ok(out)
}
