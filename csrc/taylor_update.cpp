// genie_cpp::taylor_update: the fused Taylor update of one solver step as a torch custom
// op, with its CPU kernel (the CUDA kernel is in taylor_update_cuda.cu).  Same arguments,
// results and arithmetic as genie_kernels.kernels.update.taylor_update_reference; see
// taylor_update.h for the formula.  Built by setup.py as genie_kernels._C or JIT-built by
// genie_kernels/fast/ext.py.
#include "taylor_update.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#ifdef GENIE_CPP_PYTHON_MODULE
// setup.py builds this library as the Python module genie_kernels._C, so that
// `import genie_kernels._C` loads it (and registers the op); the module itself is empty.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace genie_cpp {

namespace {

// Every error message is one string (std::to_string for numbers, c10::toString for dtypes),
// never several values streamed through TORCH_CHECK's c10::str, which builds them in a
// std::ostringstream: on the H100 machine (torch 2.11.0+cu130, nvcc 13.0, JIT build) every
// failing check whose message streamed an integer or a shape crashed the process with a
// segfault, while single-string messages raised normally.  The cause was not pinned down
// (a libstdc++ stream mismatch between the build and the process would do it); this
// avoids the path.
std::string shape_string(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

std::string describe_shape(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? shape_string(t->sizes()) : std::string("None");
}

}  // namespace

Mode check_inputs(const at::Tensor& xbar, const at::Tensor& eps, const c10::optional<at::Tensor>& aux,
                  const at::Tensor& gammas, int64_t step, c10::string_view mode_name) {
  // The first checks mirror _check in genie_kernels/fast/update.py, message for message.
  const std::string name(mode_name.data(), mode_name.size());
  Mode mode;
  if (name == "ddim") {
    mode = kDdim;
  } else if (name == "genie") {
    mode = kGenie;
  } else if (name == "ab2") {
    mode = kAb2;
  } else {
    TORCH_CHECK(false, "unknown update mode '" + name + "'; choose one of ('ddim', 'genie', 'ab2')");
  }
  TORCH_CHECK(eps.sizes() == xbar.sizes(),
              "eps has shape " + shape_string(eps.sizes()) + ", x̄ has " + shape_string(xbar.sizes()));
  TORCH_CHECK(gammas.dim() == 1, "gammas must be the 1-D γ grid, got shape " + shape_string(gammas.sizes()));
  TORCH_CHECK(step >= 0 && step < gammas.numel() - 1,
              "step " + std::to_string(step) + " is outside the γ grid of " + std::to_string(gammas.numel()) + " points");
  if (mode == kGenie) {
    TORCH_CHECK(xbar.dim() >= 2,
                "mode 'genie' needs x̄ with a channel dimension (B, C, ...), got shape " + shape_string(xbar.sizes()));
    std::vector<int64_t> expected = xbar.sizes().vec();
    expected[1] *= 3;
    TORCH_CHECK(aux.has_value() && aux->sizes() == at::IntArrayRef(expected),
                "mode 'genie' needs the head output k of shape " + shape_string(expected) + ", got " + describe_shape(aux));
  }
  if (mode == kAb2) {
    TORCH_CHECK(aux.has_value() && aux->sizes() == xbar.sizes(),
                "mode 'ab2' needs the previous eps, shaped like x̄ " + shape_string(xbar.sizes()) + ", got " +
                    describe_shape(aux));
    TORCH_CHECK(step >= 1, "mode 'ab2' needs a previous step (step >= 1)");
  }

  // Device and layout, as taylor_update in update.py checks them.
  std::vector<std::pair<const char*, const at::Tensor*>> tensors = {{"x̄", &xbar}, {"eps", &eps}, {"gammas", &gammas}};
  if (aux.has_value()) tensors.emplace_back("aux", &*aux);
  for (const auto& [label, t] : tensors) {
    TORCH_CHECK(t->device() == xbar.device(), "x̄, eps, aux and gammas must be on one device; x̄ is on " +
                                                  xbar.device().str() + ", " + label + " on " + t->device().str());
    TORCH_CHECK(t->is_contiguous(), std::string("taylor_update needs contiguous tensors; ") + label + " is not contiguous");
  }

  // Storage types the kernels are built for.
  const auto xd = xbar.scalar_type(), ed = eps.scalar_type();
  TORCH_CHECK(xd == at::kFloat || xd == at::kDouble,
              std::string("taylor_update: x̄ must be float32 or float64, got ") + c10::toString(xd));
  TORCH_CHECK(ed == at::kFloat || ed == at::kHalf || ed == at::kBFloat16 || ed == at::kDouble,
              std::string("taylor_update: eps must be float32, float16, bfloat16 or float64, got ") + c10::toString(ed));
  if (mode != kDdim) {
    TORCH_CHECK(aux->scalar_type() == ed, std::string("taylor_update: aux must have eps's dtype ") + c10::toString(ed) +
                                              ", got " + c10::toString(aux->scalar_type()));
  }
  TORCH_CHECK(gammas.scalar_type() == at::kDouble || gammas.scalar_type() == at::kFloat,
              std::string("taylor_update: gammas must be float64 or float32, got ") +
                  c10::toString(gammas.scalar_type()));
  return mode;
}

at::Tensor gammas_as_double(const at::Tensor& gammas) {
  return gammas.scalar_type() == at::kDouble ? gammas : gammas.to(at::kDouble);
}

int64_t per_sample_numel(const at::Tensor& xbar) {
  const int64_t batch = xbar.dim() > 0 ? xbar.size(0) : 1;
  return batch > 0 ? xbar.numel() / batch : 1;
}

namespace {

// Elements per parallel_for task, as at::internal::GRAIN_SIZE (ATen/TensorIterator.h).
constexpr int64_t kGrainSize = 32768;

#if defined(__GNUC__) || defined(__clang__)
#define GENIE_RESTRICT __restrict__
#define GENIE_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define GENIE_RESTRICT __restrict
#define GENIE_ALWAYS_INLINE __forceinline
#else
#define GENIE_RESTRICT
#define GENIE_ALWAYS_INLINE inline
#endif

// x86 with GCC or Clang: the loop is also compiled for AVX2 (8 floats a vector) and picked at
// run time where the CPU has it; the genie mode's two divisions an element make it about twice
// as fast there.  No FMA either way (-ffp-contract=off), so both equal the reference.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define GENIE_CPP_AVX2_CLONE 1
#endif

// Elements [begin, end) of the flat tensors.  For genie, k1, k2, k3 of element i in sample
// s sit at i + 2sP, i + 2sP + P and i + 2sP + 2P (P = per_sample), so the range is walked
// one sample at a time; the other modes take it in one stretch.  The outputs are fresh
// tensors, so they alias no input (GENIE_RESTRICT).
template <typename xbar_t, typename eps_t, int MODE, typename T = compute_t<xbar_t>>
GENIE_ALWAYS_INLINE void update_range(const StepConstants<T>& c, const xbar_t* GENIE_RESTRICT xbar,
                                      const eps_t* GENIE_RESTRICT eps, const eps_t* GENIE_RESTRICT aux,
                                      xbar_t* GENIE_RESTRICT new_xbar, eps_t* GENIE_RESTRICT new_x,
                                      int64_t per_sample, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end;) {
    const int64_t sample = MODE == kGenie ? i / per_sample : 0;
    const int64_t stop = MODE == kGenie ? std::min(end, (sample + 1) * per_sample) : end;
    const eps_t* k = MODE == kGenie ? aux + 2 * sample * per_sample : aux;
    for (; i < stop; ++i) {
      T a1 = 0, a2 = 0, a3 = 0;
      if constexpr (MODE == kGenie) {
        a1 = static_cast<T>(k[i]);
        a2 = static_cast<T>(k[i + per_sample]);
        a3 = static_cast<T>(k[i + 2 * per_sample]);
      } else if constexpr (MODE == kAb2) {
        a1 = static_cast<T>(aux[i]);
      }
      const T value = updated_xbar<T, MODE>(c, static_cast<T>(xbar[i]), static_cast<T>(eps[i]), a1, a2, a3);
      new_xbar[i] = static_cast<xbar_t>(value);
      new_x[i] = static_cast<eps_t>(value * c.scale);
    }
  }
}

template <typename xbar_t, typename eps_t, int MODE, typename T = compute_t<xbar_t>>
void update_range_baseline(const StepConstants<T>& c, const xbar_t* xbar, const eps_t* eps, const eps_t* aux,
                           xbar_t* new_xbar, eps_t* new_x, int64_t per_sample, int64_t begin, int64_t end) {
  update_range<xbar_t, eps_t, MODE>(c, xbar, eps, aux, new_xbar, new_x, per_sample, begin, end);
}

#ifdef GENIE_CPP_AVX2_CLONE
template <typename xbar_t, typename eps_t, int MODE, typename T = compute_t<xbar_t>>
__attribute__((target("avx2"))) void update_range_avx2(const StepConstants<T>& c, const xbar_t* xbar,
                                                       const eps_t* eps, const eps_t* aux, xbar_t* new_xbar,
                                                       eps_t* new_x, int64_t per_sample, int64_t begin, int64_t end) {
  update_range<xbar_t, eps_t, MODE>(c, xbar, eps, aux, new_xbar, new_x, per_sample, begin, end);
}

// GENIE_KERNELS_NO_AVX2=1 takes the baseline loop (the tests run both).
bool use_avx2() {
  static const bool use = __builtin_cpu_supports("avx2") && std::getenv("GENIE_KERNELS_NO_AVX2") == nullptr;
  return use;
}
#endif

std::tuple<at::Tensor, at::Tensor> taylor_update_cpu(const at::Tensor& xbar, const at::Tensor& eps,
                                                     const c10::optional<at::Tensor>& aux, const at::Tensor& gammas,
                                                     int64_t step, c10::string_view mode_name) {
  const Mode mode = check_inputs(xbar, eps, aux, gammas, step, mode_name);
  at::Tensor new_xbar = at::empty_like(xbar);
  at::Tensor new_x = at::empty_like(eps);
  const at::Tensor grid = gammas_as_double(gammas);
  const int64_t numel = xbar.numel();
  const int64_t per_sample = per_sample_numel(xbar);
  if (numel == 0) return {new_xbar, new_x};

  dispatch(xbar, eps, mode, [&](auto xbar_tag, auto eps_tag, auto mode_tag) {
    using xbar_t = decltype(xbar_tag);
    using eps_t = decltype(eps_tag);
    using T = compute_t<xbar_t>;
    constexpr int MODE = decltype(mode_tag)::value;
    const StepConstants<T> c = step_constants<T, MODE>(grid.data_ptr<double>(), step);
    const xbar_t* xbar_p = xbar.data_ptr<xbar_t>();
    const eps_t* eps_p = eps.data_ptr<eps_t>();
    const eps_t* aux_p = MODE == kDdim ? nullptr : aux->data_ptr<eps_t>();
    xbar_t* new_xbar_p = new_xbar.data_ptr<xbar_t>();
    eps_t* new_x_p = new_x.data_ptr<eps_t>();
    at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
#ifdef GENIE_CPP_AVX2_CLONE
      if (use_avx2()) {
        update_range_avx2<xbar_t, eps_t, MODE>(c, xbar_p, eps_p, aux_p, new_xbar_p, new_x_p, per_sample, begin, end);
        return;
      }
#endif
      update_range_baseline<xbar_t, eps_t, MODE>(c, xbar_p, eps_p, aux_p, new_xbar_p, new_x_p, per_sample, begin, end);
    });
  });
  return {new_xbar, new_x};
}

}  // namespace

}  // namespace genie_cpp

TORCH_LIBRARY(genie_cpp, m) {
  m.def("taylor_update(Tensor xbar, Tensor eps, Tensor? aux, Tensor gammas, int step, str mode) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(genie_cpp, CPU, m) {
  m.impl("taylor_update", &genie_cpp::taylor_update_cpu);
}
