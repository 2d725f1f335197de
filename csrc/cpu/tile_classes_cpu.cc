// Mask tile classification and the thread helpers of the CPU kernels.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>

#include "cpu/cpu_common.h"

namespace dmattn::cpu {

MaskTileMap::MaskTileMap(const BroadcastOperand& mask) {
  if (!mask.present()) return;
  batch_ = mask.batch;
  heads_ = mask.heads;
  rows_ = mask.rows;
  cols_ = mask.cols;
  heads_per_index_ = mask.heads_per_index;
  m_tiles_ = ceil_div(rows_, kBlockM);
  n_tiles_ = ceil_div(cols_, kBlockN);
  classes_.assign(batch_ * heads_ * m_tiles_ * n_tiles_, kEmpty);
  const bool* data = static_cast<const bool*>(mask.data);
  parallel_for(batch_ * heads_ * m_tiles_, [&](int64_t item, int) {
    const int64_t mt = item % m_tiles_;
    const int64_t bh = item / m_tiles_;
    const int64_t r0 = mt * kBlockM, r1 = std::min(rows_, r0 + kBlockM);
    for (int64_t nt = 0; nt < n_tiles_; ++nt) {
      const int64_t c0 = nt * kBlockN, c1 = std::min(cols_, c0 + kBlockN);
      int64_t kept = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const bool* row = data + (bh * rows_ + r) * cols_;
        for (int64_t c = c0; c < c1; ++c) kept += row[c];
      }
      const int64_t total = (r1 - r0) * (c1 - c0);
      classes_[item * n_tiles_ + nt] = kept == 0 ? kEmpty : (kept == total ? kFull : kPartial);
    }
  });
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
