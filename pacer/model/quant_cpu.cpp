// Linear layers over GGUF's own quantized blocks (Q4_0, Q4_1, Q8_0), for CPU.
//
// A decode step at small batch streams every weight once and does little with it: in fp32 that is ~540 MB per step
// for SmolLM2, in Q4_1 ~100 MB. These kernels keep the file's blocks as they are (32 weights per block, fp16 scale,
// and for Q4_1 an fp16 minimum) and decode each block in registers right before its multiply-adds, so the bytes
// that cross the memory bus are the file's. Activations stay fp32 (one activation row meets four weight rows per
// tile, more rows share each decoded block), or, asked for, are rounded to int8 blocks for integer dot products as
// llama.cpp does (AVX2). From `gemm_from` rows on (prefill) the work is arithmetic, not bytes: slices of the weight
// are dequantized bit-exactly (as gguf.quants does) and multiplied by the fp32 GEMM.
//
// Built with the other CPU kernels into one extension (pacer/model/cpu_kernels.py); registers
// torch.ops.pacer_quant.{linear, dequantize, int8_activations}.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// ggml's type ids, as the GGUF file and gguf.GGMLQuantizationType number them.
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;
constexpr int64_t kBlock = 32;  // weights per block, all three formats

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

inline f32x8 splat(float v) { return f32x8{v, v, v, v, v, v, v, v}; }  // not {} + v: that turns -0 into +0

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Keeps the compiler from fusing a multiply into the add after it (the extension builds with -ffp-contract=fast),
// where a result must round as gguf.quants' numpy does: once after the multiply, once after the add.
inline f32x8 rounded(f32x8 v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}

// A Q4 block's 16 bytes of nibbles (weight i low in byte i, weight i + 16 high) and a Q8_0 block's 32 int8 as the
// block's 32 weights in order, in four 8-lane float vectors.
#if defined(__AVX2__)
// Bytes widen straight from memory to int32 lanes, where the nibbles split with a mask and a shift: two shuffles a
// Q4 block instead of five (the shuffle port is what limits this loop).
inline __m256i widen8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }

inline void nibbles_to_f32(const uint8_t* p, f32x8 w[4]) {
  const __m256i a = widen8(p), b = widen8(p + 8), low = _mm256_set1_epi32(0x0F);
  w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, low));
  w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
  w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
  w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

inline void int8s_to_f32(const uint8_t* p, f32x8 w[4]) {
  for (int j = 0; j < 4; ++j)
    w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j))));
}
#else  // gcc scalarizes a direct byte -> float conversion; through int32 it vectorizes where it can
template <typename V>
inline void bytes_to_f32(V q, f32x8& lo, f32x8& hi) {
  lo = __builtin_convertvector(__builtin_convertvector(__builtin_shufflevector(q, q, 0, 1, 2, 3, 4, 5, 6, 7), i32x8),
                               f32x8);
  hi = __builtin_convertvector(
      __builtin_convertvector(__builtin_shufflevector(q, q, 8, 9, 10, 11, 12, 13, 14, 15), i32x8), f32x8);
}

inline void nibbles_to_f32(const uint8_t* p, f32x8 w[4]) {
  u8x16 q;
  std::memcpy(&q, p, sizeof(q));
  bytes_to_f32(q & 0x0F, w[0], w[1]);
  bytes_to_f32(q >> 4, w[2], w[3]);
}

inline void int8s_to_f32(const uint8_t* p, f32x8 w[4]) {
  i8x16 q0, q1;
  std::memcpy(&q0, p, sizeof(q0));
  std::memcpy(&q1, p + 16, sizeof(q1));
  bytes_to_f32(q0, w[0], w[1]);
  bytes_to_f32(q1, w[2], w[3]);
}
#endif

// One block's 32 weights as four 8-lane vectors, in order. `exact` rounds as gguf.quants.dequantize does; otherwise
// Q4_1's scale-and-add is one fused multiply-add (what the matmul uses: the products are not bit-exact anyway).
struct Q4_0 {
  static constexpr int64_t kBytes = 18;  // f16 d | 16 bytes: weight i in the low nibble of byte i, i+16 in the high
  template <bool exact>
  static inline void decode(const uint8_t* b, f32x8 w[4]) {
    const f32x8 d = splat(half_at(b));
    nibbles_to_f32(b + 2, w);
    for (int j = 0; j < 4; ++j) w[j] = (w[j] - 8.0f) * d;  // q - 8 is exact: one rounding, as in numpy
  }
};

struct Q4_1 {
  static constexpr int64_t kBytes = 20;  // f16 d | f16 m | 16 bytes of nibbles as Q4_0; value = d * q + m
  template <bool exact>
  static inline void decode(const uint8_t* b, f32x8 w[4]) {
    const f32x8 d = splat(half_at(b)), m = splat(half_at(b + 2));
    nibbles_to_f32(b + 4, w);
    for (int j = 0; j < 4; ++j) w[j] = (exact ? rounded(w[j] * d) : w[j] * d) + m;
  }
};

struct Q8_0 {
  static constexpr int64_t kBytes = 34;  // f16 d | 32 x int8; value = d * q
  template <bool exact>
  static inline void decode(const uint8_t* b, f32x8 w[4]) {
    const f32x8 d = splat(half_at(b));
    int8s_to_f32(b + 2, w);
    for (int j = 0; j < 4; ++j) w[j] *= d;
  }
};

inline float hsum(f32x8 v) {
  float total = 0.0f;
  for (int j = 0; j < 8; ++j) total += v[j];
  return total;
}

// out[m, n] = x[m, :] . W[n, :] with fp32 activations, a tile of MT activation rows from m0 and NT weight rows from
// n0 at a time. Two accumulators per (m, n) pair halve the chain of dependent adds a block makes.
template <typename F>
struct FloatTiles {
  static constexpr int kRowsNT = 1;  // weight rows per tile of several activation rows
  const float* x;
  const uint8_t* w;
  int64_t k;
  float* out;
  int64_t n_out;

  template <int MT, int NT>
  void run(int64_t m0, int64_t n0) const {
    const int64_t blocks = k / kBlock, row_bytes = blocks * F::kBytes;
    f32x8 acc[MT][NT][2] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      for (int n = 0; n < NT; ++n) {
        f32x8 wv[4];
        F::template decode<false>(w + (n0 + n) * row_bytes + b * F::kBytes, wv);
        for (int m = 0; m < MT; ++m) {
          const float* xb = x + (m0 + m) * k + b * kBlock;
          acc[m][n][0] += wv[0] * load8(xb);
          acc[m][n][1] += wv[1] * load8(xb + 8);
          acc[m][n][0] += wv[2] * load8(xb + 16);
          acc[m][n][1] += wv[3] * load8(xb + 24);
        }
      }
    }
    for (int m = 0; m < MT; ++m)
      for (int n = 0; n < NT; ++n) out[(m0 + m) * n_out + n0 + n] = hsum(acc[m][n][0] + acc[m][n][1]);
  }
};

// The schedule both small-batch paths share: weight rows in groups of four across the threads. One activation row
// takes a whole group per tile (four independent chains: it has no other row to share a decoded block with); more
// rows go in tiles of 4, then 2, then 1 against `Tiles::kRowsNT` weight rows, each decoded block meeting every row
// of the tile while it is in registers.
template <typename F, typename Tiles>
void run_tiles(const Tiles& tiles, int64_t rows, int64_t n_out, int64_t k) {
  constexpr int64_t kWide = 4;
  const auto all_rows = [&](auto weight_rows, int64_t n0) {
    constexpr int NT = decltype(weight_rows)::value;
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4) tiles.template run<4, NT>(m, n0);
    for (; m + 2 <= rows; m += 2) tiles.template run<2, NT>(m, n0);
    for (; m < rows; ++m) tiles.template run<1, NT>(m, n0);
  };
  const int64_t groups = n_out / kWide;
  // Enough weight rows per task that waking the thread team pays: ~64 KiB of blocks.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (kWide * (k / kBlock) * F::kBytes));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      if (rows == 1) {
        tiles.template run<1, kWide>(0, g * kWide);
      } else {
        for (int64_t n = g * kWide; n < (g + 1) * kWide; n += Tiles::kRowsNT)
          all_rows(std::integral_constant<int, Tiles::kRowsNT>{}, n);
      }
    }
  });
  for (int64_t n = groups * kWide; n < n_out; ++n) all_rows(std::integral_constant<int, 1>{}, n);
}

// Rows [begin, end) of W as fp32 into out (row stride k), rounded as gguf.quants.dequantize rounds.
template <typename F>
void dequantize_rows(const uint8_t* w, int64_t begin, int64_t end, int64_t k, float* out) {
  const int64_t blocks = k / kBlock, row_bytes = blocks * F::kBytes;
  for (int64_t n = begin; n < end; ++n)
    for (int64_t b = 0; b < blocks; ++b) {
      f32x8 wv[4];
      F::template decode<true>(w + n * row_bytes + b * F::kBytes, wv);
      std::memcpy(out + (n - begin) * k + b * kBlock, wv, sizeof(wv));
    }
}

#if defined(__AVX2__)
// ---- int8 activations (llama.cpp's scheme): each activation row is quantized per block of 32 to int8 with one
// scale, and a block's dot product with the weights is integer multiply-adds (vpmaddubsw + vpmaddwd, or one
// vpdpbusd with VNNI), one conversion and one fma. Not exact: the activations are rounded to 8 bits.
constexpr bool kInt8Activations = true;

// Activations as int8 blocks: q [rows, k], and per block its scale d and d * sum(q) (what a weight block's
// minimum or offset multiplies).
struct Int8Rows {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
};

Int8Rows quantize_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t blocks = rows * (k / kBlock);
  Int8Rows out{std::vector<int8_t>(rows * k), std::vector<float>(blocks), std::vector<float>(blocks)};
  at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = begin; b < end; ++b) {
      const float* xb = x + b * kBlock;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(xb + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float d = _mm_cvtss_f32(m4) / 127.0f;
      const __m256 inv = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
      __m256i q[4];
      for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // round to nearest even
      // int32 -> int8 in order: packs interleave 128-bit lanes, the permute puts them back
      const __m256i q16a = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
      const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + b * kBlock), q8);
      const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
      t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
      out.scale[b] = d;
      out.sum[b] = d * static_cast<float>(_mm_cvtsi128_si32(t4));
    }
  });
  return out;
}

// A weight block as 32 quants in order (Q4: unsigned 0..15; Q8_0: signed) and the scalars of its dot product:
// w . x = d * dx * (q . xq) + offset * (dx * sum(xq)).
inline __m256i nibbles(const uint8_t* p) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Sum of q[i] * x[i] per 4-byte group as int32; `a` unsigned, `b` signed.
inline __m256i dot_u8_s8(__m256i a, __m256i b) {
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

template <typename F>
struct Int8Block;

template <>
struct Int8Block<Q4_0> {
  __m256i q;
  float d, offset;
  explicit Int8Block(const uint8_t* b) : q(nibbles(b + 2)), d(half_at(b)), offset(-8.0f * d) {}
  __m256i dot(__m256i x) const { return dot_u8_s8(q, x); }
};

template <>
struct Int8Block<Q4_1> {
  __m256i q;
  float d, offset;
  explicit Int8Block(const uint8_t* b) : q(nibbles(b + 4)), d(half_at(b)), offset(half_at(b + 2)) {}
  __m256i dot(__m256i x) const { return dot_u8_s8(q, x); }
};

template <>
struct Int8Block<Q8_0> {
  __m256i q;
  float d, offset = 0.0f;
  explicit Int8Block(const uint8_t* b)
      : q(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2))), d(half_at(b)) {}
  // signed x signed through the unsigned-by-signed instruction: |q| times x with q's sign
  __m256i dot(__m256i x) const { return dot_u8_s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)); }
};

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// FloatTiles' product with the activations as int8 blocks.
template <typename F>
struct Int8Tiles {
  static constexpr int kRowsNT = 2;
  const Int8Rows& x;
  const uint8_t* w;
  int64_t k;
  float* out;
  int64_t n_out;

  template <int MT, int NT>
  void run(int64_t m0, int64_t n0) const {
    const int64_t blocks = k / kBlock, row_bytes = blocks * F::kBytes;
    __m256 acc[MT][NT];
    float offsets[MT][NT] = {};
    for (int m = 0; m < MT; ++m)
      for (int n = 0; n < NT; ++n) acc[m][n] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      for (int n = 0; n < NT; ++n) {
        const Int8Block<F> wb(w + (n0 + n) * row_bytes + b * F::kBytes);
        for (int m = 0; m < MT; ++m) {
          const int64_t xb = (m0 + m) * blocks + b;
          const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + xb * kBlock));
          const __m256 dot = _mm256_cvtepi32_ps(wb.dot(xq));
          acc[m][n] = _mm256_fmadd_ps(dot, _mm256_set1_ps(wb.d * x.scale[xb]), acc[m][n]);
          offsets[m][n] += wb.offset * x.sum[xb];
        }
      }
    }
    for (int m = 0; m < MT; ++m)
      for (int n = 0; n < NT; ++n) out[(m0 + m) * n_out + n0 + n] = hsum256(acc[m][n]) + offsets[m][n];
  }
};

template <typename F>
void linear_int8(const float* xp, int64_t rows, const uint8_t* w, int64_t n_out, int64_t k, float* op) {
  const Int8Rows x = quantize_rows(xp, rows, k);
  run_tiles<F>(Int8Tiles<F>{x, w, k, op, n_out}, rows, n_out, k);
}
#else
constexpr bool kInt8Activations = false;

template <typename F>
void linear_int8(const float*, int64_t, const uint8_t*, int64_t, int64_t, float*) {
  TORCH_CHECK(false, "int8 activations need AVX2");
}
#endif

// Weight rows per task of the GEMM path: their fp32 copy (~150 KiB for k = 576) stays in L2 while every activation
// row passes over it.
constexpr int64_t kGemmRows = 64;

template <typename F>
void linear_typed(const at::Tensor& x, const uint8_t* w, int64_t n_out, int64_t k, at::Tensor& out,
                  int64_t gemm_from, bool int8_activations) {
  const int64_t rows = x.size(0);
  if (rows >= gemm_from) {
    // Compute-bound: each task dequantizes a slice of W once and hands it to the fp32 GEMM (one thread per task).
    at::parallel_for(0, (n_out + kGemmRows - 1) / kGemmRows, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode guard;  // per thread: the caller's mode does not reach the pool's threads
      at::Tensor slice = at::empty({kGemmRows, k}, x.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * kGemmRows, n1 = std::min(n_out, n0 + kGemmRows);
        dequantize_rows<F>(w, n0, n1, k, slice.mutable_data_ptr<float>());
        out.narrow(1, n0, n1 - n0).copy_(at::mm(x, slice.narrow(0, 0, n1 - n0).t()));
      }
    });
    return;
  }
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  if (int8_activations) {
    linear_int8<F>(xp, rows, w, n_out, k, op);
    return;
  }
  run_tiles<F>(FloatTiles<F>{xp, w, k, op, n_out}, rows, n_out, k);  // memory-bound: bytes, not arithmetic
}

int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case kQ4_0:
      return Q4_0::kBytes;
    case kQ4_1:
      return Q4_1::kBytes;
    case kQ8_0:
      return Q8_0::kBytes;
    default:
      TORCH_CHECK(false, "pacer_quant: unsupported ggml type ", qtype, " (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8)");
  }
}

// blocks [n_out, k / 32 * block bytes] uint8 -> k, checked.
int64_t check_blocks(const at::Tensor& blocks, int64_t qtype) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.is_contiguous() && blocks.scalar_type() == at::kByte &&
                  blocks.device().is_cpu(),
              "blocks must be a contiguous CPU uint8 [out, in / 32 * block bytes]");
  const int64_t bytes = block_bytes(qtype);
  TORCH_CHECK(blocks.size(1) % bytes == 0, "a row of blocks is not whole blocks of ", bytes, " bytes");
  return blocks.size(1) / bytes * kBlock;
}

// x [rows, in] fp32 . W^T, W given as GGUF blocks [out, in / 32 * block bytes] of `qtype` -> [rows, out] fp32.
// `gemm_from`: from this many rows on, dequantize slices of W and multiply them as fp32 (see linear_typed).
// `int8_activations`: below `gemm_from` rows, quantize x to int8 blocks and use integer dot products (AVX2 only).
at::Tensor linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, int64_t gemm_from,
                  bool int8_activations) {
  TORCH_CHECK(!int8_activations || kInt8Activations, "int8 activations need AVX2");
  const int64_t k = check_blocks(blocks, qtype);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) == k,
              "x must be a contiguous float32 [rows, ", k, "]");
  const int64_t rows = x.size(0), n_out = blocks.size(0);
  at::Tensor out = at::empty({rows, n_out}, x.options());
  const uint8_t* wp = blocks.const_data_ptr<uint8_t>();
  if (rows == 0) return out;
  if (qtype == kQ4_0) linear_typed<Q4_0>(x, wp, n_out, k, out, gemm_from, int8_activations);
  if (qtype == kQ4_1) linear_typed<Q4_1>(x, wp, n_out, k, out, gemm_from, int8_activations);
  if (qtype == kQ8_0) linear_typed<Q8_0>(x, wp, n_out, k, out, gemm_from, int8_activations);
  return out;
}

// GGUF blocks [out, in / 32 * block bytes] of `qtype` -> fp32 [out, in], bit for bit what gguf.quants gives.
at::Tensor dequantize(const at::Tensor& blocks, int64_t qtype) {
  const int64_t k = check_blocks(blocks, qtype), n_out = blocks.size(0);
  at::Tensor out = at::empty({n_out, k}, blocks.options().dtype(at::kFloat));
  const uint8_t* wp = blocks.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, n_out, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
    float* rows_out = op + begin * k;
    if (qtype == kQ4_0) dequantize_rows<Q4_0>(wp, begin, end, k, rows_out);
    if (qtype == kQ4_1) dequantize_rows<Q4_1>(wp, begin, end, k, rows_out);
    if (qtype == kQ8_0) dequantize_rows<Q8_0>(wp, begin, end, k, rows_out);
  });
  return out;
}

bool int8_activations_available() { return kInt8Activations; }

}  // namespace

TORCH_LIBRARY(pacer_quant, m) {
  m.def("linear(Tensor x, Tensor blocks, int qtype, int gemm_from, bool int8_activations) -> Tensor");
  m.def("int8_activations() -> bool", &int8_activations_available);
  m.def("dequantize(Tensor blocks, int qtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(pacer_quant, CPU, m) {
  m.impl("linear", &linear);
  m.impl("dequantize", &dequantize);
}
