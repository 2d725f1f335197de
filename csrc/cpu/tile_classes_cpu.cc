// Mask tile classification and the thread helpers of the CPU kernels.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>

#include "cpu/cpu_common.h"
#include "cpu/mask_source.h"

namespace dmattn::cpu {

MaskTileMap::MaskTileMap(const MaskSource& mask) {
  if (!mask.restricts()) return;
  const MaskSource::Extent e = mask.extent();
  batch_ = e.batch;
  heads_ = e.heads;
  rows_ = e.rows;
  cols_ = e.cols;
  heads_per_index_ = e.heads_per_index;
  m_tiles_ = ceil_div(rows_, kBlockM);
  n_tiles_ = ceil_div(cols_, kBlockN);
  classes_.assign(batch_ * heads_ * m_tiles_ * n_tiles_, kTileEmpty);
  parallel_for(batch_ * heads_ * m_tiles_, [&](int64_t item, int) {
    const int64_t mt = item % m_tiles_;
    const int64_t bh = item / m_tiles_;
    const int64_t r0 = mt * kBlockM, r1 = std::min(rows_, r0 + kBlockM);
    for (int64_t nt = 0; nt < n_tiles_; ++nt) {
      const int64_t c0 = nt * kBlockN, c1 = std::min(cols_, c0 + kBlockN);
      classes_[item * n_tiles_ + nt] = mask.classify(bh, r0, r1, c0, c1);
    }
  });
}

TileClass MaskSource::classify(int64_t bh, int64_t r0, int64_t r1, int64_t c0, int64_t c1) const {
  switch (kind_) {
    case MaskKind::kTopK: {
      // One key range against many thresholds: the range's score bounds decide every row at once. NaN scores
      // are never kept, so they leave "nothing kept" intact but rule out "everything kept".
      const float* score = static_cast<const float*>(mask_.data) + bh * kv_len_;
      float lo = INFINITY, hi = -INFINITY;
      bool has_nan = false;
      for (int64_t c = c0; c < c1; ++c) {
        const float x = score[c];
        if (x != x) {
          has_nan = true;
        } else {
          lo = std::min(lo, x);
          hi = std::max(hi, x);
        }
      }
      const float* threshold = static_cast<const float*>(threshold_.data) + bh * q_len_;
      const int32_t* threshold_key = static_cast<const int32_t*>(threshold_key_.data) + bh * q_len_;
      bool none_kept = true, all_kept = !has_nan;
      for (int64_t r = r0; r < r1 && (none_kept || all_kept); ++r) {
        const float t = threshold[r];
        const int64_t jt = threshold_key[r];
        none_kept = none_kept && (hi < t || (hi == t && c0 > jt));
        all_kept = all_kept && (lo > t || (lo == t && c1 - 1 <= jt));
      }
      return none_kept ? kTileEmpty : (all_kept ? kTileFull : kTilePartial);
    }
    case MaskKind::kKeyIndices: {
      // Never kTileFull: that would trust the rows to hold no repeated key, and partial tiles cost little more.
      const int64_t k_count = mask_.cols;
      const int32_t* keys = static_cast<const int32_t*>(mask_.data) + (bh * mask_.rows + r0) * k_count;
      for (int64_t r = r0; r < r1; ++r, keys += k_count) {
        const int32_t* k = std::lower_bound(keys, keys + k_count, c0);
        if (k != keys + k_count && *k < c1) return kTilePartial;
      }
      return kTileEmpty;
    }
    default: {
      const bool* data = static_cast<const bool*>(mask_.data);
      int64_t kept = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const bool* row = data + (bh * mask_.rows + r) * mask_.cols;
        for (int64_t c = c0; c < c1; ++c) kept += row[c];
      }
      const int64_t total = (r1 - r0) * (c1 - c0);
      return kept == 0 ? kTileEmpty : (kept == total ? kTileFull : kTilePartial);
    }
  }
}

int num_threads() {
  if (const char* env = std::getenv("DMATTN_CPU_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

void parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn, bool static_schedule) {
  const int threads = static_cast<int>(std::min<int64_t>(num_threads(), n));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&](int t) {
    if (static_schedule) {
      for (int64_t i = t; i < n; i += threads) fn(i, t);
    } else {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, t);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
}

}  // namespace dmattn::cpu
