//! cuBLAS as the yardstick of the matmul ceiling, never an engine op: the engine's products are its own kernels,
//! whose summation order depends on K alone (batch invariance), while cuBLAS picks its algorithm per shape. Its
//! 8192³ bf16 GEMM is what the chip does at best, so `bench` and `profile` fractions measured against it are
//! relative to the chip rather than to our kernel (`ceilings.rs`).
//!
//! cudarc opens libcublas at run time (the build needs no CUDA): [`library`] first opens it and the cuBLASLt it
//! loads by name from the first CUDA installation that has them (`libs`), and says why not when none does.

use std::sync::OnceLock;

use cudarc::cublas::{result, sys};

use super::context::{CudaBackend, CudaTensor, CudaWeight};
use super::launchers::ActDtype;

/// The cuBLAS library this process uses, or why there is none (looked for once).
pub fn library() -> Result<String, String> {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let homes = super::libs::cuda_homes();
            let preloaded = super::libs::preload(&homes, &["libcublasLt.so."], "libcublas.so.");
            // SAFETY: only probes whether the library can be opened.
            if !unsafe { sys::is_culib_present() } {
                return Err("libcublas not found in $CUDA_HOME, $CUDA_PATH, .toolchain/cuda, /usr/local/cuda \
                            or the dynamic loader's paths"
                    .into());
            }
            Ok(preloaded.map_or("found by the dynamic loader".into(), |p| {
                p.display().to_string()
            }))
        })
        .clone()
}

/// A cuBLAS handle on a backend's stream.
pub struct Cublas {
    handle: sys::cublasHandle_t,
}

impl CudaBackend {
    /// cuBLAS on this backend's stream, or why it cannot be had.
    pub fn cublas(&self) -> Result<Cublas, String> {
        library()?;
        self.bind();
        let handle = result::create_handle().map_err(|e| format!("cublasCreate: {e:?}"))?;
        let blas = Cublas { handle };
        // SAFETY: the handle is live and the stream belongs to the bound context.
        unsafe { result::set_stream(handle, self.stream.cu_stream() as sys::cudaStream_t) }
            .map_err(|e| format!("cublasSetStream: {e:?}"))?;
        Ok(blas)
    }
}

impl Cublas {
    /// `x @ w^T` in `Backend::linear`'s layout (`x` `[m, k]`, `w` `[n, k]`, both row-major, of the backend's
    /// activation type, as is the output), f32 accumulation, queued on the backend's stream.
    pub fn linear(&self, b: &CudaBackend, x: &CudaTensor, w: &CudaWeight) -> CudaTensor {
        assert_eq!(
            x.cols, w.cols,
            "cuBLAS linear: input width {} but weight [{}, {}]",
            x.cols, w.rows, w.cols
        );
        let (m, n, k) = (x.rows, w.rows, w.cols);
        let y = b.alloc(m, n);
        let dim = |v: usize| i32::try_from(v).expect("GEMM dimension fits cuBLAS's int");
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dtype = match b.act {
            ActDtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            ActDtype::F16 => sys::cudaDataType::CUDA_R_16F,
        };
        b.bind();
        // Row-major y = x w^T is column-major y^T = w x^T: w, read as the column-major [k, n] it is, transposed;
        // x, read as the column-major [k, m] it is, as stored.
        // SAFETY: the buffers hold m*k, n*k and m*n values of that type; alpha and beta are f32 as CUBLAS_COMPUTE_32F reads.
        let rc = unsafe {
            result::gemm_ex(
                self.handle,
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                dim(n),
                dim(m),
                dim(k),
                (&alpha as *const f32).cast(),
                w.ptr as *const std::ffi::c_void,
                dtype,
                dim(k),
                x.ptr() as *const std::ffi::c_void,
                dtype,
                dim(k),
                (&beta as *const f32).cast(),
                y.ptr() as *mut std::ffi::c_void,
                dtype,
                dim(n),
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        rc.unwrap_or_else(|e| panic!("cublasGemmEx failed: {e:?}"));
        y
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by cublasCreate and is destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}
