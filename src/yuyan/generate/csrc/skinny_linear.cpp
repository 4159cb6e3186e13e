// y (M, N) = x (M, K) @ w (N, K)^T [+ b (N)] for the few rows M of a decoding step.
//
// A decode step multiplies a few rows by every weight matrix, so it is bound by reading the weights from
// memory, not by arithmetic. General GEMM kernels (MKL's sgemm on AMD CPUs in particular) reach only a part
// of the memory bandwidth on such skinny products. Here each thread streams one contiguous range of
// weight rows exactly once, front to back, while all M rows of x stay in L1: each weight vector is
// loaded once and used for M fused multiply-adds. Compiled for the host CPU by yuyan/generate/kernels.py
// (torch.utils.cpp_extension), registered as torch.ops.yuyan.skinny_linear.
//
// bfloat16 x and w (a model cast to bf16) take the same path with half the bytes to read: products are
// accumulated in float32 and the output rounded to bf16 once. With AVX512-BF16 one vdpbf16ps does 32
// multiply-adds; elsewhere each 16 weights are widened to float32 by a shift (bf16 is fp32's top half).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

// The native vector: one AVX-512 register, or one AVX2 register where the CPU has no AVX-512. With 64-byte
// GCC vectors on an AVX2-only CPU, g++ 12 kept the accumulators on the stack (stored and reloaded every
// step): the kernel streamed 4.8 GB/s on a Zen 3 EPYC that way, 20 GB/s with 32-byte vectors (torch: 16).
#if defined(__AVX512F__)
typedef float vec __attribute__((vector_size(64)));
#else
typedef float vec __attribute__((vector_size(32)));
#endif
constexpr int L = sizeof(vec) / sizeof(float);  // floats per vector
constexpr int P = 16 / L;                       // vectors per step of 16 floats
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

inline vec load(const float* p) {  // unaligned load
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(const vec (&acc)[P]) {  // the sum of P vectors' lanes
  vec a = acc[0];
  for (int p = 1; p < P; ++p) a += acc[p];
#if defined(__AVX512F__)
  const v8 s = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const v8 s = a;
#endif
  v4 t = __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
  return (t[0] + t[2]) + (t[1] + t[3]);
}

typedef uint16_t hvec __attribute__((vector_size(sizeof(vec) / 2)));  // L bf16 values
typedef uint32_t uvec __attribute__((vector_size(sizeof(vec))));

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline vec load(const uint16_t* p) {  // L bf16 -> L float32: zero-extend, shift into the top half
  hvec h;
  std::memcpy(&h, p, sizeof h);
  const uvec u = __builtin_convertvector(h, uvec) << 16;
  vec f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Sums of the products of MM rows of x with the weight row wn over k = 0..K rounded down to 16, in s; returns
// that k. Each 16 weights are loaded once (float32, or bf16 widened by load) and used for MM multiply-adds.
template <int MM, typename T>
int64_t dots(const T* x, const T* wn, int64_t K, float (&s)[MM]) {
  vec acc[MM][P] = {};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    vec wv[P];
    for (int p = 0; p < P; ++p) wv[p] = load(wn + k + p * L);
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m)
      for (int p = 0; p < P; ++p) acc[m][p] += wv[p] * load(x + m * K + k + p * L);
  }
  for (int m = 0; m < MM; ++m) s[m] = hsum(acc[m]);
  return k;
}

// Outputs n0..n1-1 for MM rows of x: one weight row at a time, each weight read once (x's rows come from
// L1). One row at a time keeps a single sequential stream per thread; interleaving 2-4 rows measured 2x
// slower for 2-4 rows of x (hardware prefetch).
template <int MM>
void rows(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N, int64_t n0,
          int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    float s[MM];
    const int64_t k = dots<MM>(x, wn, K, s);
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) {
      for (int64_t kk = k; kk < K; ++kk) s[m] += x[m * K + kk] * wn[kk];  // K % 16 tail
      y[m * N + n] = b ? s[m] + b[n] : s[m];
    }
  }
}

template <int MM>
void run(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N) {
  // one contiguous range of weight rows per thread, read once front to back
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) { rows<MM>(x, w, b, y, K, N, lo, hi); });
}

// ---- bfloat16 weights and rows: half the bytes per weight, float32 accumulation.
// The bf16 twin of rows<MM>: w and x hold bf16 bits, y gets bf16 (rounded to nearest even once).
template <int MM>
void rows_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* b, c10::BFloat16* y, int64_t K,
               int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wn = w + n * K;
    float s[MM];
    int64_t k = 0;
#if defined(__AVX512BF16__)
    __m512 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {  // 32 bf16 pairs per register, one vdpbf16ps per row of x
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wn + k);
#pragma GCC unroll 8
      for (int m = 0; m < MM; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k));
    }
    for (int m = 0; m < MM; ++m) s[m] = _mm512_reduce_add_ps(acc[m]);
#else
    k = dots<MM>(x, wn, K, s);
#endif
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) {
      for (int64_t kk = k; kk < K; ++kk) s[m] += bf16_to_float(x[m * K + kk]) * bf16_to_float(wn[kk]);
      y[m * N + n] = c10::BFloat16(b ? s[m] + bf16_to_float(b[n]) : s[m]);
    }
  }
}

template <int MM>
void run_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* b, c10::BFloat16* y, int64_t K,
              int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) { rows_bf16<MM>(x, w, b, y, K, N, lo, hi); });
}

template <typename T, typename Y>
void passes(void (*const run[8])(const T*, const T*, const T*, Y*, int64_t, int64_t), const T* xp,
            const T* wp, const T* bp, Y* yp, int64_t M, int64_t K, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += 8)  // more than 8 rows: one pass over w per 8 rows
    run[std::min<int64_t>(8, M - m0) - 1](xp + m0 * K, wp, bp, yp + m0 * N, K, N);
}

void (*const RUN_F32[8])(const float*, const float*, const float*, float*, int64_t, int64_t) = {
    run<1>, run<2>, run<3>, run<4>, run<5>, run<6>, run<7>, run<8>};
void (*const RUN_BF16[8])(const uint16_t*, const uint16_t*, const uint16_t*, c10::BFloat16*, int64_t,
                          int64_t) = {run_bf16<1>, run_bf16<2>, run_bf16<3>, run_bf16<4>,
                                      run_bf16<5>, run_bf16<6>, run_bf16<7>, run_bf16<8>};

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear: x (M, K), w (N, K)");
  const auto dt = x.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && w.scalar_type() == dt,
              "skinny_linear: float32 only or bfloat16 only, x and w alike");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "skinny_linear: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear: contiguous x and w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bool has_b = bias.has_value() && bias->defined();
  if (has_b)
    TORCH_CHECK(bias->scalar_type() == dt && bias->is_contiguous() && bias->numel() == N,
                "skinny_linear: bias (N,) of x's dtype");
  at::Tensor y = at::empty({M, N}, x.options());
  if (dt == at::kFloat) {
    passes<float, float>(RUN_F32, x.data_ptr<float>(), w.data_ptr<float>(),
                         has_b ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), M, K, N);
  } else {
    auto bits = [](const at::Tensor& t) {
      return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
    };
    passes<uint16_t, c10::BFloat16>(RUN_BF16, bits(x), bits(w), has_b ? bits(*bias) : nullptr,
                                    y.data_ptr<c10::BFloat16>(), M, K, N);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(yuyan, m) { m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(yuyan, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
