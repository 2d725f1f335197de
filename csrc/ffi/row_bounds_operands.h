// The row-bounds operands of the attention targets (CPU and CUDA alike): rows int32 [Bb, Lq, 4] and key segment ids
// int32 [Bb, Lk], Bb in {1, B}, each zero-size when absent (csrc/row_bounds.h).
#pragma once
#include <string>

#include "xla/ffi/api/ffi.h"

#include "row_bounds.h"

namespace dmattn {

inline xla::ffi::Error decode_row_bounds(const xla::ffi::AnyBuffer& rows, const xla::ffi::AnyBuffer& key_segments,
                                         int64_t batch, int64_t q_len, int64_t kv_len, RowBounds* out) {
  namespace ffi = xla::ffi;
  *out = RowBounds{};
  if (rows.element_count() == 0) {
    if (key_segments.element_count() != 0)
      return ffi::Error::InvalidArgument("dmattn: key segment ids need the row bounds operand");
    return ffi::Error::Success();
  }
  const auto rd = rows.dimensions();
  if (rows.element_type() != ffi::DataType::S32 || rd.size() != 3 || (rd[0] != 1 && rd[0] != batch) ||
      rd[1] != q_len || rd[2] != RowBounds::kColumns)
    return ffi::Error::InvalidArgument("dmattn: row bounds must be s32 [1|B, Lq, 4] = [1|" + std::to_string(batch) +
                                       ", " + std::to_string(q_len) + ", 4]");
  out->rows = static_cast<const int32_t*>(rows.untyped_data());
  out->rows_batch_stride = rd[0] == 1 ? 0 : RowBounds::kColumns * q_len;
  if (key_segments.element_count() != 0) {
    const auto sd = key_segments.dimensions();
    if (key_segments.element_type() != ffi::DataType::S32 || sd.size() != 2 || sd[0] != rd[0] || sd[1] != kv_len)
      return ffi::Error::InvalidArgument("dmattn: key segment ids must be s32 [Bb, Lk] with the row bounds' Bb, Lk = " +
                                         std::to_string(kv_len));
    out->key_segments = static_cast<const int32_t*>(key_segments.untyped_data());
    out->segments_batch_stride = sd[0] == 1 ? 0 : kv_len;
  }
  return ffi::Error::Success();
}

}  // namespace dmattn
