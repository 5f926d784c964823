// ATen entry points of the MSDeformAttn CPU kernels: checks, dtype handling,
// SIMD variant selection and the at::parallel_for split.
#include <ATen/Parallel.h>

#include "cpu/msda_cpu_problem.h"
#include "msda.h"

namespace detr_plus {

namespace {

bool cpu_has_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// float for float16/bfloat16/float32 values, double for double.
at::ScalarType compute_dtype(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
cpu::Problem<T> make_problem(const at::Tensor& value, const at::Tensor& shapes,
                             const at::Tensor& starts, const at::Tensor& loc,
                             const at::Tensor& attn) {
  cpu::Problem<T> p;
  p.value = value.data_ptr<T>();
  p.shapes = shapes.data_ptr<int64_t>();
  p.starts = starts.data_ptr<int64_t>();
  p.loc = loc.data_ptr<T>();
  p.attn = attn.data_ptr<T>();
  p.bs = value.size(0);
  p.nk = value.size(1);
  p.nh = value.size(2);
  p.D = value.size(3);
  p.nq = loc.size(1);
  p.nl = loc.size(3);
  p.np = loc.size(4);
  return p;
}

// Contiguous inputs in the compute dtype, validated.
struct Inputs {
  at::Tensor value, shapes, starts, loc, attn;
};

Inputs prepare(const at::Tensor& value, const at::Tensor& spatial_shapes,
               const at::Tensor& level_start_index,
               const at::Tensor& sampling_locations,
               const at::Tensor& attention_weights,
               const at::Tensor* grad_output) {
  check_msda_inputs(value, spatial_shapes, level_start_index,
                    sampling_locations, attention_weights, grad_output);
  TORCH_CHECK_VALUE(value.device().is_cpu(), "value must be a CPU tensor");
  check_msda_index_values(spatial_shapes, level_start_index, value.size(1));
  const auto ct = compute_dtype(value);
  return {value.to(ct).contiguous(), spatial_shapes.contiguous(),
          level_start_index.contiguous(),
          sampling_locations.to(ct).contiguous(),
          attention_weights.to(ct).contiguous()};
}

template <typename T>
void run_forward(const Inputs& in, at::Tensor& out) {
  const auto P = make_problem<T>(in.value, in.shapes, in.starts, in.loc,
                                 in.attn);
  T* o = out.data_ptr<T>();
  const bool avx2 = cpu_has_avx2();
  const int64_t items = P.bs * P.nh * P.nq;
  at::parallel_for(0, items, 16, [&](int64_t begin, int64_t end) {
    if (avx2) {
      cpu::avx2::forward(P, o, begin, end);
    } else {
      cpu::base::forward(P, o, begin, end);
    }
  });
}

// Fewest heads per backward item (more heads per item = better locality)
// that still gives every thread about four items.
int64_t heads_per_item(int64_t outer_items, int64_t num_heads) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t groups = 1;
  while (groups < num_heads && outer_items * groups < want) ++groups;
  return (num_heads + groups - 1) / groups;
}

template <typename T>
void run_backward(const Inputs& in, const at::Tensor& grad_out,
                  at::Tensor& gv, at::Tensor& gl, at::Tensor& ga) {
  const auto P = make_problem<T>(in.value, in.shapes, in.starts, in.loc,
                                 in.attn);
  const cpu::Grads<T> G{grad_out.data_ptr<T>(), gv.data_ptr<T>(),
                        gl.data_ptr<T>(), ga.data_ptr<T>(),
                        heads_per_item(P.bs * P.nl, P.nh)};
  const bool avx2 = cpu_has_avx2();
  // Items (b, level, head group) own disjoint grad_value slices: no atomics,
  // no per-thread buffers, deterministic.
  const int64_t groups = (P.nh + G.heads_per_item - 1) / G.heads_per_item;
  const int64_t items = P.bs * P.nl * groups;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    if (avx2) {
      cpu::avx2::backward(P, G, begin, end);
    } else {
      cpu::base::backward(P, G, begin, end);
    }
  });
}

}  // namespace

std::string msda_cpu_isa() { return cpu_has_avx2() ? "avx2" : "base"; }

at::Tensor msda_forward_cpu(const at::Tensor& value,
                            const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index,
                            const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const Inputs in = prepare(value, spatial_shapes, level_start_index,
                            sampling_locations, attention_weights, nullptr);
  const int64_t bs = value.size(0), nq = sampling_locations.size(1);
  at::Tensor out = at::empty({bs, nq, value.size(2) * value.size(3)},
                             in.value.options());
  if (out.numel() > 0) {
    if (in.value.scalar_type() == at::kDouble) {
      run_forward<double>(in, out);
    } else {
      run_forward<float>(in, out);
    }
  }
  return out.to(value.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value,
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Inputs in = prepare(value, spatial_shapes, level_start_index,
                            sampling_locations, attention_weights,
                            &grad_output);
  const at::Tensor go = grad_output.to(in.value.scalar_type()).contiguous();
  at::Tensor gv = at::empty_like(in.value);
  at::Tensor gl = at::empty_like(in.loc);
  at::Tensor ga = at::empty_like(in.attn);
  if (gv.numel() > 0 && in.loc.size(1) == 0) {
    gv.zero_();  // no query: nothing is sampled
  } else if (gv.numel() > 0 || gl.numel() > 0) {
    if (in.value.scalar_type() == at::kDouble) {
      run_backward<double>(in, go, gv, gl, ga);
    } else {
      run_backward<float>(in, go, gv, gl, ga);
    }
  }
  return {gv.to(value.scalar_type()),
          gl.to(sampling_locations.scalar_type()),
          ga.to(attention_weights.scalar_type())};
}

}  // namespace detr_plus
