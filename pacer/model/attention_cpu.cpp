// Fused paged attention for CPU: decode, and bf16 prefill chunks on CPUs with AVX-512 BF16; both read K/V blocks
// where they lie in the pool (no gather).
//
// Built lazily with layers_cpu.cpp by pacer/model/cpu_kernels.py (torch.utils.cpp_extension.load); registers
// torch.ops.pacer_attention.{write_kv, decode, prefill}. Light headers only (no torch/extension.h) so the
// one-time build stays short.
//
// Pool layout per layer (contiguous):
//   K: [num_blocks, num_kv_heads, head_dim, block_size]  transposed tile: scores of a block's
//      tokens come out as vectors over tokens, no horizontal sums
//   V: [num_blocks, num_kv_heads, block_size, head_dim]  rows: the weighted sum runs along head_dim
//
// Vector code uses GCC vector extensions (portable: lowered to whatever -march offers) on the
// common shapes; everything else runs a plain loop version that gcc autovectorizes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_vec.h"

namespace {

using namespace pacer_cpu;

// In place over n (a multiple of 16) scores: s -> exp(s - max); returns 1 / sum.
inline float softmax(float* s, int64_t n) {
  f32x16 m = f32x16{} - INFINITY;
  for (int64_t i = 0; i < n; i += 16) {
    const f32x16 x = load16(s + i);
    m = select(x > m, x, m);
  }
  float max = -INFINITY;
  for (int j = 0; j < 16; ++j) max = std::max(max, m[j]);
  f32x16 sum = {};
  for (int64_t i = 0; i < n; i += 16) {
    const f32x16 p = exp_nonpositive(load16(s + i) - max);
    store16(p, s + i);
    sum += p;
  }
  return 1.0f / hsum(sum);
}

// Below this many (context token, kv head) pairs a decode call runs on one thread: ~50 us of work
// on this class of CPU, where waking the OpenMP team would eat most of the gain.
constexpr int64_t kMinParallelTokenHeads = 4096;

struct Shape {
  int64_t num_blocks, num_kv_heads, block_size, head_dim, group;
  int64_t k_tile() const { return head_dim * block_size; }
};

struct Scratch {
  std::vector<float> q, scores, acc;
};

// One request's decode for one kv head: the group's query heads together, so each K/V element is
// loaded once. Two passes (scores from K, weighted sum of V) around an exact softmax rather than an
// online one: K and V are still read once each, the scores (group x context fp32, 12 KB at 1k
// tokens) stay in L1/L2, the accumulators never need rescaling and exp runs over whole rows.
// kGroup/kHeadDim > 0 select the vector-extension code for that shape.
template <typename T, int kGroup, int kHeadDim>
class DecodeTask {
 public:
  DecodeTask(const Shape& s, const T* k_pool, const T* v_pool, float scale)
      : s_(s), k_pool_(k_pool), v_pool_(v_pool), scale_(scale) {}

  void operator()(const T* q, int64_t q_head_stride, const int32_t* table, int64_t kv_head,
                  int64_t context_len, T* out, int64_t out_head_stride, Scratch& scratch) const {
    const int64_t group = kGroup > 0 ? kGroup : s_.group;
    const int64_t hd = kHeadDim > 0 ? kHeadDim : s_.head_dim;
    const int64_t bs = s_.block_size;
    const int64_t num_ctx_blocks = (context_len + bs - 1) / bs;
    const int64_t stride = (num_ctx_blocks * bs + 15) / 16 * 16;  // scores row: whole blocks, 16-lane chunks
    scratch.q.resize(group * hd);
    scratch.scores.resize(group * stride);
    scratch.acc.resize(group * hd);
    float* qf = scratch.q.data();
    float* scores = scratch.scores.data();  // [group, stride]
    float* acc = scratch.acc.data();        // [group, hd]
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < hd; ++d) qf[g * hd + d] = to_float(q[g * q_head_stride + d]) * scale_;

    if (kGroup > 0 && bs % 16 == 0) {
      scores_fixed(qf, table, kv_head, num_ctx_blocks, scores, stride);
    } else {
      for (int64_t b = 0; b < num_ctx_blocks; ++b)
        scores_loop(qf, tile(k_pool_, table, b, kv_head, s_.k_tile()), scores + b * bs, stride, group, hd);
    }

    float inv_sum[kGroup > 0 ? kGroup : 1];
    std::vector<float> inv_heap(kGroup > 0 ? 0 : group);
    float* inv = kGroup > 0 ? inv_sum : inv_heap.data();
    for (int64_t g = 0; g < group; ++g) {
      std::fill(scores + g * stride + context_len, scores + (g + 1) * stride, -INFINITY);  // past the context
      inv[g] = softmax(scores + g * stride, stride);
    }

    if (kGroup > 0)
      values_fixed(scores, stride, table, kv_head, context_len, acc);
    else
      values_loop(scores, stride, table, kv_head, context_len, acc, group, hd);

    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < hd; ++d) store(acc[g * hd + d] * inv[g], out + g * out_head_stride + d);
  }

 private:
  const T* tile(const T* pool, const int32_t* table, int64_t b, int64_t kv_head, int64_t size) const {
    const int64_t block = table[b];
    TORCH_CHECK(block >= 0 && block < s_.num_blocks, "block id ", block, " out of range [0, ", s_.num_blocks, ")");
    return pool + (block * s_.num_kv_heads + kv_head) * size;
  }

  // scores[g][t] = q_g . k_t, bs % 16 == 0: the context's K tiles [hd, bs] cut into 16-token
  // column chunks, four chunks at a time so each broadcast q element feeds four FMAs (loads, not
  // FMAs, would otherwise be the limit) and 4 x group independent FMA chains hide their latency
  // (15 % faster than one chunk at a time, measured on the 2-core Ice Lake dev box).
  // Tokens past the context in the last block get scores too (from whatever the slot holds);
  // they are overwritten with -inf before the softmax.
  void scores_fixed(const float* qf, const int32_t* table, int64_t kv_head, int64_t num_ctx_blocks, float* scores,
                    int64_t stride) const {
    const int64_t bs = s_.block_size;
    const int64_t num_chunks = num_ctx_blocks * bs / 16;
    const T* chunk[4];
    for (int64_t first = 0; first < num_chunks; first += 4) {
      const int n = static_cast<int>(std::min<int64_t>(4, num_chunks - first));
      for (int j = 0; j < n; ++j) {
        const int64_t pos = (first + j) * 16;
        chunk[j] = tile(k_pool_, table, pos / bs, kv_head, s_.k_tile()) + pos % bs;
      }
      if (n == 4)
        score_chunks<4>(qf, chunk, scores + first * 16, stride);
      else
        for (int j = 0; j < n; ++j) score_chunks<1>(qf, chunk + j, scores + (first + j) * 16, stride);
    }
  }

  // kChunks 16-token chunks (rows bs apart) -> scores[g][16 * j + t] at out.
  template <int kChunks>
  void score_chunks(const float* qf, const T* const* chunk, float* out, int64_t stride) const {
    constexpr int kSplit = kChunks == 1 ? 4 : 1;  // one chunk: split head_dim four ways for chains
    const int64_t bs = s_.block_size;
    f32x16 a[kSplit][kChunks][kGroup] = {};
#pragma GCC unroll 4
    for (int64_t d = 0; d < kHeadDim; d += kSplit) {
#pragma GCC unroll 4
      for (int i = 0; i < kSplit; ++i) {
        f32x16 k[kChunks];
#pragma GCC unroll 4
        for (int j = 0; j < kChunks; ++j) k[j] = load16(chunk[j] + (d + i) * bs);
#pragma GCC unroll 8
        for (int g = 0; g < kGroup; ++g) {
          const float qd = qf[g * kHeadDim + d + i];
#pragma GCC unroll 4
          for (int j = 0; j < kChunks; ++j) a[i][j][g] += qd * k[j];
        }
      }
    }
    for (int j = 0; j < kChunks; ++j)
      for (int g = 0; g < kGroup; ++g) {
        f32x16 sum = a[0][j][g];
        for (int i = 1; i < kSplit; ++i) sum += a[i][j][g];
        store16(sum, out + g * stride + 16 * j);
      }
  }

  void scores_loop(const float* qf, const T* kt, float* scores, int64_t stride, int64_t group, int64_t hd) const {
    const int64_t bs = s_.block_size;
    for (int64_t g = 0; g < group; ++g) {
      float* sg = scores + g * stride;
      for (int64_t t = 0; t < bs; ++t) sg[t] = 0.0f;
      for (int64_t d = 0; d < hd; ++d) {
        const float qd = qf[g * hd + d];
        const T* kd = kt + d * bs;
#pragma omp simd
        for (int64_t t = 0; t < bs; ++t) sg[t] += qd * to_float(kd[t]);
      }
    }
  }

  // acc[g] = sum_t p[g][t] v_t, the group's accumulators held in vector registers.
  void values_fixed(const float* p, int64_t stride, const int32_t* table, int64_t kv_head, int64_t context_len,
                    float* acc) const {
    constexpr int kVecs = kHeadDim / 16;
    const int64_t bs = s_.block_size;
    f32x16 a[kGroup][kVecs] = {};
    for (int64_t pos = 0, b = 0; pos < context_len; pos += bs, ++b) {
      const T* vt = tile(v_pool_, table, b, kv_head, bs * kHeadDim);
      const int64_t n = std::min(bs, context_len - pos);
      for (int64_t t = 0; t < n; ++t) {
        f32x16 v[kVecs];
#pragma GCC unroll 8
        for (int j = 0; j < kVecs; ++j) v[j] = load16(vt + t * kHeadDim + j * 16);
#pragma GCC unroll 8
        for (int g = 0; g < kGroup; ++g) {
          const float pg = p[g * stride + pos + t];
#pragma GCC unroll 8
          for (int j = 0; j < kVecs; ++j) a[g][j] += pg * v[j];
        }
      }
    }
    for (int g = 0; g < kGroup; ++g)
      for (int j = 0; j < kVecs; ++j) store16(a[g][j], acc + g * kHeadDim + j * 16);
  }

  void values_loop(const float* p, int64_t stride, const int32_t* table, int64_t kv_head, int64_t context_len,
                   float* acc, int64_t group, int64_t hd) const {
    const int64_t bs = s_.block_size;
    for (int64_t i = 0; i < group * hd; ++i) acc[i] = 0.0f;
    for (int64_t pos = 0, b = 0; pos < context_len; pos += bs, ++b) {
      const T* vt = tile(v_pool_, table, b, kv_head, bs * hd);
      const int64_t n = std::min(bs, context_len - pos);
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t g = 0; g < group; ++g) {
          const float pg = p[g * stride + pos + t];
          float* ag = acc + g * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) ag[d] += pg * to_float(vt[t * hd + d]);
        }
      }
    }
  }

  Shape s_;
  const T* k_pool_;
  const T* v_pool_;
  float scale_;
};

template <typename T, int kGroup, int kHeadDim>
void decode_all(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, at::Tensor& out) {
  const Shape shape{k_pool.size(0), k_pool.size(1), k_pool.size(3), k_pool.size(2), q.size(1) / k_pool.size(1)};
  const DecodeTask<T, kGroup, kHeadDim> task(shape, k_pool.const_data_ptr<T>(), v_pool.const_data_ptr<T>(),
                                             static_cast<float>(scale));
  const int64_t num_seqs = q.size(0), max_blocks = block_tables.size(1), kv_heads = shape.num_kv_heads;
  const T* qp = q.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  for (int64_t i = 0; i < num_seqs; ++i)
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= max_blocks * shape.block_size, "context length ", lens[i],
                " of decode ", i, " does not fit its block table");

  // Tasks (request, kv head) from an atomic counter: context lengths differ, and a static split
  // would leave one thread idle at the end of every layer. Little work (a few requests, short
  // contexts: tens of microseconds) runs on the calling thread, cheaper than waking the others.
  const int64_t num_tasks = num_seqs * kv_heads;
  int64_t num_token_heads = 0;
  for (int64_t i = 0; i < num_seqs; ++i) num_token_heads += lens[i] * kv_heads;
  const int64_t num_workers = num_token_heads < kMinParallelTokenHeads ? 1 : at::get_num_threads();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(num_workers, num_tasks), 1, [&](int64_t, int64_t) {
    thread_local Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) {
      const int64_t r = i / kv_heads, h = i % kv_heads;
      task(qp + r * qs0 + h * shape.group * qs1, qs1, tables + r * max_blocks, h, lens[r],
           op + r * os0 + h * shape.group * os1, os1, scratch);
    }
  });
}

void check_pools(const at::Tensor& k_pool, const at::Tensor& v_pool) {
  TORCH_CHECK(k_pool.dim() == 4 && v_pool.dim() == 4 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.size(0) == v_pool.size(0) && k_pool.size(1) == v_pool.size(1) &&
                  k_pool.size(2) == v_pool.size(3) && k_pool.size(3) == v_pool.size(2) &&
                  k_pool.scalar_type() == v_pool.scalar_type(),
              "pools must be contiguous K [num_blocks, num_kv_heads, head_dim, block_size] and "
              "V [num_blocks, num_kv_heads, block_size, head_dim] of one dtype");
  TORCH_CHECK(k_pool.device().is_cpu(), "K/V pools must be on the CPU");
}

// q and out of decode and prefill: [num_tokens, num_heads, head_dim] (head_dim contiguous) in the pools' dtype,
// after check_pools.
void check_queries(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& out) {
  check_pools(k_pool, v_pool);
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && out.dim() == 3 && out.stride(2) == 1 && q.sizes() == out.sizes(),
              "q and out must be [num_tokens, num_heads, head_dim], head_dim contiguous");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, out and the pools must share a dtype");
  TORCH_CHECK(q.size(2) == v_pool.size(3) && q.size(1) % k_pool.size(1) == 0,
              "head_dim must match and num_heads be a multiple of num_kv_heads");
}

template <typename T>
void decode_dispatch(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                     const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, at::Tensor& out) {
  const int64_t group = q.size(1) / k_pool.size(1), head_dim = q.size(2);
  if (head_dim == 64 && group == 3)  // SmolLM2-135M/360M
    decode_all<T, 3, 64>(q, k_pool, v_pool, block_tables, context_lens, scale, out);
  else if (head_dim == 64 && group == 1)  // SmolLM2-1.7B
    decode_all<T, 1, 64>(q, k_pool, v_pool, block_tables, context_lens, scale, out);
  else
    decode_all<T, 0, 0>(q, k_pool, v_pool, block_tables, context_lens, scale, out);
}

// out[i] = attention of q[i] (one new token per request) over its request's context.
// q, out: [num_seqs, num_heads, head_dim], head_dim contiguous; block_tables: [num_seqs, max_blocks]
// int32; context_lens: [num_seqs] int32 including the new token (already written to the pool).
void decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, at::Tensor out) {
  check_queries(q, k_pool, v_pool, out);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  block_tables.dim() == 2 && block_tables.is_contiguous() && context_lens.is_contiguous() &&
                  block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0),
              "block_tables [num_seqs, max_blocks] and context_lens [num_seqs] must be contiguous int32");
  if (q.size(0) == 0) return;
  switch (q.scalar_type()) {
    case at::kFloat:
      return decode_dispatch<float>(q, k_pool, v_pool, block_tables, context_lens, scale, out);
    case at::kBFloat16:
      return decode_dispatch<bf16>(q, k_pool, v_pool, block_tables, context_lens, scale, out);
    default:
      TORCH_CHECK(false, "paged decode supports float32 and bfloat16, got ", q.scalar_type());
  }
}

// ---- Prefill over paged context, bf16, head_dim 64: AVX-512 BF16 dot products (vdpbf16ps) ----
//
// One chunk of a request's prompt attends causally over its cached context and itself, reading K/V where they lie
// in the pool. torch's flash SDPA on the gathered K/V runs its block GEMMs in fp32 on CPUs without AMX: at 64 query
// tokens over 1.5k of context it spent half of a 30-layer step (benchmarks/RESULTS.md). Here the two products take
// bf16 pairs straight into fp32 accumulators, as the hardware offers: QK^T pairs head_dim, PV pairs tokens. As in
// torch's bf16 flash kernel, the probabilities are rounded to bf16 for the PV product; the scores, softmax and
// accumulators stay fp32.
//
// A task is (kv head, tile of kTileTokens query tokens): the tile's rows are its tokens times the kv head's group
// of query heads, all reading the same K/V. A task first interleaves the K/V it reads into pair order (each element
// is loaded once per task and then reused by every row), then runs an exact two-pass softmax as the decode kernel
// does; the scores (rows x keys, fp32) stay in L2.
#if defined(__AVX512BF16__)
#include <immintrin.h>

constexpr int64_t kTileTokens = 16;
constexpr int kPrefillHeadDim = 64;

struct PrefillScratch {
  std::vector<__m512i> k_pairs;  // [key block of 16][32 dim pairs]: lanes t of (k[2j][t], k[2j+1][t])
  std::vector<__m512i> v_pairs;  // [key pair u][4 dim chunks]: lanes d of (v[2u][d], v[2u+1][d])
  std::vector<float> scores;     // [rows][stride]
  std::vector<uint16_t> probs;   // [rows][stride] bf16 bits
  std::vector<float> inv_sum;    // [rows]
};

// Lanes 2i and 2i + 1 of the result are a[i] and b[i]: 16 + 16 bf16 interleaved into 32.
inline __m512i interleave(const void* a, const void* b) {
  static const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                              39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i va = _mm512_castsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(a)));
  const __m512i vb = _mm512_castsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(b)));
  return _mm512_permutex2var_epi16(va, idx, vb);
}

inline __m512 dot_pairs(__m512 acc, uint32_t pair, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)), (__m512bh)b);
}

inline uint16_t bf16_bits(float x) {
  bf16 out;
  store(x, &out);
  return out.x;
}

class PrefillTask {
 public:
  PrefillTask(const Shape& s, const bf16* k_pool, const bf16* v_pool, const int64_t* block_ids, int64_t num_cached,
              float scale)
      : s_(s), k_pool_(k_pool), v_pool_(v_pool), block_ids_(block_ids), num_cached_(num_cached), scale_(scale) {}

  // Query tokens [first, first + count) of the chunk, kv head h. q/out rows: token i, head hq at
  // q + i * q_token_stride + hq * q_head_stride (head_dim contiguous).
  void operator()(const bf16* q, int64_t q_token_stride, int64_t q_head_stride, bf16* out, int64_t out_token_stride,
                  int64_t out_head_stride, int64_t h, int64_t first, int64_t count, PrefillScratch& sc) const {
    constexpr int kDim = kPrefillHeadDim;
    const int64_t group = s_.group, bs = s_.block_size, rows = count * group;
    const int64_t num_keys = num_cached_ + first + count;  // what the tile's last token sees
    const int64_t key_blocks = (num_keys + 15) / 16, stride = key_blocks * 16;
    sc.k_pairs.resize(key_blocks * kDim / 2);
    sc.v_pairs.resize(key_blocks * 8 * kDim / 16);
    sc.scores.resize(rows * stride);
    sc.probs.resize(rows * stride);
    sc.inv_sum.resize(rows);

    // K and V of the tile's keys in pair order. Slots past num_keys may hold anything (another request's data, or
    // values that were never finite): their V pairs are zero and their scores are overwritten with -inf below.
    alignas(64) uint16_t zeros[32] = {};
    for (int64_t kb = 0; kb < key_blocks; ++kb) {
      const int64_t pos = kb * 16;
      const bf16* kt = tile(k_pool_, pos, h, kDim * bs) + pos % bs;
      for (int j = 0; j < kDim / 2; ++j)
        sc.k_pairs[kb * kDim / 2 + j] = interleave(kt + 2 * j * bs, kt + (2 * j + 1) * bs);
      const bf16* vt = tile(v_pool_, pos, h, bs * kDim) + (pos % bs) * kDim;
      for (int u = 0; u < 8; ++u) {
        const int64_t t0 = pos + 2 * u;
        for (int c = 0; c < kDim / 16; ++c) {
          const void* a = t0 < num_keys ? static_cast<const void*>(vt + (2 * u) * kDim + 16 * c) : zeros;
          const void* b = t0 + 1 < num_keys ? static_cast<const void*>(vt + (2 * u + 1) * kDim + 16 * c) : zeros;
          sc.v_pairs[(kb * 8 + u) * (kDim / 16) + c] = interleave(a, b);
        }
      }
    }

    // Scores, kRows rows at a time against one key block: 32 pair products per row, the key block's pairs loaded
    // once for all kRows rows.
    constexpr int kRows = 12;
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
      const uint32_t* qrow[kRows];
      for (int r = 0; r < nr; ++r)
        qrow[r] = reinterpret_cast<const uint32_t*>(query(q, q_token_stride, q_head_stride, h, first, r0 + r));
      const int64_t row_keys = num_cached_ + first + (r0 + nr - 1) / group + 1;  // keys the last of these rows sees
      for (int64_t kb = 0; kb < (row_keys + 15) / 16; ++kb) {
        __m512 acc[kRows];
        for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
        const __m512i* kp = sc.k_pairs.data() + kb * kDim / 2;
        if (nr == kRows) {
#pragma GCC unroll 4
          for (int j = 0; j < kDim / 2; ++j) {
            const __m512i k = kp[j];
#pragma GCC unroll 12
            for (int r = 0; r < kRows; ++r) acc[r] = dot_pairs(acc[r], qrow[r][j], k);
          }
        } else {
          for (int j = 0; j < kDim / 2; ++j)
            for (int r = 0; r < nr; ++r) acc[r] = dot_pairs(acc[r], qrow[r][j], kp[j]);
        }
        for (int r = 0; r < nr; ++r) _mm512_storeu_ps(sc.scores.data() + (r0 + r) * stride + kb * 16, acc[r]);
      }
    }

    // Softmax per row over the keys its token sees; probabilities rounded to bf16, zero past them.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t seen = num_cached_ + first + r / group + 1;
      float* s = sc.scores.data() + r * stride;
      const int64_t padded = (seen + 15) / 16 * 16;
      for (int64_t t = 0; t < padded; ++t) s[t] = t < seen ? s[t] * scale_ : -INFINITY;
      sc.inv_sum[r] = softmax(s, padded);
      uint16_t* p = sc.probs.data() + r * stride;
      for (int64_t t = 0; t < padded; ++t) p[t] = bf16_bits(s[t]);
      std::fill(p + padded, p + stride, uint16_t{0});
    }

    // out = P V: kRowsPV rows x 64 dims of accumulators, one key pair (4 vectors of V pairs) at a time.
    constexpr int kRowsPV = 6;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowsPV) {
      const int nr = static_cast<int>(std::min<int64_t>(kRowsPV, rows - r0));
      const int64_t row_keys = num_cached_ + first + (r0 + nr - 1) / group + 1;
      const int64_t pairs = (row_keys + 1) / 2;
      __m512 acc[kRowsPV][4];
      for (int r = 0; r < kRowsPV; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      const uint32_t* prow[kRowsPV];
      for (int r = 0; r < nr; ++r) prow[r] = reinterpret_cast<const uint32_t*>(sc.probs.data() + (r0 + r) * stride);
      for (int64_t u = 0; u < pairs; ++u) {
        const __m512i* vp = sc.v_pairs.data() + u * 4;
        const __m512i v0 = vp[0], v1 = vp[1], v2 = vp[2], v3 = vp[3];
        if (nr == kRowsPV) {
#pragma GCC unroll 6
          for (int r = 0; r < kRowsPV; ++r) {
            const uint32_t pu = prow[r][u];
            acc[r][0] = dot_pairs(acc[r][0], pu, v0);
            acc[r][1] = dot_pairs(acc[r][1], pu, v1);
            acc[r][2] = dot_pairs(acc[r][2], pu, v2);
            acc[r][3] = dot_pairs(acc[r][3], pu, v3);
          }
        } else {
          for (int r = 0; r < nr; ++r) {
            const uint32_t pu = prow[r][u];
            acc[r][0] = dot_pairs(acc[r][0], pu, v0);
            acc[r][1] = dot_pairs(acc[r][1], pu, v1);
            acc[r][2] = dot_pairs(acc[r][2], pu, v2);
            acc[r][3] = dot_pairs(acc[r][3], pu, v3);
          }
        }
      }
      for (int r = 0; r < nr; ++r) {
        const int64_t row = r0 + r, i = first + row / group, hq = h * group + row % group;
        bf16* o = out + i * out_token_stride + hq * out_head_stride;
        const float inv = sc.inv_sum[row];
        for (int c = 0; c < 4; ++c) {
          f32x16 v;
          const __m512 scaled = _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv));
          std::memcpy(&v, &scaled, sizeof(v));
          store16(v, o + 16 * c);
        }
      }
    }
  }

 private:
  // Row r of the tile: token first + r / group, query head h * group + r % group.
  const bf16* query(const bf16* q, int64_t token_stride, int64_t head_stride, int64_t h, int64_t first,
                    int64_t r) const {
    return q + (first + r / s_.group) * token_stride + (h * s_.group + r % s_.group) * head_stride;
  }

  const bf16* tile(const bf16* pool, int64_t pos, int64_t kv_head, int64_t size) const {
    const int64_t block = block_ids_[pos / s_.block_size];
    TORCH_CHECK(block >= 0 && block < s_.num_blocks, "block id ", block, " out of range [0, ", s_.num_blocks, ")");
    return pool + (block * s_.num_kv_heads + kv_head) * size;
  }

  Shape s_;
  const bf16* k_pool_;
  const bf16* v_pool_;
  const int64_t* block_ids_;
  int64_t num_cached_;
  float scale_;
};

bool prefill_applies(const at::Tensor& q, const at::Tensor& k_pool) {
  return q.scalar_type() == at::kBFloat16 && q.size(2) == kPrefillHeadDim && k_pool.size(3) % 16 == 0;
}

void prefill_bf16(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                  const at::Tensor& block_ids, int64_t num_cached, double scale, at::Tensor& out) {
  const Shape shape{k_pool.size(0), k_pool.size(1), k_pool.size(3), k_pool.size(2), q.size(1) / k_pool.size(1)};
  const int64_t n = q.size(0), kv_heads = shape.num_kv_heads;
  TORCH_CHECK(block_ids.size(0) * shape.block_size >= num_cached + n, "the chunk's ", num_cached + n,
              " tokens do not fit its ", block_ids.size(0), " blocks");
  const PrefillTask task(shape, k_pool.const_data_ptr<bf16>(), v_pool.const_data_ptr<bf16>(),
                         block_ids.const_data_ptr<int64_t>(), num_cached, static_cast<float>(scale));
  const bf16* qp = q.const_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  // Tiles of the later tokens see more keys: hand them out first, from an atomic counter.
  const int64_t tiles = (n + kTileTokens - 1) / kTileTokens, num_tasks = tiles * kv_heads;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1, [&](int64_t, int64_t) {
    thread_local PrefillScratch scratch;
    for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) {
      const int64_t tile = tiles - 1 - i / kv_heads, h = i % kv_heads;
      const int64_t first = tile * kTileTokens;
      task(qp, qs0, qs1, op, os0, os1, h, first, std::min(kTileTokens, n - first), scratch);
    }
  });
}
#else
bool prefill_applies(const at::Tensor&, const at::Tensor&) { return false; }
void prefill_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                  at::Tensor&) {}
#endif

// Causal attention of one prefill chunk (q: [n, num_heads, head_dim], its K/V already written to the pool) over the
// request's first num_cached + n tokens, whose blocks are block_ids (int64). Returns false, touching nothing, where
// this kernel does not apply (not bf16, head_dim not 64, block size not a multiple of 16, or a CPU without AVX-512
// BF16): the caller then uses SDPA on the gathered K/V.
bool prefill(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& block_ids,
             int64_t num_cached, double scale, at::Tensor out) {
  check_queries(q, k_pool, v_pool, out);
  TORCH_CHECK(block_ids.scalar_type() == at::kLong && block_ids.dim() == 1 && block_ids.is_contiguous(),
              "block_ids must be contiguous int64");
  TORCH_CHECK(num_cached >= 0, "num_cached must be >= 0");
  if (!prefill_applies(q, k_pool)) return false;
  if (q.size(0) > 0) prefill_bf16(q, k_pool, v_pool, block_ids, num_cached, scale, out);
  return true;
}

template <typename T>
void write_typed(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_pool, at::Tensor& v_pool,
                 const int64_t* slots) {
  const int64_t kv_heads = k_pool.size(1), hd = k_pool.size(2), bs = k_pool.size(3);
  const int64_t num_slots = k_pool.size(0) * bs;
  const T* ks = k.const_data_ptr<T>();
  const T* vs = v.const_data_ptr<T>();
  T* kd = k_pool.mutable_data_ptr<T>();
  T* vd = v_pool.mutable_data_ptr<T>();
  for (int64_t i = 0; i < k.size(0); ++i) {
    const int64_t slot = slots[i];
    TORCH_CHECK(slot >= 0 && slot < num_slots, "slot ", slot, " of token ", i, " out of range [0, ", num_slots, ")");
    const int64_t block = slot / bs, offset = slot % bs;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const T* kr = ks + i * k.stride(0) + h * k.stride(1);
      T* kcol = kd + (block * kv_heads + h) * hd * bs + offset;  // K tile is [hd, bs]: a column
      for (int64_t d = 0; d < hd; ++d) kcol[d * bs] = kr[d];
      std::memcpy(vd + ((block * kv_heads + h) * bs + offset) * hd, vs + i * v.stride(0) + h * v.stride(1),
                  hd * sizeof(T));
    }
  }
}

// Writes each new token's k, v at its slot. k, v: [num_tokens, num_kv_heads, head_dim] (head_dim
// contiguous); slot_mapping: [num_tokens] int64.
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor k_pool, at::Tensor v_pool,
              const at::Tensor& slot_mapping) {
  check_pools(k_pool, v_pool);
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == k_pool.size(1) && k.size(2) == k_pool.size(2) &&
                  k.stride(2) == 1 && v.stride(2) == 1,
              "k, v must be [num_tokens, num_kv_heads, head_dim] matching the pools, head_dim contiguous");
  TORCH_CHECK(k.scalar_type() == k_pool.scalar_type() && v.scalar_type() == k_pool.scalar_type(),
              "k, v and the pools must share a dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == k.size(0),
              "slot_mapping must be contiguous int64 [num_tokens]");
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  switch (k.scalar_type()) {
    case at::kFloat:
      return write_typed<float>(k, v, k_pool, v_pool, slots);
    case at::kBFloat16:
      return write_typed<bf16>(k, v, k_pool, v_pool, slots);
    default:
      TORCH_CHECK(false, "write_kv supports float32 and bfloat16, got ", k.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(pacer_attention, m) {
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slot_mapping) -> ()");
  m.def(
      "decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor context_lens, float scale, "
      "Tensor(a!) out) -> ()");
  m.def(
      "prefill(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_ids, int num_cached, float scale, "
      "Tensor(a!) out) -> bool");
}

TORCH_LIBRARY_IMPL(pacer_attention, CPU, m) {
  m.impl("write_kv", &write_kv);
  m.impl("decode", &decode);
  m.impl("prefill", &prefill);
}
