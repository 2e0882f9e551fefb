// Scalar and 16-lane helpers shared by pacer's CPU kernels (attention_cpu.cpp, layers_cpu.cpp): bf16 <-> fp32
// conversions that vectorize, and exp over non-positive lanes. GCC vector extensions, lowered to whatever -march
// offers.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pacer_cpu {

using bf16 = c10::BFloat16;
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {
  // bf16 is the top half of an fp32: a shift (vpmovzxwd + vpslld when vectorized).
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void store(float x, float* out) { *out = x; }

inline void store(float x, bf16* out) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN stays NaN (rounding could carry it into inf)
    out->x = 0x7FC0;
    return;
  }
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even
  out->x = static_cast<uint16_t>(bits >> 16);
}

// 16 consecutive elements as fp32 lanes.
inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32x16 load16(const bf16* p) {
  u16x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  // Spelled out lane by lane: gcc 12 turns this into one vpmovzxwd, __builtin_convertvector into four ops.
  u32x16 wide = {raw[0], raw[1], raw[2],  raw[3],  raw[4],  raw[5],  raw[6],  raw[7],
                 raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]};
  wide <<= 16;
  f32x16 v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

// exp(x) for x <= 0, 16 lanes at a time (std::exp is a libm call per element).
// Cephes-style: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; relative error ~2e-7.
// Lanes below -87 (incl. -inf) give 0.
inline f32x16 exp_nonpositive(f32x16 x) {
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  const f32x16 in_range = x > -87.0f ? f32x16{} + 1.0f : f32x16{};
  x = x > -87.0f ? x : f32x16{} - 87.0f;
  // n = round(x / ln2) by the 1.5 * 2^23 trick (exact without -ffast-math)
  const f32x16 n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  const f32x16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  f32x16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale * in_range;
}

// Each lane rounded to T's precision (to nearest even, NaN kept), still as fp32: torch rounds every op's result to
// the tensor's dtype, and a fused kernel that means to match it rounds where torch would.
template <typename T>
inline f32x16 round16(const f32x16& v);

template <>
inline f32x16 round16<float>(const f32x16& v) {
  return v;
}

template <>
inline f32x16 round16<bf16>(const f32x16& v) {
  u32x16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  bits = (bits & 0x7FFFFFFFu) > 0x7F800000u ? (bits | 0x00400000u) & 0xFFFF0000u : rounded;
  f32x16 out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// 16 fp32 lanes into 16 consecutive elements (bf16: rounded as round16 does).
inline void store16(const f32x16& v, float* p) { std::memcpy(p, &v, sizeof(v)); }

inline void store16(const f32x16& v, bf16* p) {
  const f32x16 r = round16<bf16>(v);
  u32x16 bits;
  std::memcpy(&bits, &r, sizeof(bits));
  const u16x16 top = __builtin_convertvector(bits >> 16, u16x16);
  std::memcpy(p, &top, sizeof(top));
}

inline float hsum(const f32x16& v) {
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) total += v[j];
  return total;
}

}  // namespace pacer_cpu
