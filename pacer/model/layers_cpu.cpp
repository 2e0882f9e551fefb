// Fused elementwise layers for CPU: RMSNorm (optionally with the residual add before it) and SiLU-and-mul.
//
// torch runs RMSNorm as a chain of eight ops (cast, pow, mean, add, rsqrt, mul, cast, mul) and SiLU-and-mul as
// two, each a pass over the activations and a dispatch; 61 norms and 30 activations a step took ~10 % of a bf16
// decode step under torch.profiler (replacing them gained 3-12 % end to end, benchmarks/RESULTS.md). Rounding
// follows torch's ops step for step (normalise in fp32, round to the dtype, scale by the weight, round; SiLU
// rounded before the product), so outputs differ from the unfused path only by the order of the sum of squares.
//
// Built with attention_cpu.cpp into one extension (pacer/model/cpu_kernels.py); registers
// torch.ops.pacer_layers.{rms_norm, add_rms_norm, silu_and_mul}.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "cpu_vec.h"

namespace {

using namespace pacer_cpu;

// Rows per thread: below this many elements a call stays on the calling thread (waking the team costs more).
constexpr int64_t kMinParallelElements = 1 << 16;

int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, kMinParallelElements / row_elements); }

template <typename T>
inline T round_to(float x) {
  T out;
  store(x, &out);
  return out;
}

// out = x / rms(x) * w, one row of d elements.
template <typename T>
void rms_row(const T* x, const T* w, T* out, int64_t d, float eps) {
  const int64_t whole = d / 16 * 16;
  f32x16 acc = {};
  for (int64_t i = 0; i < whole; i += 16) {
    const f32x16 v = load16(x + i);
    acc += v * v;
  }
  float ss = hsum(acc);
  for (int64_t i = whole; i < d; ++i) ss += to_float(x[i]) * to_float(x[i]);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < whole; i += 16) store16(round16<T>(load16(x + i) * inv) * load16(w + i), out + i);
  for (int64_t i = whole; i < d; ++i) store(to_float(round_to<T>(to_float(x[i]) * inv)) * to_float(w[i]), out + i);
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [rows, d]");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [d] of x's dtype");
}

template <typename T>
void rms_norm_typed(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out, T* residual) {
  const int64_t rows = x.size(0), d = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = xp + r * d;
      if (residual != nullptr) {  // residual += x, then normalise the sum
        T* res = residual + r * d;
        const int64_t whole = d / 16 * 16;
        for (int64_t i = 0; i < whole; i += 16) store16(load16(src + i) + load16(res + i), res + i);
        for (int64_t i = whole; i < d; ++i) store(to_float(src[i]) + to_float(res[i]), res + i);
        src = res;
      }
      rms_row(src, wp, op + r * d, d, static_cast<float>(eps));
    }
  });
}

at::Tensor rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor* residual) {
  check_norm(x, weight);
  if (residual != nullptr)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(),
                "residual must be a contiguous tensor of x's shape and dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  switch (x.scalar_type()) {
    case at::kFloat:
      rms_norm_typed<float>(x, weight, eps, out, residual ? residual->mutable_data_ptr<float>() : nullptr);
      break;
    case at::kBFloat16:
      rms_norm_typed<bf16>(x, weight, eps, out, residual ? residual->mutable_data_ptr<bf16>() : nullptr);
      break;
    default:
      TORCH_CHECK(false, "rms_norm supports float32 and bfloat16, got ", x.scalar_type());
  }
  return out;
}

// RMSNorm of each row of x [rows, d].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_impl(x, weight, eps, nullptr);
}

// residual += x (in place), then RMSNorm of each row of the sum: a decoder layer's residual add and the next norm.
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight, double eps) {
  return rms_norm_impl(x, weight, eps, &residual);
}

// silu(g) * u of a 16-lane vector pair, each product rounded as torch rounds F.silu(g) * u.
template <typename T>
inline void silu_mul16(const T* g, const T* u, T* out) {
  const f32x16 x = load16(g);
  const f32x16 e = exp_nonpositive(select(x < 0.0f, x, -x));  // exp(-|x|), never overflows
  const f32x16 sigmoid = select(x < 0.0f, e, f32x16{} + 1.0f) / (1.0f + e);
  store16(round16<T>(x * sigmoid) * load16(u), out);
}

template <typename T>
void silu_and_mul_typed(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), n = out.size(1), whole = n / 16 * 16;
  const T* gp = gate_up.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * 2 * n;
      const T* u = g + n;
      T* o = op + r * n;
      for (int64_t i = 0; i < whole; i += 16) silu_mul16(g + i, u + i, o + i);
      for (int64_t i = whole; i < n; ++i) {
        const float x = to_float(g[i]);
        store(to_float(round_to<T>(x / (1.0f + std::exp(-x)))) * to_float(u[i]), o + i);
      }
    }
  });
}

// gate_up [rows, 2n] (gate then up, as the fused projection lays them out) -> silu(gate) * up [rows, n].
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0 && gate_up.device().is_cpu(),
              "gate_up must be a contiguous CPU [rows, 2n]");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  switch (gate_up.scalar_type()) {
    case at::kFloat:
      silu_and_mul_typed<float>(gate_up, out);
      break;
    case at::kBFloat16:
      silu_and_mul_typed<bf16>(gate_up, out);
      break;
    default:
      TORCH_CHECK(false, "silu_and_mul supports float32 and bfloat16, got ", gate_up.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(pacer_layers, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(pacer_layers, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
}
