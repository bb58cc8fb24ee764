// copy.cu - row and column data movement for the backend's tensor ops (slices, concatenation,
// row gather, KV-cache scatter, per-head zero padding).
//
// copy_rows_{bf16,f16}(dst, src, dst_idx, src_idx, rows, groups, d_dst, d_src, ld_dst, ld_src)
//   For i < rows, g < groups, c < d_dst (all int32 indices, row strides in elements):
//     di = dst_idx ? dst_idx[i] : i        si = src_idx ? src_idx[i] : i
//     dst[di*ld_dst + g*d_dst + c] = c < d_src ? src[si*ld_src + g*d_src + c] : 0
//   One kernel covers:
//     * slices / concatenation: groups = 1, d_dst = d_src = cols, dst / src offset by the host;
//     * gather_rows: src_idx = the rows; write_kv: dst_idx = the slot of every new row;
//     * head padding: groups = heads, d_dst > d_src (zero-fills columns d_src .. d_dst of each
//       head, so a head_dim the attention kernels lack runs as the next size they have; zero
//       q/k columns add nothing to a dot product, zero v columns produce zero outputs) and the
//       inverse, d_dst < d_src, which drops the padding again.
//   dst and src must not overlap. Exact copies: no rounding.
//   Launch: grid = (min(ceil(rows*groups*d_dst / 256), 65535*8), 1, 1), block = (256, 1, 1), smem = 0
//   (grid-stride, any grid size is correct).
//
// CPU reference: src/backend/cpu/mod.rs::slice_rows, src/backend/cpu/mod.rs::concat_rows,
//   src/backend/cpu/mod.rs::concat_cols, src/backend/cpu/mod.rs::write_rows, src/backend/cpu/mod.rs::gather_rows,
//   src/backend/cpu/mod.rs::write_kv
// Test: tests/gpu.rs::embedding_and_data_movement_match_cpu
// Bench: benches/ops.rs::data_movement
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "common.cuh"

#define COPY_THREADS 256

extern "C" __global__ void __launch_bounds__(COPY_THREADS)
    ACT_KERNEL(copy_rows)(act_t* __restrict__ dst, const act_t* __restrict__ src, const int* __restrict__ dst_idx,
                   const int* __restrict__ src_idx, int rows, int groups, int d_dst, int d_src, long long ld_dst,
                   long long ld_src) {
  const long long per_row = (long long)groups * d_dst;
  const long long total = (long long)rows * per_row;
  for (long long e = (long long)blockIdx.x * COPY_THREADS + threadIdx.x; e < total;
       e += (long long)gridDim.x * COPY_THREADS) {
    const int i = (int)(e / per_row);
    const int rem = (int)(e - (long long)i * per_row);
    const int g = rem / d_dst, c = rem - g * d_dst;
    const long long di = dst_idx ? dst_idx[i] : i;
    act_t v = to_act(0.f);
    if (c < d_src) {
      const long long si = src_idx ? src_idx[i] : i;
      v = src[si * ld_src + (long long)g * d_src + c];
    }
    dst[di * ld_dst + (long long)g * d_dst + c] = v;
  }
}
