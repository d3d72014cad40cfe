// PACT fake quantization on a CPU in one pass forward and one pass backward.
//
// The same mathematics as hwsearch.fused.FusedPact (and the reference quant._PactQuant), for float
// and double tensors on a CPU: where the operator-by-operator version reads and writes the
// activation some six times forward and six backward, this reads it once each way. Registered as
// torch.ops.hwsearch.pact_forward / pact_backward; hwsearch/fused.py builds and loads it on first use
// and falls back to the ATen version when no compiler is available.
//
// c = [alpha, lo, delta, inv, offset, k_alpha, k_beta] (the row pact_scalars makes for the layer):
//   y = clip(x, lo, alpha), t = (y - lo)/delta = y*inv + offset, r = round(t) (half to even),
//   out = lo + delta*r.
// The forward saves one tensor, `code`: the rounding error r - t inside [lo, alpha] (|.| <= 1/2),
// +2 above the clip and -2 below it. Backward: x gets g inside; with s_err = sum(g*err) and
// s_clip = sum(g) above (minus sum(g) below when signed), alpha gets s_clip + k_alpha*s_err and
// beta k_beta*s_err.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kChunk = 16384;  // elements per task; partial sums per chunk keep results thread-count independent

// Round half to even for |t| < 2^22 (float), as torch.round, without a libm call per element: adding
// and subtracting 1.5*2^mantissa leaves the nearest integer under the default rounding mode (this
// file is compiled without -ffast-math, so the compiler keeps both operations).
template <typename T> struct Magic;
template <> struct Magic<float> { static constexpr float value = 12582912.0f; };          // 1.5 * 2^23
template <> struct Magic<double> { static constexpr double value = 6755399441055744.0; };  // 1.5 * 2^52

// One range of the forward pass. Branch-free per element (selects), so the compiler vectorizes it.
// Exact: false rounds with the added constant (|t| < 2^22), true with std::nearbyint (more levels than
// that, e.g. a 32-bit last layer; a libm call per element).
template <typename T, bool Signed, bool Exact>
void forward_range(const T* __restrict x, T* __restrict out, T* __restrict code, int64_t begin, int64_t end,
                   T alpha, T lo, T delta, T inv, T offset) {
  const T m = Magic<T>::value;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T xi = x[i];
    T y = xi < alpha ? xi : alpha;
    y = y > lo ? y : lo;
    T t = y * inv;
    if constexpr (Signed) t = t + offset;
    const T r = Exact ? std::nearbyint(t) : (t + m) - m;
    T o = r * delta;
    if constexpr (Signed) o = o + lo;
    out[i] = o;
    const bool above = xi > alpha, below = xi < lo;
    const T side = above ? T(2) : T(-2);
    code[i] = (above | below) ? side : r - t;
  }
}

template <typename T, bool Signed>
void forward_kernel(const T* x, T* out, T* code, int64_t n, const double* c) {
  const T alpha = static_cast<T>(c[0]), lo = static_cast<T>(c[1]), delta = static_cast<T>(c[2]);
  const T inv = static_cast<T>(c[3]), offset = static_cast<T>(c[4]);
  const bool exact = std::abs(c[3] * (c[0] - c[1])) >= double(1 << 21);  // the levels, 2^b - 1
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    if (exact) {
      forward_range<T, Signed, true>(x, out, code, begin, end, alpha, lo, delta, inv, offset);
    } else {
      forward_range<T, Signed, false>(x, out, code, begin, end, alpha, lo, delta, inv, offset);
    }
  });
}

// One chunk of the backward pass: the input's gradient (when gx is not null) and the chunk's two sums.
template <typename T, bool Signed, bool NeedX>
void backward_range(const T* __restrict g, const T* __restrict code, T* __restrict gx, int64_t begin,
                    int64_t end, double* e_out, double* k_out) {
  T e = 0, k = 0;
#pragma omp simd reduction(+ : e, k)
  for (int64_t i = begin; i < end; ++i) {
    const T cd = code[i], gi = g[i];
    const bool inside = (cd <= T(1)) & (cd >= T(-1));
    if constexpr (NeedX) gx[i] = inside ? gi : T(0);
    e += inside ? gi * cd : T(0);
    if constexpr (Signed) {
      k += inside ? T(0) : (cd > T(0) ? gi : -gi);
    } else {
      k += cd > T(1) ? gi : T(0);
    }
  }
  *e_out = e;
  *k_out = k;
}

template <typename T, bool Signed, bool NeedX>
void backward_kernel(const T* g, const T* code, T* gx, int64_t n, double* sums) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(2 * chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t begin = ch * kChunk, end = std::min(n, begin + kChunk);
      backward_range<T, Signed, NeedX>(g, code, gx, begin, end, &part[2 * ch], &part[2 * ch + 1]);
    }
  });
  sums[0] = sums[1] = 0.0;
  for (int64_t ch = 0; ch < chunks; ++ch) {  // in chunk order: the same sum whatever the thread count
    sums[0] += part[2 * ch];
    sums[1] += part[2 * ch + 1];
  }
}

std::vector<double> read_consts(const at::Tensor& c) {
  TORCH_CHECK(c.device().is_cpu() && c.dim() == 1 && c.numel() == 7,
              "pact: constants must be a CPU vector of 7 [alpha, lo, delta, inv, offset, k_alpha, k_beta]");
  const at::Tensor cd = c.to(at::kDouble).contiguous();
  const double* p = cd.data_ptr<double>();
  return std::vector<double>(p, p + 7);
}

std::tuple<at::Tensor, at::Tensor> pact_forward(const at::Tensor& x_in, const at::Tensor& consts, bool is_signed) {
  TORCH_CHECK(x_in.device().is_cpu(), "pact_forward: CPU tensors only");
  const std::vector<double> c = read_consts(consts);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor code = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pact_forward", [&] {
    auto* f = is_signed ? &forward_kernel<scalar_t, true> : &forward_kernel<scalar_t, false>;
    f(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), code.data_ptr<scalar_t>(), x.numel(), c.data());
  });
  return {out, code};
}

// Returns the input's gradient (an empty tensor when need_x is false) and [grad alpha, grad beta].
std::tuple<at::Tensor, at::Tensor> pact_backward(const at::Tensor& g_in, const at::Tensor& code,
                                                 const at::Tensor& consts, bool is_signed, bool need_x) {
  TORCH_CHECK(g_in.device().is_cpu() && code.is_contiguous() && g_in.numel() == code.numel(),
              "pact_backward: CPU tensors of the forward's shape");
  const std::vector<double> c = read_consts(consts);
  const at::Tensor g = g_in.to(code.scalar_type()).contiguous();
  at::Tensor gx = need_x ? at::empty_like(code, at::MemoryFormat::Contiguous) : at::empty({0}, code.options());
  double sums[2];
  AT_DISPATCH_FLOATING_TYPES(code.scalar_type(), "pact_backward", [&] {
    auto* f = is_signed ? (need_x ? &backward_kernel<scalar_t, true, true> : &backward_kernel<scalar_t, true, false>)
                        : (need_x ? &backward_kernel<scalar_t, false, true> : &backward_kernel<scalar_t, false, false>);
    f(g.data_ptr<scalar_t>(), code.data_ptr<scalar_t>(), need_x ? gx.data_ptr<scalar_t>() : nullptr,
      code.numel(), sums);
  });
  at::Tensor grads = at::empty({2}, consts.options());
  const double s_err = sums[0], s_clip = sums[1];
  AT_DISPATCH_FLOATING_TYPES(consts.scalar_type(), "pact_backward_grads", [&] {
    scalar_t* p = grads.data_ptr<scalar_t>();
    p[0] = static_cast<scalar_t>(s_clip + c[5] * s_err);
    p[1] = static_cast<scalar_t>(c[6] * s_err);
  });
  return {gx, grads};
}

}  // namespace

TORCH_LIBRARY(hwsearch, m) {
  m.def("pact_forward(Tensor x, Tensor consts, bool is_signed) -> (Tensor, Tensor)");
  m.def("pact_backward(Tensor g, Tensor code, Tensor consts, bool is_signed, bool need_x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hwsearch, CPU, m) {
  m.impl("pact_forward", &pact_forward);
  m.impl("pact_backward", &pact_backward);
}
