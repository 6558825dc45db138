// The Adam/AdamW element loop, written once over a vector type V.
//
// No include guard on purpose: csrc/adam_kernel.cpp includes this file once per
// instruction set, each time inside a region compiled for that set
// (#pragma GCC target) and inside its own namespace, with `V` naming that
// set's vector wrapper. Templates get the target of the region they are
// defined in, which is why the body is re-included rather than shared: a
// template defined outside the region could not inline the intrinsics.
//
// Every path computes the same fp32 operations in the same order, and the
// tail uses `S` (the width-one wrapper) with the same body, so results are
// bit-identical across instruction sets. The order mirrors ATen's kernels for
// torch.optim.AdamW's single-tensor path, with one exception (marked *):
//   g  = grad * grad_scale
//   p  = p * (1 - lr*wd)                    param.mul_(1 - lr*wd)       (AdamW)
//   g  = fma(p, wd, g)                      grad.add(param, alpha=wd)   (Adam, L2)
//   m  = fma(w, g - m, m) | fma(w-1, g - m, g)    exp_avg.lerp_(grad, 1-beta1)
//   v  = fma((1-beta2)*g, g, v*beta2)       exp_avg_sq.mul_(beta2).addcmul_(g, g, 1-beta2)
//        (ATen writes self + value*t1*t2; its builds contract that into this fma)
// * d  = fma(sqrt(v), 1/bc2_sqrt, eps)      (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
//   p  = p + (-step_size*m) / d             param.addcdiv_(exp_avg, denom, value=-step_size)
// (*) one division per element instead of two: a core updates more elements
// per second in cache, and the denominator moves by at most an ulp. torch's
// own CPU sqrt is not correctly rounded either, so no
// formula matches torch bit for bit; tests hold the result to 1e-6 of each
// tensor's largest magnitude after 100 steps, as the issue asks.

template <class W, DType D>
inline typename W::F load_as(const void* base, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return W::load(static_cast<const float*>(base) + i);
  } else if constexpr (D == DType::kBFloat16) {
    return W::load_bf16(static_cast<const uint16_t*>(base) + i);
  } else {
    return W::load_f16(static_cast<const uint16_t*>(base) + i);
  }
}

template <class W, DType D>
inline void store_as(void* base, int64_t i, typename W::F x) {
  if constexpr (D == DType::kFloat32) {
    W::store(static_cast<float*>(base) + i, x);
  } else if constexpr (D == DType::kBFloat16) {
    W::store_bf16(static_cast<uint16_t*>(base) + i, x);
  } else if constexpr (D == DType::kFloat16) {
    W::store_f16(static_cast<uint16_t*>(base) + i, x);
  }
}

// What one loop reads, copied out of Consts and TensorArgs into locals whose
// address is never taken: the loop stores through float pointers, and under
// -fno-strict-aliasing (the extension's flags) the compiler would otherwise
// reload every pointer and flag from memory after each store.
template <class W>
struct Bcast {
  typename W::F grad_scale, decay, weight_decay, lerp_coeff, beta2, one_minus_beta2, eps,
      neg_step_size, inv_bias_correction2_sqrt;
  explicit Bcast(const Consts& c)
      : grad_scale(W::set1(c.grad_scale)),
        decay(W::set1(c.has_weight_decay ? c.decay : 1.0f)),
        weight_decay(W::set1(c.weight_decay)),
        // ATen's lerp: weight < 0.5 starts from the old value, else from the end
        // (adam_loop_lerp picks the start).
        lerp_coeff(W::set1(std::fabs(c.lerp_weight) < 0.5f ? c.lerp_weight : c.lerp_weight - 1.0f)),
        beta2(W::set1(c.beta2)),
        one_minus_beta2(W::set1(c.one_minus_beta2)),
        eps(W::set1(c.eps)),
        neg_step_size(W::set1(c.neg_step_size)),
        inv_bias_correction2_sqrt(W::set1(c.inv_bias_correction2_sqrt)) {}
};

// How weight decay enters, fixed per loop (a template argument, not a flag
// tested per element). Without weight decay the decoupled form runs with a
// factor of exactly 1, which leaves every weight as it is.
enum class Decay { kDecoupled, kL2 };

// Where ATen's lerp starts, fixed per loop: from the old moment (1 - beta1 < 0.5,
// the usual case) or from the gradient.
enum class Lerp { kFromStart, kFromEnd };

// The gradient's sum of squares is accumulated here; whether it held an inf or
// NaN is not tested per element: any such element makes the sum inf or NaN, and
// only then does adam_loop look at the elements themselves (a finite gradient
// whose square overflows makes the sum inf too, and is not non-finite).
template <class W, DType GD, DType OD, Decay WD, Lerp LF>
__attribute__((always_inline)) inline void adam_elems(
    const Bcast<W>& k, float* __restrict master, float* __restrict exp_avg,
    float* __restrict exp_avg_sq, const void* __restrict grad, void* __restrict out, int64_t i,
    typename W::F& sumsq) {
  using F = typename W::F;
  F g = W::mul(load_as<W, GD>(grad, i), k.grad_scale);
  sumsq = W::fmadd(g, g, sumsq);
  F p = W::load(master + i);
  if constexpr (WD == Decay::kDecoupled) p = W::mul(p, k.decay);
  if constexpr (WD == Decay::kL2) g = W::fmadd(p, k.weight_decay, g);
  F m = W::load(exp_avg + i);
  const F diff = W::sub(g, m);
  m = W::fmadd(k.lerp_coeff, diff, LF == Lerp::kFromEnd ? g : m);
  F v = W::mul(W::load(exp_avg_sq + i), k.beta2);
  v = W::fmadd(W::mul(k.one_minus_beta2, g), g, v);
  const F denom = W::fmadd(W::sqrt(v), k.inv_bias_correction2_sqrt, k.eps);
  p = W::add(p, W::div(W::mul(k.neg_step_size, m), denom));
  W::store(exp_avg + i, m);
  W::store(exp_avg_sq + i, v);
  W::store(master + i, p);
  store_as<W, OD>(out, i, p);
}

// Sums of squares run in 16 fp32 lanes on every path (16 scalars, two AVX2
// vectors, one AVX-512 vector), lane j taking elements j, j+16, ..., moved
// into an fp64 total in lane order every kFlush groups; the last < 16
// elements go through one scalar sum. So every path adds in the same order:
// the gradient norm, and the clipping coefficient made from it, are the same
// bits whatever the instruction set or thread count.
constexpr int kLanes = 16;
constexpr int kPer = kLanes / V::kWidth;  // vectors per group of 16 elements
constexpr int64_t kFlush = 256;
static_assert(kLanes % V::kWidth == 0, "a group must be whole vectors");

inline double reduce_lanes(const typename V::F (&acc)[kPer]) {
  float lane[kLanes];
  for (int j = 0; j < kPer; ++j) V::storeu(lane + j * V::kWidth, acc[j]);
  double total = 0.0;
  for (float x : lane) total += x;
  return total;
}

// Whether grad[begin, end) * scale holds an inf or NaN (the rare path: the sum
// of squares of those elements was not finite).
template <DType GD>
bool any_nonfinite(const void* grad, float scale, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    if (!std::isfinite(load_as<S, GD>(grad, i) * scale)) return true;
  }
  return false;
}

template <DType GD, DType OD, Decay WD, Lerp LF>
Stats adam_loop(const Consts& c, const TensorArgs& t, int64_t begin, int64_t end) {
  const Bcast<V> kv(c);
  float* const master = t.master;
  float* const exp_avg = t.exp_avg;
  float* const exp_avg_sq = t.exp_avg_sq;
  const void* const grad = t.grad;
  void* const out = t.out;
  Stats s;
  int64_t i = begin;
  while (i + kLanes <= end) {
    const int64_t block_begin = i;
    const int64_t block_end = std::min(end, i + kFlush * kLanes);
    typename V::F sumsq[kPer];
    for (auto& a : sumsq) a = V::zero();
    // Unrolled so that loads of several groups are in flight at once (in
    // cache, about a fifth faster on AVX-512); each lane still adds in element order.
#pragma GCC unroll 8
    for (; i + kLanes <= block_end; i += kLanes) {
      for (int j = 0; j < kPer; ++j) {
        adam_elems<V, GD, OD, WD, LF>(kv, master, exp_avg, exp_avg_sq, grad, out,
                                      i + j * V::kWidth, sumsq[j]);
      }
    }
    const double block = reduce_lanes(sumsq);
    s.sumsq += block;
    if (!std::isfinite(block) && !s.nonfinite) {
      s.nonfinite = any_nonfinite<GD>(grad, c.grad_scale, block_begin, i);
    }
  }
  if (i < end) {
    const Bcast<S> ks(c);
    const int64_t tail_begin = i;
    float ss = 0.0f;
    for (; i < end; ++i) {
      adam_elems<S, GD, OD, WD, LF>(ks, master, exp_avg, exp_avg_sq, grad, out, i, ss);
    }
    s.sumsq += ss;
    if (!std::isfinite(ss) && !s.nonfinite) {
      s.nonfinite = any_nonfinite<GD>(grad, c.grad_scale, tail_begin, end);
    }
  }
  return s;
}

template <DType GD, DType OD, Decay WD>
Stats adam_loop_lerp(const Consts& c, const TensorArgs& t, int64_t begin, int64_t end) {
  if (std::fabs(c.lerp_weight) < 0.5f) return adam_loop<GD, OD, WD, Lerp::kFromStart>(c, t, begin, end);
  return adam_loop<GD, OD, WD, Lerp::kFromEnd>(c, t, begin, end);
}

template <DType GD, DType OD>
Stats adam_loop_mode(const Consts& c, const TensorArgs& t, int64_t begin, int64_t end) {
  if (c.has_weight_decay && !c.decoupled) return adam_loop_lerp<GD, OD, Decay::kL2>(c, t, begin, end);
  return adam_loop_lerp<GD, OD, Decay::kDecoupled>(c, t, begin, end);
}

template <DType GD>
Stats adam_loop_out(const Consts& c, const TensorArgs& t, int64_t begin, int64_t end) {
  switch (t.out_dtype) {
    case DType::kNone: return adam_loop_mode<GD, DType::kNone>(c, t, begin, end);
    case DType::kFloat32: return adam_loop_mode<GD, DType::kFloat32>(c, t, begin, end);
    case DType::kBFloat16: return adam_loop_mode<GD, DType::kBFloat16>(c, t, begin, end);
    case DType::kFloat16: return adam_loop_mode<GD, DType::kFloat16>(c, t, begin, end);
  }
  return Stats{};
}

Stats adam_range(const Consts& c, const TensorArgs& t, int64_t begin, int64_t end) {
  switch (t.grad_dtype) {
    case DType::kFloat32: return adam_loop_out<DType::kFloat32>(c, t, begin, end);
    case DType::kBFloat16: return adam_loop_out<DType::kBFloat16>(c, t, begin, end);
    case DType::kFloat16: return adam_loop_out<DType::kFloat16>(c, t, begin, end);
    case DType::kNone: break;
  }
  return Stats{};
}

template <DType GD>
Stats stats_loop(const void* grad, float scale, int64_t begin, int64_t end) {
  const typename V::F sv = V::set1(scale), zv = V::zero();
  Stats s;
  typename V::F nonfinite = V::zero();
  int64_t i = begin;
  while (i + kLanes <= end) {
    const int64_t block_end = std::min(end, i + kFlush * kLanes);
    typename V::F sumsq[kPer];
    for (auto& a : sumsq) a = V::zero();
    for (; i + kLanes <= block_end; i += kLanes) {
      for (int j = 0; j < kPer; ++j) {
        const typename V::F g = V::mul(load_as<V, GD>(grad, i + j * V::kWidth), sv);
        sumsq[j] = V::fmadd(g, g, sumsq[j]);
        nonfinite = V::fmadd(g, zv, nonfinite);
      }
    }
    s.sumsq += reduce_lanes(sumsq);
  }
  s.nonfinite = V::any_nan(nonfinite);
  float ss = 0.0f, nf = 0.0f;
  for (; i < end; ++i) {
    const float g = load_as<S, GD>(grad, i) * scale;
    ss = S::fmadd(g, g, ss);
    nf = S::fmadd(g, 0.0f, nf);
  }
  s.sumsq += ss;
  s.nonfinite = s.nonfinite || nf != nf;
  return s;
}

Stats grad_stats_range(const void* grad, DType gd, float scale, int64_t begin, int64_t end) {
  switch (gd) {
    case DType::kFloat32: return stats_loop<DType::kFloat32>(grad, scale, begin, end);
    case DType::kBFloat16: return stats_loop<DType::kBFloat16>(grad, scale, begin, end);
    case DType::kFloat16: return stats_loop<DType::kFloat16>(grad, scale, begin, end);
    case DType::kNone: break;
  }
  return Stats{};
}
