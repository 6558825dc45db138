// The fused mixed-precision Adam/AdamW kernel: plain C++ over raw pointers.
//
// One pass per element reads the gradient (fp32, bf16 or fp16), the fp32
// master weight and the fp32 moments, and writes master, moments and, when
// asked, a copy of the weight in fp32, bf16 or fp16 (round to nearest even).
// The arithmetic follows torch.optim.AdamW's single-tensor path op for op
// (same roundings, same operation order, the same fused multiply-adds as
// ATen's vectorized lerp/add) except for one division (see adam_body.h), so
// the result stays within an ulp or two of torch's per step, and every
// instruction-set path here matches the others bit for bit: the scalar path
// is the vector body at width one.
//
// This header has no torch dependency; csrc/adam_ops.cpp wraps it into
// torch.ops.lohan.* and csrc/adam_kernel.cpp holds the SIMD instantiations.

#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lohan {
namespace adam {

// The instruction sets a kernel can run with, best last. kAuto picks the best
// one this CPU supports at run time; a build never assumes any of them.
enum class Isa : int {
  kAuto = -1,
  kScalar = 0,
  kAvx2 = 1,        // AVX2 + FMA + F16C
  kAvx512 = 2,      // AVX-512 F/BW/VL/DQ, bf16 rounding in integer arithmetic
  kAvx512Bf16 = 3,  // AVX-512 + the BF16 conversion instruction
};

enum class DType : int { kNone = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

const char* isa_name(Isa isa);
// Parses "auto", "scalar", "avx2", "avx512", "avx512_bf16"; returns false on an unknown name.
bool parse_isa(const std::string& name, Isa* out);
bool isa_supported(Isa isa);
Isa best_isa();
// kAuto -> best_isa(); anything else is returned as is (callers check isa_supported).
Isa resolve(Isa isa);

// Scalars shared by every element of one tensor, already rounded to fp32 the
// way torch rounds them (see lohan_compile/optim.py for where each comes from).
struct Consts {
  float grad_scale;       // multiplies the gradient first (1/loss scale * clip coefficient, -1 for maximize)
  float decay;            // 1 - lr*wd (decoupled weight decay)
  float weight_decay;     // wd (L2 penalty added to the gradient)
  float lerp_weight;      // 1 - beta1
  float beta2;            // beta2
  float one_minus_beta2;  // 1 - beta2
  float eps;
  float neg_step_size;    // -lr / (1 - beta1^step)
  float inv_bias_correction2_sqrt;  // 1 / (1 - beta2^step) ** 0.5
  bool decoupled;         // AdamW (true) or Adam with L2 penalty (false)
  bool has_weight_decay;  // wd != 0
};

struct TensorArgs {
  float* master;           // fp32 weight, updated in place
  float* exp_avg;          // fp32 first moment, updated in place
  float* exp_avg_sq;       // fp32 second moment, updated in place
  const void* grad;        // read only
  DType grad_dtype;        // kFloat32, kBFloat16 or kFloat16
  void* out;               // weight copy written after the update, or nullptr
  DType out_dtype;         // kNone when out is nullptr
};

// Squared L2 norm of the (scaled) gradient, and whether any element of it was
// inf or NaN. Summed in 16 fp32 lanes over at most 4096 elements at a time,
// then in fp64, in the same order on every instruction set (adam_body.h).
struct Stats {
  double sumsq = 0.0;
  bool nonfinite = false;
};

// Updates elements [begin, end) of one tensor. Returns the gradient statistics
// of those elements (after grad_scale, before any L2 penalty).
Stats adam_range(Isa isa, const Consts& c, const TensorArgs& t, int64_t begin, int64_t end);

// Statistics of grad[begin, end) * scale, with no update.
Stats grad_stats_range(Isa isa, const void* grad, DType grad_dtype, float scale,
                       int64_t begin, int64_t end);

}  // namespace adam
}  // namespace lohan
