// Plain description of one MSDeformAttn call for the CPU kernels. No ATen
// here: the kernels are compiled once per SIMD variant (see msda_cpu_kernel.h).
#pragma once

#include <cstdint>

namespace detr_plus {
namespace cpu {

// All pointers address contiguous tensors in mmcv's layouts (see msda.h).
template <typename T>
struct Problem {
  const T* value;           // (bs, nk, nh, D)
  const int64_t* shapes;    // (nl, 2) as (H, W)
  const int64_t* starts;    // (nl,)
  const T* loc;             // (bs, nq, nh, nl, np, 2)
  const T* attn;            // (bs, nq, nh, nl, np)
  int64_t bs, nk, nh, D, nq, nl, np;
};

// Gradients written by the backward kernel (contiguous, same layouts).
template <typename T>
struct Grads {
  const T* grad_out;  // (bs, nq, nh * D)
  T* value;           // (bs, nk, nh, D), fully overwritten
  T* loc;             // (bs, nq, nh, nl, np, 2)
  T* attn;            // (bs, nq, nh, nl, np)
  int64_t heads_per_item;  // backward items are (b, level, group of heads)
};

// Entry points of one SIMD variant. Forward work items are (b, q, h) in
// that order; backward work items are (b, level, group of heads): each owns
// grad_value[b, level keys, heads, :], so no two threads write the same
// element and the summation order never depends on the thread count.
#define DETR_PLUS_DECLARE_MSDA_CPU_VARIANT(NS)                               \
  namespace NS {                                                            \
  void forward(const Problem<float>& p, float* out, int64_t begin,          \
               int64_t end);                                                \
  void forward(const Problem<double>& p, double* out, int64_t begin,        \
               int64_t end);                                                \
  void backward(const Problem<float>& p, const Grads<float>& g,             \
                int64_t begin, int64_t end);                                \
  void backward(const Problem<double>& p, const Grads<double>& g,           \
                int64_t begin, int64_t end);                                \
  }

DETR_PLUS_DECLARE_MSDA_CPU_VARIANT(base)
DETR_PLUS_DECLARE_MSDA_CPU_VARIANT(avx2)

}  // namespace cpu
}  // namespace detr_plus
