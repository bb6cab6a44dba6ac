// CUDA kernel of genie_cpp::taylor_update (the op and its CPU kernel are in
// taylor_update.cpp; the per-element arithmetic, shared with the CPU, in taylor_update.h).
//
// γ is read from the device tensor inside the kernel, so a launch never waits on the
// host and can be captured in a CUDA graph.  Each thread of a grid-stride loop takes VEC
// consecutive elements (16 bytes of ε: 8 halves, 4 floats, 2 doubles) with vector loads
// and stores when every pointer is aligned for it (and, for genie, the k blocks too);
// the remainder, or everything when unaligned, takes the scalar path.
#include "taylor_update.h"

#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream, which at::cuda:: re-exports
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace genie_cpp {

namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 8;  // 8 × 256 = 2048 resident threads per SM

// Elements of T moved by one memory instruction when a thread moves N of them: 16 bytes'
// worth, or all N when they are fewer.
template <typename T, int N>
C10_HOST_DEVICE constexpr int chunk_elements() {
  return sizeof(T) * N < 16 ? N : static_cast<int>(16 / sizeof(T));
}

// Byte alignment that load_vec/store_vec of N elements of T need.
template <typename T, int N>
C10_HOST_DEVICE constexpr int vec_alignment() {
  return static_cast<int>(sizeof(T)) * chunk_elements<T, N>();
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  constexpr int C = chunk_elements<T, N>();
#pragma unroll
  for (int j = 0; j < N; j += C) {
    const Pack<T, C> chunk = *reinterpret_cast<const Pack<T, C>*>(p + j);
#pragma unroll
    for (int k = 0; k < C; ++k) out[j + k] = chunk.v[k];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[N]) {
  constexpr int C = chunk_elements<T, N>();
#pragma unroll
  for (int j = 0; j < N; j += C) {
    Pack<T, C> chunk;
#pragma unroll
    for (int k = 0; k < C; ++k) chunk.v[k] = in[j + k];
    *reinterpret_cast<Pack<T, C>*>(p + j) = chunk;
  }
}

template <typename T, int N>
bool is_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % vec_alignment<T, N>() == 0;
}

int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// One output element from its inputs (the same call as the CPU loop makes).
template <int MODE, typename T, typename xbar_t, typename eps_t>
__device__ __forceinline__ void update_element(const StepConstants<T>& c, xbar_t xbar, eps_t eps, eps_t a1, eps_t a2,
                                               eps_t a3, xbar_t& new_xbar, eps_t& new_x) {
  const T value = updated_xbar<T, MODE>(c, static_cast<T>(xbar), static_cast<T>(eps), static_cast<T>(a1),
                                        static_cast<T>(a2), static_cast<T>(a3));
  new_xbar = static_cast<xbar_t>(value);
  new_x = static_cast<eps_t>(value * c.scale);
}

// VEC > 1 only when all pointers are aligned for it and, for genie, per_sample % VEC == 0
// (then a vector never straddles two samples and the k blocks stay aligned).  For genie,
// k1, k2, k3 of element i in sample s sit at i + 2sP, + P, + 2P (P = per_sample).
template <typename xbar_t, typename eps_t, int MODE, int VEC>
__global__ void __launch_bounds__(kThreads)
    taylor_update_kernel(const xbar_t* __restrict__ xbar, const eps_t* __restrict__ eps, const eps_t* __restrict__ aux,
                         const double* __restrict__ gammas, xbar_t* __restrict__ new_xbar, eps_t* __restrict__ new_x,
                         int64_t step, int64_t numel, int64_t per_sample) {
  using T = compute_t<xbar_t>;
  const StepConstants<T> c = step_constants<T, MODE>(gammas, step);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  // Whole vectors of VEC elements.
  const int64_t vectors = numel / VEC;
  for (int64_t v = first; v < vectors; v += stride) {
    const int64_t i = v * VEC;
    xbar_t xb[VEC];
    eps_t e[VEC], a1[VEC] = {}, a2[VEC] = {}, a3[VEC] = {};
    load_vec<VEC>(xbar + i, xb);
    load_vec<VEC>(eps + i, e);
    if constexpr (MODE == kGenie) {
      const eps_t* k = aux + i + 2 * (i / per_sample) * per_sample;
      load_vec<VEC>(k, a1);
      load_vec<VEC>(k + per_sample, a2);
      load_vec<VEC>(k + 2 * per_sample, a3);
    } else if constexpr (MODE == kAb2) {
      load_vec<VEC>(aux + i, a1);
    }
    xbar_t out_xbar[VEC];
    eps_t out_x[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) update_element<MODE>(c, xb[j], e[j], a1[j], a2[j], a3[j], out_xbar[j], out_x[j]);
    store_vec<VEC>(new_xbar + i, out_xbar);
    store_vec<VEC>(new_x + i, out_x);
  }

  // The scalar tail: the last numel % VEC elements (all of them when VEC == 1).
  for (int64_t i = vectors * VEC + first; i < numel; i += stride) {
    eps_t a1{}, a2{}, a3{};
    if constexpr (MODE == kGenie) {
      const eps_t* k = aux + i + 2 * (i / per_sample) * per_sample;
      a1 = k[0];
      a2 = k[per_sample];
      a3 = k[2 * per_sample];
    } else if constexpr (MODE == kAb2) {
      a1 = aux[i];
    }
    update_element<MODE>(c, xbar[i], eps[i], a1, a2, a3, new_xbar[i], new_x[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> taylor_update_cuda(const at::Tensor& xbar, const at::Tensor& eps,
                                                      const c10::optional<at::Tensor>& aux, const at::Tensor& gammas,
                                                      int64_t step, c10::string_view mode_name) {
  const Mode mode = check_inputs(xbar, eps, aux, gammas, step, mode_name);
  const c10::cuda::CUDAGuard device_guard(xbar.device());
  at::Tensor new_xbar = at::empty_like(xbar);
  at::Tensor new_x = at::empty_like(eps);
  const int64_t numel = xbar.numel();
  if (numel == 0) return {new_xbar, new_x};
  const at::Tensor grid = gammas_as_double(gammas);  // stays on the device: no sync
  const int64_t per_sample = per_sample_numel(xbar);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count(xbar.get_device())) * kBlocksPerSM;

  dispatch(xbar, eps, mode, [&](auto xbar_tag, auto eps_tag, auto mode_tag) {
    using xbar_t = decltype(xbar_tag);
    using eps_t = decltype(eps_tag);
    constexpr int MODE = decltype(mode_tag)::value;
    constexpr int VEC = static_cast<int>(16 / sizeof(eps_t));
    const xbar_t* xbar_p = xbar.data_ptr<xbar_t>();
    const eps_t* eps_p = eps.data_ptr<eps_t>();
    const eps_t* aux_p = MODE == kDdim ? nullptr : aux->data_ptr<eps_t>();
    xbar_t* new_xbar_p = new_xbar.data_ptr<xbar_t>();
    eps_t* new_x_p = new_x.data_ptr<eps_t>();
    const double* grid_p = grid.data_ptr<double>();

    const bool vectorise = is_aligned<xbar_t, VEC>(xbar_p) && is_aligned<eps_t, VEC>(eps_p) &&
                           is_aligned<xbar_t, VEC>(new_xbar_p) && is_aligned<eps_t, VEC>(new_x_p) &&
                           (MODE == kDdim || is_aligned<eps_t, VEC>(aux_p)) &&
                           (MODE != kGenie || per_sample % VEC == 0);
    const int64_t items = vectorise ? std::max<int64_t>(numel / VEC, 1) : numel;
    const int blocks = static_cast<int>(std::min((items + kThreads - 1) / kThreads, max_blocks));
    if (vectorise) {
      taylor_update_kernel<xbar_t, eps_t, MODE, VEC><<<blocks, kThreads, 0, stream>>>(
          xbar_p, eps_p, aux_p, grid_p, new_xbar_p, new_x_p, step, numel, per_sample);
    } else {
      taylor_update_kernel<xbar_t, eps_t, MODE, 1><<<blocks, kThreads, 0, stream>>>(
          xbar_p, eps_p, aux_p, grid_p, new_xbar_p, new_x_p, step, numel, per_sample);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {new_xbar, new_x};
}

}  // namespace

}  // namespace genie_cpp

TORCH_LIBRARY_IMPL(genie_cpp, CUDA, m) {
  m.impl("taylor_update", &genie_cpp::taylor_update_cuda);
}
