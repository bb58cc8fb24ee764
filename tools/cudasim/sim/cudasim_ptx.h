// cudasim_ptx.h - the simulator's stand-ins for the inline-PTX wrappers of kernels/common.cuh, which includes this
// file instead of its asm blocks when FE_SIM is defined (a macro cannot reach into `asm volatile`). Macros, so
// each call reports the kernel line it was made from.
#pragma once

namespace cudasim {
// `cp_async_wait<N>()` as `cudasim::WaitAt{site}.wait<N>()`: the template argument stays where the kernel wrote it.
struct WaitAt {
  Site site;
  template <int N>
  void wait() const {
    cp_async_wait(N, site);
  }
};
}  // namespace cudasim

#define cp_async16(...) cudasim::cp_async16(__VA_ARGS__, CUDASIM_SITE)
#define cp_async_commit() cudasim::cp_async_commit()
#define cp_async_wait cudasim::WaitAt{CUDASIM_SITE}.template wait
#define ldmatrix_x4(...) cudasim::load_matrices(__VA_ARGS__, false, CUDASIM_SITE)
#define ldmatrix_x4_trans(...) cudasim::load_matrices(__VA_ARGS__, true, CUDASIM_SITE)
#define mma_16816(...) cudasim::mma_16816(__VA_ARGS__, FE_MMA_TYPE, CUDASIM_SITE)
