// MSDeformAttn CUDA kernels of DETR+ (registered for the CUDA dispatch key of
// torch.ops.detr_plus_C.msda_forward / msda_backward).
//
// Work split: one group of G lanes (G a power of two <= 32, inside one warp)
// per (b, q, h). Lane k handles channel chunks k, k + G, ... of V contiguous
// channels each (16-byte vector loads when the layout allows it). All lanes
// of a group compute the same sampling coordinates (in float, or double for
// double inputs) and read the same loc/attn values (broadcast loads).
//
// Forward: each lane accumulates its channels over all levels and points in
// acc_t (float for half/bfloat16/float, double for double) and stores them.
// Backward: per sampling point, the lanes reduce three partial dot products
// with warp shuffles, so grad_attn / grad_loc of a point are written once by
// lane 0 (no atomics). grad_value is accumulated with atomicAdd (vector
// float4/float2 atomics on sm_90+), into a float32 buffer for 16-bit values.
// That accumulation is not deterministic: under
// torch.use_deterministic_algorithms(True) the backward raises (or warns with
// warn_only=True) through at::globalContext().alertNotDeterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "msda.h"

namespace detr_plus {
namespace {

constexpr int kThreads = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// The four bilinear corners (0 = (y0, x0), 1 = (y0, x1), 2 = (y1, x0),
// 3 = (y1, x1)) of one sampling point, as in grid_sample(align_corners=False,
// padding_mode='zeros').
template <typename acc_t>
struct Corners {
  int idx[4];  // key index inside the level, -1 when outside the map
  acc_t w[4];
  acc_t lx, ly, hx, hy;
};

// False when no corner lies inside the (H, W) map (also for NaN).
template <typename acc_t>
__device__ __forceinline__ bool corners_setup(acc_t loc_x, acc_t loc_y,
                                              int64_t H, int64_t W,
                                              Corners<acc_t>& s) {
  // grid_sample's own arithmetic: grid g = 2 * loc - 1, then
  // x = ((g + 1) * W - 1) / 2 (= loc * W - 0.5 up to rounding).
  const acc_t x =
      ((loc_x * acc_t(2) - acc_t(1) + acc_t(1)) * static_cast<acc_t>(W) -
       acc_t(1)) * acc_t(0.5);
  const acc_t y =
      ((loc_y * acc_t(2) - acc_t(1) + acc_t(1)) * static_cast<acc_t>(H) -
       acc_t(1)) * acc_t(0.5);
  if (!(x >= acc_t(-1) && y >= acc_t(-1) && x < static_cast<acc_t>(W) &&
        y < static_cast<acc_t>(H))) {
    return false;
  }
  const acc_t fx = floor(x), fy = floor(y);
  // |x0| <= W and |y0| <= H here, and a level has fewer than 2^31 keys.
  const int x0 = static_cast<int>(fx), y0 = static_cast<int>(fy);
  const int x1 = x0 + 1, y1 = y0 + 1, Wi = static_cast<int>(W);
  s.lx = x - fx;
  s.ly = y - fy;
  s.hx = acc_t(1) - s.lx;
  s.hy = acc_t(1) - s.ly;
  s.w[0] = s.hy * s.hx;
  s.w[1] = s.hy * s.lx;
  s.w[2] = s.ly * s.hx;
  s.w[3] = s.ly * s.lx;
  const bool in_x0 = x0 >= 0, in_x1 = x1 < W, in_y0 = y0 >= 0, in_y1 = y1 < H;
  s.idx[0] = (in_y0 && in_x0) ? y0 * Wi + x0 : -1;
  s.idx[1] = (in_y0 && in_x1) ? y0 * Wi + x1 : -1;
  s.idx[2] = (in_y1 && in_x0) ? y1 * Wi + x0 : -1;
  s.idx[3] = (in_y1 && in_x1) ? y1 * Wi + x1 : -1;
  return true;
}

struct Dims {
  int64_t bs, nk, nh, D, nq, nl, np;
  int log2_group;  // G = 1 << log2_group lanes per (b, q, h)
};

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    msda_forward_kernel(const scalar_t* __restrict__ value,
                        const int64_t* __restrict__ shapes,
                        const int64_t* __restrict__ starts,
                        const at::opmath_type<scalar_t>* __restrict__ loc,
                        const at::opmath_type<scalar_t>* __restrict__ attn,
                        scalar_t* __restrict__ out, Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int G = 1 << d.log2_group;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x +
                      threadIdx.x;
  const int64_t item = tid >> d.log2_group;  // (b, q, h)
  const int lane = static_cast<int>(tid & (G - 1));
  if (item >= d.bs * d.nq * d.nh) return;
  const int64_t h = item % d.nh, b = item / (d.nh * d.nq);
  const int64_t row = d.nh * d.D, per_item = d.nl * d.np;
  const scalar_t* vbase = value + b * d.nk * row + h * d.D;
  const acc_t* loc_i = loc + item * per_item * 2;
  const acc_t* attn_i = attn + item * per_item;
  const int chunks = static_cast<int>(d.D / V);
  for (int chunk = lane; chunk < chunks; chunk += G) {
    acc_t acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = acc_t(0);
    for (int64_t l = 0; l < d.nl; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const scalar_t* vl = vbase + starts[l] * row + chunk * V;
      for (int64_t p = 0; p < d.np; ++p) {
        const int64_t i = l * d.np + p;
        Corners<acc_t> s;
        if (!corners_setup(loc_i[2 * i], loc_i[2 * i + 1], H, W, s)) continue;
        const acc_t a = attn_i[i];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (s.idx[c] < 0) continue;
          const Pack<scalar_t, V> v = load_pack<scalar_t, V>(vl + static_cast<int64_t>(s.idx[c]) * row);
          const acc_t coeff = a * s.w[c];
#pragma unroll
          for (int k = 0; k < V; ++k) acc[k] += coeff * static_cast<acc_t>(v.v[k]);
        }
      }
    }
    Pack<scalar_t, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = static_cast<scalar_t>(acc[k]);
    *reinterpret_cast<Pack<scalar_t, V>*>(out + item * d.D + chunk * V) = o;
  }
}

template <typename grad_t, typename acc_t, int V>
__device__ __forceinline__ void atomic_axpy_scalar(grad_t* grad, acc_t coeff,
                                                   const acc_t* g) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    atomicAdd(grad + k, static_cast<grad_t>(coeff * g[k]));
  }
}

// grad[0:V] += coeff * g[0:V] with atomics; float4/float2 atomics on sm_90+.
template <typename grad_t, typename acc_t, int V>
__device__ __forceinline__ void atomic_axpy(grad_t* grad, acc_t coeff,
                                            const acc_t* g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same<grad_t, float>::value && V % 4 == 0) {
#pragma unroll
    for (int k = 0; k < V; k += 4) {
      atomicAdd(reinterpret_cast<float4*>(grad + k),
                make_float4(coeff * g[k], coeff * g[k + 1], coeff * g[k + 2],
                            coeff * g[k + 3]));
    }
  } else if constexpr (std::is_same<grad_t, float>::value && V % 2 == 0) {
#pragma unroll
    for (int k = 0; k < V; k += 2) {
      atomicAdd(reinterpret_cast<float2*>(grad + k),
                make_float2(coeff * g[k], coeff * g[k + 1]));
    }
  } else {
    atomic_axpy_scalar<grad_t, acc_t, V>(grad, coeff, g);
  }
#else
  atomic_axpy_scalar<grad_t, acc_t, V>(grad, coeff, g);
#endif
}

// Sum over the G lanes of a group (G a power of two, groups warp-aligned).
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, unsigned mask, int G) {
  for (int offset = G >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(mask, v, offset, G);
  }
  return v;
}

// grad_t: float for float16/bfloat16/float values (a float32 buffer for the
// 16-bit ones), double for double.
template <typename scalar_t, typename grad_t, int V>
__global__ void __launch_bounds__(kThreads)
    msda_backward_kernel(const scalar_t* __restrict__ grad_out,
                         const scalar_t* __restrict__ value,
                         const int64_t* __restrict__ shapes,
                         const int64_t* __restrict__ starts,
                         const at::opmath_type<scalar_t>* __restrict__ loc,
                         const at::opmath_type<scalar_t>* __restrict__ attn,
                         grad_t* __restrict__ grad_value,
                         at::opmath_type<scalar_t>* __restrict__ grad_loc,
                         at::opmath_type<scalar_t>* __restrict__ grad_attn,
                         Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int G = 1 << d.log2_group;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x +
                      threadIdx.x;
  const int64_t item = tid >> d.log2_group;  // (b, q, h)
  const int lane = static_cast<int>(tid & (G - 1));
  // Whole groups leave together (blocks hold whole groups), so the shuffles
  // below only involve active lanes of this group.
  if (item >= d.bs * d.nq * d.nh) return;
  const int warp_lane = static_cast<int>(threadIdx.x & 31);
  const unsigned mask =
      G == 32 ? 0xffffffffu : (((1u << G) - 1u) << (warp_lane & ~(G - 1)));
  const int64_t h = item % d.nh, b = item / (d.nh * d.nq);
  const int64_t row = d.nh * d.D, per_item = d.nl * d.np;
  const int64_t vbase = b * d.nk * row + h * d.D;
  const acc_t* loc_i = loc + item * per_item * 2;
  const acc_t* attn_i = attn + item * per_item;
  const int chunks = static_cast<int>(d.D / V);
  // With one chunk per lane (the common case) grad_out stays in registers.
  const bool single = chunks <= G;
  acc_t g_reg[V] = {};
  if (single && lane < chunks) {
    const Pack<scalar_t, V> gp =
        load_pack<scalar_t, V>(grad_out + item * d.D + lane * V);
#pragma unroll
    for (int k = 0; k < V; ++k) g_reg[k] = static_cast<acc_t>(gp.v[k]);
  }
  for (int64_t l = 0; l < d.nl; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const int64_t lbase = vbase + starts[l] * row;
    for (int64_t p = 0; p < d.np; ++p) {
      const int64_t i = l * d.np + p;
      Corners<acc_t> s;
      if (!corners_setup(loc_i[2 * i], loc_i[2 * i + 1], H, W, s)) {
        if (lane == 0) {
          grad_attn[item * per_item + i] = acc_t(0);
          grad_loc[(item * per_item + i) * 2] = acc_t(0);
          grad_loc[(item * per_item + i) * 2 + 1] = acc_t(0);
        }
        continue;
      }
      const acc_t a = attn_i[i];
      acc_t part_attn = 0, part_x = 0, part_y = 0;
      for (int chunk = lane; chunk < chunks; chunk += G) {
        acc_t g[V];
        if (single) {
#pragma unroll
          for (int k = 0; k < V; ++k) g[k] = g_reg[k];
        } else {
          const Pack<scalar_t, V> gp =
              load_pack<scalar_t, V>(grad_out + item * d.D + chunk * V);
#pragma unroll
          for (int k = 0; k < V; ++k) g[k] = static_cast<acc_t>(gp.v[k]);
        }
        acc_t dv[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          dv[c] = acc_t(0);
          if (s.idx[c] < 0) continue;
          const int64_t off =
              lbase + static_cast<int64_t>(s.idx[c]) * row + chunk * V;
          const Pack<scalar_t, V> v = load_pack<scalar_t, V>(value + off);
#pragma unroll
          for (int k = 0; k < V; ++k) dv[c] += g[k] * static_cast<acc_t>(v.v[k]);
          atomic_axpy<grad_t, acc_t, V>(grad_value + off, a * s.w[c], g);
        }
        part_attn += s.w[0] * dv[0] + s.w[1] * dv[1] + s.w[2] * dv[2] +
                     s.w[3] * dv[3];
        part_x += s.hy * (dv[1] - dv[0]) + s.ly * (dv[3] - dv[2]);
        part_y += s.hx * (dv[2] - dv[0]) + s.lx * (dv[3] - dv[1]);
      }
      part_attn = group_sum(part_attn, mask, G);
      part_x = group_sum(part_x, mask, G);
      part_y = group_sum(part_y, mask, G);
      if (lane == 0) {
        grad_attn[item * per_item + i] = part_attn;
        grad_loc[(item * per_item + i) * 2] =
            a * static_cast<acc_t>(W) * part_x;
        grad_loc[(item * per_item + i) * 2 + 1] =
            a * static_cast<acc_t>(H) * part_y;
      }
    }
  }
}

// Channels per lane: the widest vector (at most 16 bytes) whose length
// divides D and whose size divides every pointer's alignment.
template <typename scalar_t>
int pick_vec(int64_t D, std::initializer_list<const void*> ptrs) {
  for (int V = static_cast<int>(16 / sizeof(scalar_t)); V > 1; V /= 2) {
    if (D % V != 0) continue;
    bool aligned = true;
    for (const void* p : ptrs) {
      aligned = aligned &&
                reinterpret_cast<std::uintptr_t>(p) % (V * sizeof(scalar_t)) == 0;
    }
    if (aligned) return V;
  }
  return 1;
}

// Lanes per (b, q, h) the backward aims for: vectors are narrowed until the
// channels give at least this many (more lanes and fewer registers per lane;
// 16-bit values at head_dims 32 would otherwise get 4 lanes of 8 channels).
// DETR_PLUS_MSDA_CUDA_BWD_MIN_LANES overrides it (1: widest vectors).
int backward_min_lanes() {
  const char* env = std::getenv("DETR_PLUS_MSDA_CUDA_BWD_MIN_LANES");
  const int lanes = env ? std::atoi(env) : 0;
  return lanes > 0 ? std::min(lanes, 32) : 8;
}

Dims make_dims(const at::Tensor& value, const at::Tensor& loc, int V) {
  Dims d;
  d.bs = value.size(0);
  d.nk = value.size(1);
  d.nh = value.size(2);
  d.D = value.size(3);
  d.nq = loc.size(1);
  d.nl = loc.size(3);
  d.np = loc.size(4);
  const int64_t chunks = d.D / V;
  d.log2_group = 0;
  while ((int64_t{1} << d.log2_group) < chunks && d.log2_group < 5) {
    ++d.log2_group;
  }
  return d;
}

int64_t num_blocks(const Dims& d) {
  const int64_t threads = (d.bs * d.nq * d.nh) << d.log2_group;
  return (threads + kThreads - 1) / kThreads;
}

// Calls f(std::integral_constant<int, V>) for the runtime V in {1,2,4,8}.
template <typename F>
void with_vec(int V, F&& f) {
  switch (V) {
    case 8: return f(std::integral_constant<int, 8>());
    case 4: return f(std::integral_constant<int, 4>());
    case 2: return f(std::integral_constant<int, 2>());
    default: return f(std::integral_constant<int, 1>());
  }
}

struct CudaInputs {
  at::Tensor value, shapes, starts, loc, attn;
};

CudaInputs prepare(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights,
                   const at::Tensor* grad_output) {
  check_msda_inputs(value, spatial_shapes, level_start_index,
                    sampling_locations, attention_weights, grad_output);
  TORCH_CHECK_VALUE(value.is_cuda(), "value must be a CUDA tensor");
  // Index values are not validated here: that would need a device sync.
  const auto opmath = at::toOpMathType(value.scalar_type());
  return {value.contiguous(), spatial_shapes.contiguous(),
          level_start_index.contiguous(),
          sampling_locations.to(opmath).contiguous(),
          attention_weights.to(opmath).contiguous()};
}

at::Tensor msda_forward_cuda(const at::Tensor& value,
                             const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights) {
  const c10::cuda::OptionalCUDAGuard guard(value.device());
  const CudaInputs in = prepare(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights,
                                nullptr);
  at::Tensor out = at::empty(
      {value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)},
      in.value.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "msda_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int V = pick_vec<scalar_t>(
            value.size(3), {in.value.data_ptr(), out.data_ptr()});
        with_vec(V, [&](auto vec) {
          constexpr int kV = decltype(vec)::value;
          const Dims d = make_dims(in.value, in.loc, kV);
          msda_forward_kernel<scalar_t, kV>
              <<<num_blocks(d), kThreads, 0, stream>>>(
                  in.value.data_ptr<scalar_t>(), in.shapes.data_ptr<int64_t>(),
                  in.starts.data_ptr<int64_t>(), in.loc.data_ptr<acc_t>(),
                  in.attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), d);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value,
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const c10::cuda::OptionalCUDAGuard guard(value.device());
  at::globalContext().alertNotDeterministic(
      "detr_plus MSDeformAttn backward on CUDA (grad_value is accumulated "
      "with atomicAdd); run it on the CPU or use the PyTorch path with "
      "warn_only=True for a deterministic run");
  const CudaInputs in = prepare(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights,
                                &grad_output);
  const at::Tensor go = grad_output.to(value.scalar_type()).contiguous();
  const auto opmath = at::toOpMathType(value.scalar_type());
  // 16-bit values accumulate grad_value in a float32 buffer.
  at::Tensor gv = at::zeros(in.value.sizes(), in.value.options().dtype(opmath));
  at::Tensor gl = at::empty_like(in.loc);
  at::Tensor ga = at::empty_like(in.attn);
  if (ga.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "msda_backward_cuda",
        [&] {
          using acc_t = at::opmath_type<scalar_t>;
          int V = pick_vec<scalar_t>(
              value.size(3), {in.value.data_ptr(), go.data_ptr()});
          while (V > 1 && value.size(3) / V < backward_min_lanes()) V /= 2;
          // The float32 grad buffer must be aligned for vector atomics too.
          with_vec(V, [&](auto vec) {
            constexpr int kV = decltype(vec)::value;
            const Dims d = make_dims(in.value, in.loc, kV);
            msda_backward_kernel<scalar_t, acc_t, kV>
                <<<num_blocks(d), kThreads, 0, stream>>>(
                    go.data_ptr<scalar_t>(), in.value.data_ptr<scalar_t>(),
                    in.shapes.data_ptr<int64_t>(),
                    in.starts.data_ptr<int64_t>(), in.loc.data_ptr<acc_t>(),
                    in.attn.data_ptr<acc_t>(), gv.data_ptr<acc_t>(),
                    gl.data_ptr<acc_t>(), ga.data_ptr<acc_t>(), d);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
  }
  return {gv.to(value.scalar_type()), gl.to(sampling_locations.scalar_type()),
          ga.to(attention_weights.scalar_type())};
}

}  // namespace
}  // namespace detr_plus

TORCH_LIBRARY_IMPL(detr_plus_C, CUDA, m) {
  m.impl("msda_forward", &detr_plus::msda_forward_cuda);
  m.impl("msda_backward", &detr_plus::msda_backward_cuda);
}
