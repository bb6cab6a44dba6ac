// The fused Taylor update of one solver step, shared by the CPU (taylor_update.cpp) and
// CUDA (taylor_update_cuda.cu) kernels of the op genie_cpp::taylor_update.
//
//     x̄_{n+1} = x̄_n + h ε_n + ½ h² D_n,     x_{n+1} = x̄_{n+1} / sqrt(1 + γ_{n+1}²),
//     h = γ_{n+1} − γ_n,
//
// with D = 0 ("ddim"), D = −k1/γ + k2 γ/(1+γ²) + k3/(γ(1+γ²)) at γ = γ_n ("genie"; k is the
// head output with 3C channels) or D = (ε_n − ε_{n−1}) / (γ_n − γ_{n−1}) ("ab2").
//
// The arithmetic is, operation for operation and in the same order, that of
// taylor_update_reference in genie_kernels/fast/update.py: values of the γ grid are
// combined in float64 and then cast, everything per element runs in the compute type
// (float32, or float64 when x̄ is float64).  Bitwise parity with the reference needs the
// compiler not to contract a*b+c into an FMA: the builds pass -ffp-contract=off (C++) and
// --fmad=false (nvcc).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace genie_cpp {

enum Mode : int { kDdim = 0, kGenie = 1, kAb2 = 2 };

// Per-step constants, computed once per launch (CPU) or per thread from the γ grid in
// device memory (CUDA: no host sync, so the launch can be captured in a CUDA graph).
template <typename T>
struct StepConstants {
  T h;             // γ_{n+1} − γ_n: difference in float64, then cast
  T half_h2;       // (½ h) h in T, as the reference's `0.5 * h * h`
  T scale;         // 1 / sqrt(1 + γ_{n+1}²): float64, then cast
  T gamma;         // genie: γ_n
  T g_over_1pg2;   // genie: γ / (1 + γ²)
  T g_times_1pg2;  // genie: γ (1 + γ²)
  T dgamma;        // ab2: γ_n − γ_{n−1}: difference in float64, then cast
};

template <typename T, int MODE>
C10_HOST_DEVICE inline StepConstants<T> step_constants(const double* gammas, int64_t step) {
  const double g0 = gammas[step];
  const double g1 = gammas[step + 1];
  StepConstants<T> c{};
  c.h = static_cast<T>(g1 - g0);
  c.half_h2 = (T(0.5) * c.h) * c.h;
  c.scale = static_cast<T>(1.0 / ::sqrt(1.0 + g1 * g1));
  if (MODE == kGenie) {
    c.gamma = static_cast<T>(g0);
    const T one_plus_g2 = T(1) + c.gamma * c.gamma;
    c.g_over_1pg2 = c.gamma / one_plus_g2;
    c.g_times_1pg2 = c.gamma * one_plus_g2;
  }
  if (MODE == kAb2) {
    c.dgamma = static_cast<T>(g0 - gammas[step - 1]);
  }
  return c;
}

// x̄_{n+1} of one element in the compute type T.  a1, a2, a3 are k1, k2, k3 (genie), a1 is
// ε_{n−1} (ab2); unused ones are ignored.
template <typename T, int MODE>
C10_HOST_DEVICE inline T updated_xbar(const StepConstants<T>& c, T xbar, T eps, T a1, T a2, T a3) {
  T increment = c.h * eps;
  if (MODE == kGenie) {
    const T derivative = -a1 / c.gamma + a2 * c.g_over_1pg2 + a3 / c.g_times_1pg2;
    increment = increment + c.half_h2 * derivative;
  } else if (MODE == kAb2) {
    increment = increment + c.half_h2 * (eps - a1) / c.dgamma;
  }
  return xbar + increment;
}

// Compute type of a storage pair: float64 when x̄ is float64, float32 otherwise.
template <typename xbar_t>
using compute_t = typename std::conditional<std::is_same<xbar_t, double>::value, double, float>::type;

template <int M>
using ModeTag = std::integral_constant<int, M>;

// Calls body(xbar_t{}, eps_t{}, ModeTag<MODE>{}) for the storage types of x̄ (float32,
// float64) and ε/aux (float32, float16, bfloat16, float64) and the mode.
template <typename F>
void dispatch(const at::Tensor& xbar, const at::Tensor& eps, Mode mode, const F& body) {
  AT_DISPATCH_FLOATING_TYPES(xbar.scalar_type(), "taylor_update (xbar)", [&] {
    using xbar_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps.scalar_type(), "taylor_update (eps)", [&] {
      using eps_t = scalar_t;
      switch (mode) {
        case kDdim: body(xbar_t{}, eps_t{}, ModeTag<kDdim>{}); break;
        case kGenie: body(xbar_t{}, eps_t{}, ModeTag<kGenie>{}); break;
        case kAb2: body(xbar_t{}, eps_t{}, ModeTag<kAb2>{}); break;
      }
    });
  });
}

// Host-side helpers defined in taylor_update.cpp and used by both back ends.

// Validates the arguments as genie_kernels.kernels.update._check does (plus device,
// contiguity and dtype checks) and returns the mode.
Mode check_inputs(const at::Tensor& xbar, const at::Tensor& eps, const c10::optional<at::Tensor>& aux,
                  const at::Tensor& gammas, int64_t step, c10::string_view mode);

// The γ grid as float64 (a float32 grid is converted on its own device, without a sync).
at::Tensor gammas_as_double(const at::Tensor& gammas);

// Elements per sample: numel / batch (1 for an empty batch, to keep divisions defined).
int64_t per_sample_numel(const at::Tensor& xbar);

}  // namespace genie_cpp
