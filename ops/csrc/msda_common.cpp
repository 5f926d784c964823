// Input validation shared by the CPU and CUDA entry points.
#include "msda.h"

namespace detr_plus {

namespace {

bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

void check_float_arg(const at::Tensor& value, const at::Tensor& t,
                     const char* name) {
  TORCH_CHECK_VALUE(t.device() == value.device(), name, " is on ", t.device(),
                    " but value is on ", value.device());
  const auto vt = value.scalar_type();
  const bool same = t.scalar_type() == vt;
  const bool amp = is_reduced_float(vt) && t.scalar_type() == at::kFloat;
  TORCH_CHECK_VALUE(same || amp, name, " has dtype ", t.scalar_type(),
                    " but value has dtype ", vt,
                    " (allowed: the same dtype, or float32 when value is "
                    "float16/bfloat16)");
}

}  // namespace

void check_msda_inputs(const at::Tensor& value,
                       const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights,
                       const at::Tensor* grad_output) {
  TORCH_CHECK_VALUE(value.dim() == 4,
                    "value must be 4-D (bs, num_keys, num_heads, head_dims), "
                    "got shape ", value.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(value.scalar_type()),
                    "value must be a floating tensor, got ",
                    value.scalar_type());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "spatial_shapes must have shape (num_levels, 2), got ",
                    spatial_shapes.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.scalar_type() == at::kLong &&
                        level_start_index.scalar_type() == at::kLong,
                    "spatial_shapes and level_start_index must be int64");
  const int64_t bs = value.size(0), nh = value.size(2);
  const int64_t nl = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 &&
                        level_start_index.size(0) == nl,
                    "level_start_index must have shape (", nl, ",), got ",
                    level_start_index.sizes());
  const auto& loc = sampling_locations;
  TORCH_CHECK_VALUE(loc.dim() == 6 && loc.size(5) == 2,
                    "sampling_locations must be 6-D (bs, num_queries, "
                    "num_heads, num_levels, num_points, 2), got shape ",
                    loc.sizes());
  TORCH_CHECK_VALUE(loc.size(0) == bs && loc.size(2) == nh &&
                        loc.size(3) == nl,
                    "sampling_locations shape ", loc.sizes(),
                    " does not match value ", value.sizes(),
                    " and spatial_shapes ", spatial_shapes.sizes());
  const auto& attn = attention_weights;
  TORCH_CHECK_VALUE(attn.dim() == 5 &&
                        attn.sizes() == loc.sizes().slice(0, 5),
                    "attention_weights must have shape ",
                    loc.sizes().slice(0, 5), ", got ", attn.sizes());
  check_float_arg(value, loc, "sampling_locations");
  check_float_arg(value, attn, "attention_weights");
  TORCH_CHECK_VALUE(spatial_shapes.device() == value.device() &&
                        level_start_index.device() == value.device(),
                    "spatial_shapes and level_start_index must be on ",
                    value.device());
  if (grad_output != nullptr) {
    const int64_t nq = loc.size(1);
    TORCH_CHECK_VALUE(grad_output->dim() == 3 && grad_output->size(0) == bs &&
                          grad_output->size(1) == nq &&
                          grad_output->size(2) == nh * value.size(3),
                      "grad_output must have shape (", bs, ", ", nq, ", ",
                      nh * value.size(3), "), got ", grad_output->sizes());
    TORCH_CHECK_VALUE(grad_output->device() == value.device(),
                      "grad_output must be on ", value.device());
  }
}

void check_msda_index_values(const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             int64_t num_keys) {
  TORCH_CHECK(spatial_shapes.device().is_cpu() &&
                  level_start_index.device().is_cpu(),
              "check_msda_index_values needs CPU tensors");
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* s = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK_VALUE(s[2 * l] >= 0 && s[2 * l + 1] >= 0,
                      "spatial_shapes must be non-negative, level ", l,
                      " is (", s[2 * l], ", ", s[2 * l + 1], ")");
    TORCH_CHECK_VALUE(st[l] == total, "level_start_index[", l, "] is ", st[l],
                      " but spatial_shapes gives ", total);
    total += s[2 * l] * s[2 * l + 1];
  }
  TORCH_CHECK_VALUE(total == num_keys, "sum(H*W) over spatial_shapes is ",
                    total, " but value has num_keys=", num_keys);
}

}  // namespace detr_plus
