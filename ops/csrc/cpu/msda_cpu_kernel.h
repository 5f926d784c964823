// MSDeformAttn CPU kernels, compiled once per SIMD variant.
//
// A translation unit includes the standard headers, then (optionally) switches
// the target ISA with `#pragma GCC target`, defines MSDA_ISA_NS and includes
// this file, so every symbol below lives in its own namespace per variant and
// no inline function is shared between variants (no ODR mix-up).
//
// Sampling follows grid_sample(align_corners=False, padding_mode='zeros'):
// pixel coordinates x = loc_x * W - 0.5, y = loc_y * H - 0.5, corners outside
// the map contribute zero. Accumulation happens in T (float or double).

#ifndef MSDA_ISA_NS
#error "define MSDA_ISA_NS before including msda_cpu_kernel.h"
#endif

namespace detr_plus {
namespace cpu {
namespace MSDA_ISA_NS {
namespace {

inline float floor_(float x) { return __builtin_floorf(x); }
inline double floor_(double x) { return __builtin_floor(x); }

// The four bilinear corners of one sampling point:
// 0 = (y0, x0), 1 = (y0, x1), 2 = (y1, x0), 3 = (y1, x1).
template <typename T>
struct Bilinear {
  int64_t idx[4];  // key index inside the level, -1 when outside the map
  T w[4];          // bilinear weights
  T lx, ly, hx, hy;
};

// Returns false when no corner lies inside the (H, W) map (also for NaN).
template <typename T>
inline bool bilinear_setup(T loc_x, T loc_y, int64_t H, int64_t W,
                           Bilinear<T>& s) {
  // grid_sample's own arithmetic: grid g = 2 * loc - 1, then
  // x = ((g + 1) * W - 1) / 2 (= loc * W - 0.5 up to rounding).
  const T x = ((loc_x * T(2) - T(1) + T(1)) * static_cast<T>(W) - T(1)) * T(0.5);
  const T y = ((loc_y * T(2) - T(1) + T(1)) * static_cast<T>(H) - T(1)) * T(0.5);
  if (!(x >= T(-1) && y >= T(-1) && x < static_cast<T>(W) &&
        y < static_cast<T>(H))) {
    return false;
  }
  const T fx = floor_(x), fy = floor_(y);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  s.lx = x - fx;
  s.ly = y - fy;
  s.hx = T(1) - s.lx;
  s.hy = T(1) - s.ly;
  s.w[0] = s.hy * s.hx;
  s.w[1] = s.hy * s.lx;
  s.w[2] = s.ly * s.hx;
  s.w[3] = s.ly * s.lx;
  const bool in_x0 = x0 >= 0, in_x1 = x1 < W, in_y0 = y0 >= 0, in_y1 = y1 < H;
  s.idx[0] = (in_y0 && in_x0) ? y0 * W + x0 : -1;
  s.idx[1] = (in_y0 && in_x1) ? y0 * W + x1 : -1;
  s.idx[2] = (in_y1 && in_x0) ? y1 * W + x0 : -1;
  s.idx[3] = (in_y1 && in_x1) ? y1 * W + x1 : -1;
  return true;
}

// 32-byte SIMD vectors via GCC/Clang vector extensions: one ymm register in
// the AVX2 variant, two xmm registers in the portable one.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int lanes = 8;
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int lanes = 4;
};

template <typename T>
inline typename Simd<T>::type load(const T* p) {
  typename Simd<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Simd<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename T>
inline T hsum(typename Simd<T>::type v) {
  T s = T(0);
  for (int k = 0; k < Simd<T>::lanes; ++k) s += v[k];
  return s;
}

// y[0:n] += a * x[0:n]; N > 0 fixes n at compile time.
template <typename T, int N>
inline void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  constexpr int L = Simd<T>::lanes;
  const int64_t m = N > 0 ? N : n;
  const int64_t body = m - m % L;
  for (int64_t i = 0; i < body; i += L) store(y + i, load(y + i) + a * load(x + i));
  for (int64_t i = body; i < m; ++i) y[i] += a * x[i];
}

// dot(x[0:n], y[0:n]) as a vector of lane partial sums plus a scalar tail
// (added to lane 0); the summation order is fixed, so results are
// reproducible run to run.
template <typename T, int N>
inline typename Simd<T>::type dot_lanes(const T* __restrict x,
                                        const T* __restrict y, int64_t n) {
  constexpr int L = Simd<T>::lanes;
  const int64_t m = N > 0 ? N : n;
  const int64_t body = m - m % L;
  typename Simd<T>::type acc = {};
  for (int64_t i = 0; i < body; i += L) acc += load(x + i) * load(y + i);
  T tail = T(0);
  for (int64_t i = body; i < m; ++i) tail += x[i] * y[i];
  acc[0] += tail;
  return acc;
}

// Accumulates the attention-weighted samples of one (b, q, h) into acc[0:D].
// vbase points at value[b, 0, h, 0]; row = nh * D is the key stride.
template <typename T, int N>
inline void sample_query(const Problem<T>& P, const T* vbase, const T* loc,
                         const T* attn, T* __restrict acc) {
  const int64_t row = P.nh * P.D;
  for (int64_t l = 0; l < P.nl; ++l) {
    const int64_t H = P.shapes[2 * l], W = P.shapes[2 * l + 1];
    const T* vl = vbase + P.starts[l] * row;
    for (int64_t p = 0; p < P.np; ++p) {
      const int64_t i = l * P.np + p;
      Bilinear<T> s;
      if (!bilinear_setup(loc[2 * i], loc[2 * i + 1], H, W, s)) continue;
      for (int c = 0; c < 4; ++c) {
        if (s.idx[c] < 0) continue;
        axpy<T, N>(acc, attn[i] * s.w[c], vl + s.idx[c] * row, P.D);
      }
    }
  }
}

// Fixed N (a multiple of the SIMD width): accumulate in registers.
template <typename T, int N>
struct RegisterAcc {
  static constexpr int L = Simd<T>::lanes;
  typename Simd<T>::type v[N / L];
  void zero() {
    for (int k = 0; k < N / L; ++k) v[k] = typename Simd<T>::type{};
  }
  void axpy(T a, const T* x, int64_t) {
    for (int k = 0; k < N / L; ++k) v[k] += a * load(x + k * L);
  }
  void write(T* o) const {
    for (int k = 0; k < N / L; ++k) store(o + k * L, v[k]);
  }
};

// Any D: accumulate directly in the (L1-resident) output row.
template <typename T>
struct RowAcc {
  T* o;
  int64_t n;
  void zero() {
    for (int64_t d = 0; d < n; ++d) o[d] = T(0);
  }
  void axpy(T a, const T* x, int64_t) { detr_plus::cpu::MSDA_ISA_NS::axpy<T, 0>(o, a, x, n); }
  void write(T*) const {}
};

template <typename T, typename Acc>
inline void sample_query(const Problem<T>& P, const T* vbase, const T* loc,
                         const T* attn, Acc& acc) {
  const int64_t row = P.nh * P.D;
  for (int64_t l = 0; l < P.nl; ++l) {
    const int64_t H = P.shapes[2 * l], W = P.shapes[2 * l + 1];
    const T* vl = vbase + P.starts[l] * row;
    for (int64_t p = 0; p < P.np; ++p) {
      const int64_t i = l * P.np + p;
      Bilinear<T> s;
      if (!bilinear_setup(loc[2 * i], loc[2 * i + 1], H, W, s)) continue;
      for (int c = 0; c < 4; ++c) {
        if (s.idx[c] < 0) continue;
        acc.axpy(attn[i] * s.w[c], vl + s.idx[c] * row, P.D);
      }
    }
  }
}

template <typename T, int N>
void forward_impl(const Problem<T>& P, T* out, int64_t begin, int64_t end) {
  const int64_t D = P.D, row = P.nh * D, per_q = P.nl * P.np;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t bqh = t;  // items in (b, q, h) order
    const int64_t h = t % P.nh, b = t / (P.nh * P.nq);
    T* o = out + bqh * D;
    const T* vbase = P.value + b * P.nk * row + h * D;
    if constexpr (N > 0) {
      RegisterAcc<T, N> acc;
      acc.zero();
      sample_query(P, vbase, P.loc + bqh * per_q * 2, P.attn + bqh * per_q,
                   acc);
      acc.write(o);
    } else {
      RowAcc<T> acc{o, D};
      acc.zero();
      sample_query(P, vbase, P.loc + bqh * per_q * 2, P.attn + bqh * per_q,
                   acc);
    }
  }
}

// Gradients of one sampling point i = (b, q, h, l, p) of head row g.
template <typename T, int N>
inline void backward_point(const Problem<T>& P, const Grads<T>& G,
                           int64_t i, const T* g, const T* vl, T* gvl,
                           int64_t H, int64_t W) {
  const int64_t row = P.nh * P.D;
  const T a = P.attn[i];
  Bilinear<T> s;
  if (!bilinear_setup(P.loc[2 * i], P.loc[2 * i + 1], H, W, s)) {
    G.attn[i] = T(0);
    G.loc[2 * i] = T(0);
    G.loc[2 * i + 1] = T(0);
    return;
  }
  typename Simd<T>::type dv[4];  // lane sums of dot(grad_out, corner)
  for (int c = 0; c < 4; ++c) {
    if (s.idx[c] < 0) {
      dv[c] = typename Simd<T>::type{};
      continue;
    }
    dv[c] = dot_lanes<T, N>(g, vl + s.idx[c] * row, P.D);
    axpy<T, N>(gvl + s.idx[c] * row, a * s.w[c], g, P.D);
  }
  G.attn[i] = hsum<T>(s.w[0] * dv[0] + s.w[1] * dv[1] + s.w[2] * dv[2] +
                      s.w[3] * dv[3]);
  G.loc[2 * i] = a * static_cast<T>(W) *
                 hsum<T>(s.hy * (dv[1] - dv[0]) + s.ly * (dv[3] - dv[2]));
  G.loc[2 * i + 1] = a * static_cast<T>(H) *
                     hsum<T>(s.hx * (dv[2] - dv[0]) + s.lx * (dv[3] - dv[1]));
}

// One backward item: batch b, level l, heads [h0, h1). It owns
// grad_value[b, keys of level l, h0:h1, :] and walks the queries in order, so
// every grad_value element is accumulated sequentially in the same order
// whatever the number of threads or items.
template <typename T, int N>
void backward_item(const Problem<T>& P, const Grads<T>& G, int64_t b,
                   int64_t l, int64_t h0, int64_t h1) {
  const int64_t D = P.D, row = P.nh * D;
  const int64_t H = P.shapes[2 * l], W = P.shapes[2 * l + 1];
  const int64_t key0 = (b * P.nk + P.starts[l]) * row;
  for (int64_t k = 0; k < H * W; ++k) {
    T* gv = G.value + key0 + k * row;
    for (int64_t d = h0 * D; d < h1 * D; ++d) gv[d] = T(0);
  }
  for (int64_t q = 0; q < P.nq; ++q) {
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t bqh = (b * P.nq + q) * P.nh + h;
      const int64_t first = (bqh * P.nl + l) * P.np;  // (b, q, h, l, 0)
      const T* g = G.grad_out + bqh * D;
      for (int64_t p = 0; p < P.np; ++p) {
        backward_point<T, N>(P, G, first + p, g, P.value + key0 + h * D,
                             G.value + key0 + h * D, H, W);
      }
    }
  }
}

// Items are (b, l, head group) with G.heads_per_item heads per group.
template <typename T, int N>
void backward_impl(const Problem<T>& P, const Grads<T>& G, int64_t begin,
                   int64_t end) {
  const int64_t hpi = G.heads_per_item;
  const int64_t groups = (P.nh + hpi - 1) / hpi;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t hg = t % groups, bl = t / groups;
    const int64_t h0 = hg * hpi, h1 = h0 + hpi < P.nh ? h0 + hpi : P.nh;
    backward_item<T, N>(P, G, bl / P.nl, bl % P.nl, h0, h1);
  }
}

template <typename T>
void forward_dispatch(const Problem<T>& P, T* out, int64_t begin,
                      int64_t end) {
  switch (P.D) {
    case 8: return forward_impl<T, 8>(P, out, begin, end);
    case 16: return forward_impl<T, 16>(P, out, begin, end);
    case 32: return forward_impl<T, 32>(P, out, begin, end);
    case 64: return forward_impl<T, 64>(P, out, begin, end);
    default: return forward_impl<T, 0>(P, out, begin, end);
  }
}

template <typename T>
void backward_dispatch(const Problem<T>& P, const Grads<T>& G, int64_t begin,
                       int64_t end) {
  switch (P.D) {
    case 8: return backward_impl<T, 8>(P, G, begin, end);
    case 16: return backward_impl<T, 16>(P, G, begin, end);
    case 32: return backward_impl<T, 32>(P, G, begin, end);
    case 64: return backward_impl<T, 64>(P, G, begin, end);
    default: return backward_impl<T, 0>(P, G, begin, end);
  }
}

}  // namespace

void forward(const Problem<float>& p, float* out, int64_t begin,
             int64_t end) {
  forward_dispatch(p, out, begin, end);
}
void forward(const Problem<double>& p, double* out, int64_t begin,
             int64_t end) {
  forward_dispatch(p, out, begin, end);
}
void backward(const Problem<float>& p, const Grads<float>& g, int64_t begin,
              int64_t end) {
  backward_dispatch(p, g, begin, end);
}
void backward(const Problem<double>& p, const Grads<double>& g,
              int64_t begin, int64_t end) {
  backward_dispatch(p, g, begin, end);
}

}  // namespace MSDA_ISA_NS
}  // namespace cpu
}  // namespace detr_plus
