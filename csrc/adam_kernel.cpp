// SIMD instantiations of the Adam body (csrc/adam_body.h) and the run-time
// choice between them.
//
// The extension is built for whatever machine the user has, with no -march
// flag: each instruction set's code lives in a region compiled for that set
// alone (#pragma GCC target / clang attribute), and is only called after the
// CPU said it supports it. Nothing outside these regions may use wider
// instructions, so one build runs on any x86-64 CPU (and on other
// architectures with the scalar path).
//
// No torch header here: everything an inline function from a header defines
// must be defined before the first region, or it could be compiled for a
// wider target and shared with other translation units.

#include "adam_kernel.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define LOHAN_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define LOHAN_X86 0
#endif

namespace lohan {
namespace adam {
namespace {

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// IEEE half <-> float, round to nearest even, as c10::Half does it (the
// algorithm of the FP16 library by Marat Dukhan), written out here so this
// file needs no torch header.
inline float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = UINT32_C(0xE0) << 23;
  const float exp_scale = float_of(UINT32_C(0x7800000));  // 0x1.0p-112f
  const float normalized = float_of((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = UINT32_C(126) << 23;
  const float magic_bias = 0.5f;
  const float denormalized = float_of((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? bits_of(denormalized) : bits_of(normalized));
  return float_of(result);
}

inline uint16_t float_to_half(float f) {
  const float scale_to_inf = float_of(UINT32_C(0x77800000));   // 0x1.0p+112f
  const float scale_to_zero = float_of(UINT32_C(0x08800000));  // 0x1.0p-110f
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
  base = float_of((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t b = bits_of(base);
  const uint32_t exp_bits = (b >> 13) & UINT32_C(0x00007C00);
  const uint32_t mantissa_bits = b & UINT32_C(0x00000FFF);
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) |
                               (shl1_w > UINT32_C(0xFF000000) ? UINT16_C(0x7E00) : nonsign));
}

// bfloat16 rounding as c10::BFloat16 does it: nearest even, every NaN -> 0x7FC0.
inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return UINT16_C(0x7FC0);
  const uint32_t u = bits_of(f);
  return static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
}

// The width-one "vector": the scalar path, and the tail of every other path.
struct S {
  using F = float;
  static constexpr int kWidth = 1;
  static F zero() { return 0.0f; }
  static F set1(float x) { return x; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F x) { *p = x; }
  static F load_bf16(const uint16_t* p) { return float_of(static_cast<uint32_t>(*p) << 16); }
  static void store_bf16(uint16_t* p, F x) { *p = float_to_bf16(x); }
  static F load_f16(const uint16_t* p) { return half_to_float(*p); }
  static void store_f16(uint16_t* p, F x) { *p = float_to_half(x); }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F sqrt(F a) { return std::sqrt(a); }
  static F fmadd(F a, F b, F c) { return std::fma(a, b, c); }  // a*b + c, one rounding
  static void storeu(float* p, F x) { *p = x; }
  static bool any_nan(F a) { return a != a; }
};

namespace scalar {
using V = S;
#include "adam_body.h"
}  // namespace scalar

#if LOHAN_X86

// ---------------------------------------------------------------- AVX2 ----
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {

struct V {
  using F = __m256;
  static constexpr int kWidth = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store_bf16(uint16_t* p, F x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    // Every lane is below 0x10000, so the saturating pack only narrows.
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_f16(uint16_t* p, F x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void storeu(float* p, F x) { _mm256_storeu_ps(p, x); }
  static bool any_nan(F a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0; }
};

#include "adam_body.h"

}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ------------------------------------------------------------- AVX-512 ----
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif
namespace avx512 {

struct V {
  using F = __m512;
  static constexpr int kWidth = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store_bf16(uint16_t* p, F x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f16(uint16_t* p, F x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void storeu(float* p, F x) { _mm512_storeu_ps(p, x); }
  static bool any_nan(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0; }
};

#include "adam_body.h"

}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ----------------------------------------------------- AVX-512 + BF16 ----
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
#endif
namespace avx512_bf16 {

struct V : avx512::V {
  // VCVTNEPS2BF16 rounds to nearest even in one instruction, but flushes
  // subnormals to zero and keeps NaN payloads, where torch keeps subnormals
  // and writes 0x7FC0 for every NaN. A healthy model never has such weights;
  // when a vector holds one, the exact integer rounding redoes that vector.
  static void store_bf16(uint16_t* p, F x) {
    const __mmask16 tiny_or_nan =
        _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(FLT_MIN), _CMP_NGE_UQ);
    const __mmask16 odd = _mm512_mask_cmp_ps_mask(tiny_or_nan, x, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    if (odd != 0) {
      avx512::V::store_bf16(p, x);
      return;
    }
    const __m256i r = (__m256i)_mm512_cvtneps_pbh(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
  }
};

#include "adam_body.h"

}  // namespace avx512_bf16
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool cpu_has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  return (c & bit_F16C) != 0;
}

#endif  // LOHAN_X86

bool detect(Isa isa) {
  switch (isa) {
    case Isa::kAuto:
    case Isa::kScalar:
      return true;
#if LOHAN_X86
    case Isa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    case Isa::kAvx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && cpu_has_f16c();
    case Isa::kAvx512Bf16:
      return detect(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
#else
    default:
      return false;
#endif
  }
  return false;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAuto: return "auto";
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
  }
  return "?";
}

bool parse_isa(const std::string& name, Isa* out) {
  for (Isa isa : {Isa::kAuto, Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    if (name == isa_name(isa)) {
      *out = isa;
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa isa) {
  // Detected once: CPU features do not change while the process runs.
  static const bool supported[4] = {detect(Isa::kScalar), detect(Isa::kAvx2),
                                    detect(Isa::kAvx512), detect(Isa::kAvx512Bf16)};
  if (isa == Isa::kAuto) return true;
  return supported[static_cast<int>(isa)];
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2}) {
    if (isa_supported(isa)) return isa;
  }
  return Isa::kScalar;
}

Isa resolve(Isa isa) { return isa == Isa::kAuto ? best_isa() : isa; }

Stats adam_range(Isa isa, const Consts& c, const TensorArgs& t, int64_t begin, int64_t end) {
  switch (resolve(isa)) {
#if LOHAN_X86
    case Isa::kAvx512Bf16: return avx512_bf16::adam_range(c, t, begin, end);
    case Isa::kAvx512: return avx512::adam_range(c, t, begin, end);
    case Isa::kAvx2: return avx2::adam_range(c, t, begin, end);
#endif
    default: return scalar::adam_range(c, t, begin, end);
  }
}

Stats grad_stats_range(Isa isa, const void* grad, DType grad_dtype, float scale, int64_t begin,
                       int64_t end) {
  switch (resolve(isa)) {
#if LOHAN_X86
    case Isa::kAvx512Bf16: return avx512_bf16::grad_stats_range(grad, grad_dtype, scale, begin, end);
    case Isa::kAvx512: return avx512::grad_stats_range(grad, grad_dtype, scale, begin, end);
    case Isa::kAvx2: return avx2::grad_stats_range(grad, grad_dtype, scale, begin, end);
#endif
    default: return scalar::grad_stats_range(grad, grad_dtype, scale, begin, end);
  }
}

}  // namespace adam
}  // namespace lohan
