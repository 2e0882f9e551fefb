// Scalar and 16-lane helpers shared by pacer's CPU kernels (attention_cpu.cpp, layers_cpu.cpp): bf16 <-> fp32
// conversions that vectorize, and exp over non-positive lanes. GCC vector extensions, lowered to whatever -march
// offers.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace pacer_cpu {

using bf16 = c10::BFloat16;
typedef uint16_t u16x16 __attribute__((vector_size(32)));

#if defined(__AVX512F__)
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

template <typename M, typename V>
inline V select(const M& mask, const V& a, const V& b) {
  return mask ? a : b;
}
inline i32x16 to_i32(const f32x16& v) { return __builtin_convertvector(v, i32x16); }
template <typename To, typename From>
inline To bitcast(const From& v) {
  To out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
template <typename V, typename E>
inline V load_raw(const E* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename E>
inline void store_raw(const V& v, E* p) {
  std::memcpy(p, &v, sizeof(v));
}
inline u16x16 narrow_u16(const u32x16& v) { return __builtin_convertvector(v, u16x16); }
inline u32x16 widen_u32(const u16x16& v) {
  // Spelled out lane by lane: gcc 12 turns this into one vpmovzxwd, __builtin_convertvector into four ops.
  return u32x16{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
}
#else
// Without 512-bit registers gcc lowers a 64-byte vector through the stack, lane by lane (the decode attention ran
// 5-10x slower on an AVX2 CPU): there a 16-lane vector is two native 8-lane halves, with the same operators.
template <typename E>
struct Lanes16 {
  typedef E Half __attribute__((vector_size(32)));
  Half lo, hi;

  E operator[](int i) const { return i < 8 ? lo[i] : hi[i - 8]; }
  Lanes16 operator-() const { return {-lo, -hi}; }
#define PACER_LANES16_OP(op)                                                                             \
  friend Lanes16 operator op(const Lanes16& a, const Lanes16& b) { return {a.lo op b.lo, a.hi op b.hi}; } \
  friend Lanes16 operator op(const Lanes16& a, E b) { return {a.lo op b, a.hi op b}; }                   \
  friend Lanes16 operator op(E a, const Lanes16& b) { return {a op b.lo, a op b.hi}; }                   \
  Lanes16& operator op##=(const Lanes16& b) { return *this = *this op b; }                               \
  Lanes16& operator op##=(E b) { return *this = *this op b; }
  PACER_LANES16_OP(+)
  PACER_LANES16_OP(-)
  PACER_LANES16_OP(*)
  PACER_LANES16_OP(/)
#undef PACER_LANES16_OP
#define PACER_LANES16_INT_OP(op)                                                                         \
  template <typename F = E, typename = std::enable_if_t<std::is_integral_v<F>>>                          \
  friend Lanes16 operator op(const Lanes16& a, const Lanes16& b) { return {a.lo op b.lo, a.hi op b.hi}; } \
  template <typename F = E, typename = std::enable_if_t<std::is_integral_v<F>>>                          \
  friend Lanes16 operator op(const Lanes16& a, F b) { return {a.lo op b, a.hi op b}; }                   \
  template <typename F = E, typename = std::enable_if_t<std::is_integral_v<F>>>                          \
  Lanes16& operator op##=(F b) { return *this = *this op b; }
  PACER_LANES16_INT_OP(&)
  PACER_LANES16_INT_OP(|)
  PACER_LANES16_INT_OP(<<)
  PACER_LANES16_INT_OP(>>)
#undef PACER_LANES16_INT_OP
  // Comparisons give a lane mask (all ones or zero), as gcc's vector comparisons do.
  friend Lanes16<int32_t> operator>(const Lanes16& a, const Lanes16& b) { return {a.lo > b.lo, a.hi > b.hi}; }
  friend Lanes16<int32_t> operator>(const Lanes16& a, E b) { return {a.lo > b, a.hi > b}; }
  friend Lanes16<int32_t> operator<(const Lanes16& a, E b) { return {a.lo < b, a.hi < b}; }
};

typedef Lanes16<float> f32x16;
typedef Lanes16<uint32_t> u32x16;
typedef Lanes16<int32_t> i32x16;

template <typename V>
inline V select(const i32x16& mask, const V& a, const V& b) {
  return {mask.lo ? a.lo : b.lo, mask.hi ? a.hi : b.hi};
}
inline i32x16 to_i32(const f32x16& v) {
  return {__builtin_convertvector(v.lo, i32x16::Half), __builtin_convertvector(v.hi, i32x16::Half)};
}
// Half by half: a memcpy of the whole struct goes through the stack in 16-byte pieces, and the 32-byte load after
// them stalls on store forwarding (it was a third of the decode attention's time).
template <typename To, typename From>
inline To bitcast(const From& v) {
  return {(typename To::Half)v.lo, (typename To::Half)v.hi};  // gcc's vector cast: same bits
}
template <typename V, typename E>
inline V load_raw(const E* p) {
  typename V::Half lo, hi;
  std::memcpy(&lo, p, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(p) + sizeof(lo), sizeof(hi));
  return {lo, hi};
}
template <typename V, typename E>
inline void store_raw(const V& v, E* p) {
  std::memcpy(p, &v.lo, sizeof(v.lo));
  std::memcpy(reinterpret_cast<char*>(p) + sizeof(v.lo), &v.hi, sizeof(v.hi));
}
inline u16x16 narrow_u16(const u32x16& v) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  const u16x8 lo = __builtin_convertvector(v.lo, u16x8), hi = __builtin_convertvector(v.hi, u16x8);
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline u32x16 widen_u32(const u16x16& v) {
  return {u32x16::Half{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]},
          u32x16::Half{v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]}};
}
#endif

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
inline f32x16 load16(const float* p) { return load_raw<f32x16>(p); }

inline f32x16 load16(const bf16* p) {
  u16x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  u32x16 wide = widen_u32(raw);
  wide <<= 16;
  return bitcast<f32x16>(wide);
}

// exp(x) for x <= 0, 16 lanes at a time (std::exp is a libm call per element).
// Cephes-style: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; relative error ~2e-7.
// Lanes below -87 (incl. -inf) give 0.
inline f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 in_range = select(x > -87.0f, f32x16{} + 1.0f, f32x16{});
  x = select(x > -87.0f, x, f32x16{} - 87.0f);
  // n = round(x / ln2) by the 1.5 * 2^23 trick (exact without -ffast-math)
  const f32x16 n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  const f32x16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  f32x16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x16 bits = (to_i32(n) + 127) << 23;
  return p * bitcast<f32x16>(bits) * in_range;
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
  u32x16 bits = bitcast<u32x16>(v);
  const u32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  bits = select((bits & 0x7FFFFFFFu) > 0x7F800000u, (bits | 0x00400000u) & 0xFFFF0000u, rounded);
  return bitcast<f32x16>(bits);
}

// 16 fp32 lanes into 16 consecutive elements (bf16: rounded as round16 does).
inline void store16(const f32x16& v, float* p) { store_raw(v, p); }

inline void store16(const f32x16& v, bf16* p) {
  const u16x16 top = narrow_u16(bitcast<u32x16>(round16<bf16>(v)) >> 16);
  std::memcpy(p, &top, sizeof(top));
}

inline float hsum(const f32x16& v) {
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) total += v[j];
  return total;
}

}  // namespace pacer_cpu
