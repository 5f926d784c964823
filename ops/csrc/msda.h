// Multi-scale deformable attention (MSDeformAttn): shared declarations and
// input checks for the CPU and CUDA kernels of DETR+.
//
// Layouts (mmcv's):
//   value               (bs, num_keys, num_heads, head_dims)
//   spatial_shapes      (num_levels, 2) int64, rows (H, W)
//   level_start_index   (num_levels,)   int64
//   sampling_locations  (bs, num_queries, num_heads, num_levels, num_points, 2)
//                       as (x, y) in [0, 1]
//   attention_weights   (bs, num_queries, num_heads, num_levels, num_points)
//   output              (bs, num_queries, num_heads * head_dims)
// sampling_locations / attention_weights have value's dtype, or float32 when
// value is float16 / bfloat16 (the "opmath" dtype of value).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace detr_plus {

at::Tensor msda_forward_cpu(const at::Tensor& value,
                            const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index,
                            const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value,
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

// Name of the SIMD variant the CPU kernel uses on this machine.
std::string msda_cpu_isa();

// Checks ranks, sizes, dtypes and devices (metadata only, no device sync).
// Raises ValueError naming the offending argument.
void check_msda_inputs(const at::Tensor& value,
                       const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights,
                       const at::Tensor* grad_output = nullptr);

// Checks sum(H*W) == num_keys, H, W >= 0 and level_start_index against
// spatial_shapes. Reads values, so only call it with CPU index tensors.
void check_msda_index_values(const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             int64_t num_keys);

}  // namespace detr_plus
