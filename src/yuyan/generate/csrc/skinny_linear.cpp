// y (M, N) = x (M, K) @ w (N, K)^T [+ b (N)] for the few rows M of a decoding step.
//
// A decode step multiplies a few rows by every weight matrix, so it is bound by reading the weights from
// memory, not by arithmetic. General GEMM kernels (MKL's sgemm on AMD CPUs in particular) reach only a part
// of the memory bandwidth on such skinny products. Here each thread streams one contiguous range of
// weight rows exactly once, front to back, while all M rows of x stay in L1: each weight vector is
// loaded once and used for M fused multiply-adds. Compiled for the host CPU by yuyan/generate/kernels.py
// (torch.utils.cpp_extension), registered as torch.ops.yuyan.skinny_linear.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>

namespace {

typedef float v16 __attribute__((vector_size(64)));  // one AVX-512 register (two AVX2 ones)
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

inline v16 load(const float* p) {  // unaligned load
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(v16 v) {
  v8 s = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 t = __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
  return (t[0] + t[2]) + (t[1] + t[3]);
}

// Outputs n0..n1-1 for MM rows of x: one weight row at a time, read once into a register per 16 floats and
// used for MM fused multiply-adds (x's rows come from L1). One row at a time keeps a single sequential
// stream per thread; interleaving 2-4 rows measured 2x slower for 2-4 rows of x (hardware prefetch).
template <int MM>
void rows(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N, int64_t n0,
          int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    v16 acc[MM] = {};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const v16 wv = load(wn + k);
#pragma GCC unroll 8
      for (int m = 0; m < MM; ++m) acc[m] += wv * load(x + m * K + k);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) {
      float s = hsum(acc[m]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * wn[kk];  // K % 16 tail
      y[m * N + n] = b ? s + b[n] : s;
    }
  }
}

template <int MM>
void run(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N) {
  // one contiguous range of weight rows per thread, read once front to back
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) { rows<MM>(x, w, b, y, K, N, lo, hi); });
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "skinny_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "skinny_linear: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear: contiguous x and w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "skinny_linear: bias (N,) float32");
    bp = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += 8) {  // more than 8 rows: one pass over w per 8 rows
    const float* xs = xp + m0 * K;
    float* ys = yp + m0 * N;
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: run<1>(xs, wp, bp, ys, K, N); break;
      case 2: run<2>(xs, wp, bp, ys, K, N); break;
      case 3: run<3>(xs, wp, bp, ys, K, N); break;
      case 4: run<4>(xs, wp, bp, ys, K, N); break;
      case 5: run<5>(xs, wp, bp, ys, K, N); break;
      case 6: run<6>(xs, wp, bp, ys, K, N); break;
      case 7: run<7>(xs, wp, bp, ys, K, N); break;
      default: run<8>(xs, wp, bp, ys, K, N); break;
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(yuyan, m) { m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(yuyan, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
