// Flash-attention forward over the mask's live-key lists (csrc/cuda/key_lists.h).
//
// Same arithmetic as flash_fwd_kernel (traits, score pipeline, online softmax, epilogue are shared), but a CTA
// walks its query tile's list of live keys 64 at a time instead of the key tiles: K and V rows are gathered by
// index (cp.async works per 16-byte piece, so any row order costs the same as a contiguous tile), the mask of the
// chunk is one uint64 per row, and a per-key bias is gathered with the keys. A top-k mask keeps ~k keys per row
// and nearly the same ones across a query tile, so the work follows k instead of Lk.
//
// A dense unit (more live keys than the list capacity) walks every key up to the causal bound the same way, with
// the chunk's mask bits read from the mask itself (csrc/cuda/mask_words.cuh) while the Q K^T product runs.
//
// Pipeline per chunk c: [K(c) landed] -> V(c) gather issued -> S = Q K^T -> [V(c) landed] -> K(c + 1) gather
// issued (its indices were loaded into registers before the Q K^T product) -> scores, softmax, P V.
#pragma once

#include "cuda/bias_element.cuh"
#include "cuda/flash_fwd_kernel.cuh"
#include "cuda/key_list_walk.cuh"
#include "cuda/mask_words.cuh"
#include "cuda/smem_tiles.cuh"

namespace dmattn {
namespace fwd {

// Logits of one key-list chunk in place, in natural units as the tile kernel computes them: scale or softcap,
// the bias (a per-key bias from the chunk's table `key_bias`, any other bias per element at `bias_base` through its
// strides), then -inf where a pair is dropped: rows past Lq, columns past the walked keys (idx < 0), a zero bit in
// the row's word, a zero bit of `key_keep` (a per-key bias of -inf: stage_chunk_keep_word; all ones without a
// per-key bias), the bottom-right causal bound on the real key index. A per-key bias without softcap is one fused
// multiply-add (the scale's product and the bias's sum rounded once). `acc` is the raw q.k accumulator, `s` and `cS`
// its (rows, cols) view and coordinates in the CTA's tile (either MMA layout); the key of chunk column cl is idx[cl].
// Shared by the sm80 and the Hopper key-list forwards.
template <class Acc, class S, class CS, int kRows>
__device__ __forceinline__ void key_list_logits(Acc& acc, S& s, CS const& cS, const FwdParams& p, const int32_t* idx,
                                                const float* key_bias, uint64_t key_keep, int64_t bias_base,
                                                const uint64_t (&row_bits)[kRows], int row0) {
  constexpr int kCols = decltype(size<1>(cS))::value;
  if (p.softcap > 0.f) {
    const float cap_in = p.scale / p.softcap;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) acc(i) = p.softcap * tanhf(acc(i) * cap_in);
    if (key_bias != nullptr) {
      CUTE_UNROLL
      for (int cc = 0; cc < kCols; ++cc) {
        const float bk = key_bias[get<1>(cS(0, cc))];
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) s(r, cc) += bk;  // a -inf bias: key_keep drops the column
      }
    }
  } else if (key_bias != nullptr) {
    CUTE_UNROLL
    for (int cc = 0; cc < kCols; ++cc) {
      const float bk = key_bias[get<1>(cS(0, cc))];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) s(r, cc) = fmaf(s(r, cc), p.scale, bk);  // a -inf bias: as above
    }
  } else {
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) acc(i) *= p.scale;
  }
  if (key_bias == nullptr && p.bias != nullptr) {
    CUTE_UNROLL
    for (int cc = 0; cc < kCols; ++cc) {
      const int key = idx[get<1>(cS(0, cc))];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int row = row0 + get<0>(cS(r, 0));
        if (row < p.q_len && key >= 0) {
          const float bv = load_bias(p.bias, bias_base + int64_t(row) * p.bias_row_stride +
                                                 int64_t(key) * p.bias_col_stride, p.bias_dtype);
          s(r, cc) = add_bias(s(r, cc), bv);
        }
      }
    }
  }
  const int row_lim = p.q_len - row0;
  const int causal_off = p.kv_len - p.q_len;
  // A chunk uniform for the CTA (chunk_keys_uniform) whose rows are all query rows: the row's word alone decides,
  // shifted once to the thread's first column so that each element tests a constant bit. Only a unit's last chunks
  // and the last query tile take the per-element tests below.
  if (row_lim >= kKeyListBlockM && chunk_keys_uniform(idx[kKeyListChunk - 1], p, row0)) {
    const int col0 = get<1>(cS(0, 0));
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const uint64_t word = (row_bits[r] & key_keep) >> col0;
      CUTE_UNROLL
      for (int cc = 0; cc < kCols; ++cc) {
        const int bit = get<1>(cS(0, cc)) - col0;  // a constant: the thread's columns differ by static offsets
        s(r, cc) = ((word >> bit) & 1u) ? s(r, cc) : -INFINITY;
      }
    }
    return;
  }
  CUTE_UNROLL
  for (int cc = 0; cc < kCols; ++cc) {
    const int cl = get<1>(cS(0, cc));
    const int key = idx[cl];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int rl = get<0>(cS(r, 0));
      const bool keep = rl < row_lim && key >= 0 && (((row_bits[r] & key_keep) >> cl) & 1u) &&
                        (!p.is_causal || key <= row0 + rl + causal_off);
      s(r, cc) = keep ? s(r, cc) : -INFINITY;
    }
  }
}

template <class Kt>
__global__ void __launch_bounds__(Kt::kNThreads, Kt::kMinBlocks)
    flash_fwd_key_list_kernel(const __grid_constant__ FwdParams p) {
  using Elem = typename Kt::Elem;
  constexpr int kBlockM = Kt::kBlockM;
  constexpr int kChunk = Kt::kBlockN;
  constexpr int kD = Kt::kHeadDim;
  constexpr int kThreads = Kt::kNThreads;
  static_assert(kBlockM == kKeyListBlockM && kChunk == kKeyListChunk, "key-list units must match the tiles");
  // Gathered K/V copy: 16-byte pieces, kPieces per row; copy i of a thread is piece (tid + i * kThreads).
  constexpr int kPieces = kD / 8;
  static_assert((kChunk * kPieces) % kThreads == 0, "gather split");
  constexpr int kRowsPerThread = kChunk * kPieces / kThreads;

  extern __shared__ __align__(128) char smem[];

  // Query heads fastest: the CTAs of one query tile and GQA group run together and share K/V rows in L2.
  const int h = blockIdx.x;
  const int m_block = gridDim.y - 1 - blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  const int row0 = m_block * kBlockM;
  const int q_len = p.q_len, kv_len = p.kv_len;

  const KeyListWalk walk = key_list_walk<kBlockM, kChunk, kThreads>(p, b, h, m_block);
  const bool dense = walk.dense;
  const int n_chunks = walk.n_chunks;
  // Dense units read the mask rows of this (batch, head) directly.
  const DenseMaskRows dense_mask = dense_mask_rows(p, b, h, dense);

  const HeadOperands<Elem> head = head_operands<Elem>(p, b, h);

  Tensor gQ = make_tensor(make_gmem_ptr(head.q + int64_t(row0) * p.q_row_stride),
                          Shape<Int<kBlockM>, Int<kD>>{}, make_stride(p.q_row_stride, _1{}));
  Tensor gO = make_tensor(make_gmem_ptr(head.out + int64_t(row0) * p.o_row_stride),
                          Shape<Int<kBlockM>, Int<kD>>{}, make_stride(p.o_row_stride, _1{}));

  Elem* smem_q = reinterpret_cast<Elem*>(smem);
  Elem* smem_k = smem_q + kBlockM * kD;
  Elem* smem_v = smem_k + kChunk * kD;
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Kt::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Kt::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Kt::SmemLayoutVt{});
  // Key indices and log2-scaled per-key bias of the current and next chunk (the tile kernel's mask area).
  int32_t* smem_idx = reinterpret_cast<int32_t*>(smem + Kt::kSmemQKVBytes);  // [2][kChunk]
  float* smem_kbias = reinterpret_cast<float*>(smem_idx + 2 * kChunk);         // [2][kChunk]

  typename Kt::GmemTiledCopy gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gthr.partition_S(gQ);
  Tensor tQsQ = gthr.partition_D(sQ);
  Tensor tQcQ = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));

  typename Kt::TiledMma mma;
  auto tmma = mma.get_thread_slice(tid);
  Tensor rQ = tmma.partition_fragment_A(sQ);
  Tensor rK = tmma.partition_fragment_B(sK);
  Tensor rVt = tmma.partition_fragment_B(sVt);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_o);

  auto cpQ = make_tiled_copy_A(typename Kt::SmemCopyAtom{}, mma);
  auto cpQ_t = cpQ.get_thread_slice(tid);
  Tensor tSsQ = cpQ_t.partition_S(sQ);
  auto cpK = make_tiled_copy_B(typename Kt::SmemCopyAtom{}, mma);
  auto cpK_t = cpK.get_thread_slice(tid);
  Tensor tSsK = cpK_t.partition_S(sK);
  auto cpV = make_tiled_copy_B(typename Kt::SmemCopyAtomT{}, mma);
  auto cpV_t = cpV.get_thread_slice(tid);
  Tensor tOsVt = cpV_t.partition_S(sVt);

  Tensor tScS = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kChunk>>{}));
  Tensor cS = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(cS))::value;

  float row_max[kRows], row_sum[kRows];
  start_softmax_rows(row_max, row_sum);

  const bool has_bias = p.bias != nullptr;
  const int64_t bias_base = has_bias ? b * p.bias_batch_stride + (h / p.bias_hdiv) * p.bias_head_stride : 0;
  const bool bias_per_key = has_bias && p.bias_row_stride == 0;

  // Chunk-relative row and 16-byte piece of this thread's copy i.
  auto gather_row = [&](int i) { return (tid + i * kThreads) / kPieces; };
  auto gather_piece = [&](int i) { return (tid + i * kThreads) % kPieces; };
  const auto sk_layout = typename Kt::SmemLayoutKV{};

  auto key_at = [&](int c, int j) { return walk.key_at(c, j, kChunk); };
  auto gather = [&](const Elem* src_base, int64_t row_stride, Elem* dst_base, const int (&rows)[kRowsPerThread]) {
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int piece = gather_piece(i);
      Elem* dst = dst_base + sk_layout(gather_row(i), piece * 8);
      if (rows[i] >= 0) {
        copy_piece(src_base + int64_t(rows[i]) * row_stride + piece * 8, dst);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);  // finite zeros: P is 0 there
      }
    }
  };
  // Chunk-wide tables (threads < kChunk, one chunk position each): key index and per-key bias.
  auto load_key_bias = [&](int key) -> float {
    if (!bias_per_key || key < 0) return 0.f;
    return load_bias(p.bias, bias_base + int64_t(key) * p.bias_col_stride, p.bias_dtype);
  };
  // Whether this thread's gathered V pieces hold an inf or NaN (after the wait: its own copies are visible to it).
  auto own_v_nonfinite = [&]() {
    uint32_t bits = 0;
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      bits |= piece_nonfinite_bits<Elem>(smem_v + sk_layout(gather_row(i), gather_piece(i) * 8));
    }
    return (bits & kNonfiniteBits) != 0;
  };
  // Chunk columns whose V holds an inf or NaN, double-buffered by chunk parity (see the tile kernel).
  __shared__ unsigned long long bad_v_keys[2];
  if (tid == 0) bad_v_keys[0] = bad_v_keys[1] = 0ull;
  __shared__ uint64_t key_keep[2];  // per-key bias tables' keep words (stage_chunk_keep_word)
  Tensor tOcO = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cO = make_tensor(tOcO.data(), rowcol_layout(tOcO.layout()));
  auto stage_tables = [&](int buf, int key, float key_bias) {
    stage_chunk_tables<kChunk>(smem_idx, smem_kbias, buf, tid, key, key_bias);
    if (bias_per_key) stage_chunk_keep_word<kChunk>(key_keep, buf, tid, key_bias);
  };


  // Prologue: Q, K(0) and the tables of chunk 0.
  copy_rows(gmem_copy, tQgQ, tQsQ, tQcQ, q_len - row0);
  int next_rows[kRowsPerThread];
  int next_key = -1;
  float next_key_bias = 0.f;
  if (n_chunks > 0) {
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) next_rows[i] = key_at(0, gather_row(i));
    gather(head.k, p.k_row_stride, smem_k, next_rows);
    const int key0 = tid < kChunk ? key_at(0, tid) : -1;
    stage_tables(0, key0, load_key_bias(key0));
  }
  cute::cp_async_fence();

  for (int c = 0; c < n_chunks; ++c) {
    const int buf = c & 1;
    int cur_rows[kRowsPerThread];
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) cur_rows[i] = next_rows[i];

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kChunk>>{});
    clear(acc_s);
    cute::cp_async_wait<0>();
    __syncthreads();  // K(c) and the chunk tables landed
    gather(head.v, p.v_row_stride, smem_v, cur_rows);
    cute::cp_async_fence();

    // Loads whose latency the Q K^T product hides: the next chunk's indices and this chunk's mask words.
    const bool has_next = c + 1 < n_chunks;
    if (has_next) {
      CUTE_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) next_rows[i] = key_at(c + 1, gather_row(i));
      if (tid < kChunk) next_key = key_at(c + 1, tid);
    }
    uint64_t row_bits[kRows];
    uint4 row_bytes[kRows];  // dense unit: this lane's 16 mask bytes of each row, packed after the product
    if (dense) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int row = row0 + get<0>(cS(r, 0));
        row_bytes[r] = row_bytes_global(row < q_len ? dense_mask.rows + int64_t(row) * p.mask_row_stride : nullptr,
                                        c * kChunk, kv_len, dense_mask.vec);
      }
    } else {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int rl = get<0>(cS(r, 0));
        row_bits[r] = walk.word(c, rl);
      }
    }

    gemm_ss(acc_s, rQ, rK, tSsQ, tSsK, mma, cpQ, cpQ_t, cpK, cpK_t);
    if (dense) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) row_bits[r] = quad_word(pack16(row_bytes[r]));
    }

    cute::cp_async_wait<0>();
    // V(c) landed; every warp is done reading sK. The barrier also ORs each thread's scan of its own V pieces.
    const bool v_bad = __syncthreads_or(own_v_nonfinite());
    if (tid == 0) bad_v_keys[buf ^ 1] = 0ull;  // last read by chunk c - 1, before this iteration's first barrier
    if (has_next) {
      gather(head.k, p.k_row_stride, smem_k, next_rows);
      cute::cp_async_fence();
      next_key_bias = load_key_bias(next_key);  // consumed after P V, which hides its latency
    }

    const int32_t* idx = smem_idx + buf * kChunk;
    Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    key_list_logits(acc_s, s, cS, p, idx, bias_per_key ? smem_kbias + buf * kChunk : nullptr,
                    bias_per_key ? key_keep[buf] : ~uint64_t{0}, bias_base, row_bits, row0);

    if (v_bad) {  // rare (CTA-uniform): V of this chunk holds an inf or NaN; see correct_nonfinite_v
      uint64_t kept[kRows];
      kept_words(acc_s, cS, kept);
      CUTE_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) {
        if (zero_nonfinite_piece<Elem>(smem_v + sk_layout(gather_row(i), gather_piece(i) * 8))) {
          atomicOr(&bad_v_keys[buf], 1ull << gather_row(i));
        }
      }
      __syncthreads();  // V cleaned, the bad columns known
      online_softmax_step(acc_s, acc_o, row_max, row_sum);
      correct_nonfinite_v<Elem>(acc_o, cO, kept, bad_v_keys[buf],
                                [&](int j) { return head.v + int64_t(idx[j]) * p.v_row_stride; });
    } else {
      online_softmax_step(acc_s, acc_o, row_max, row_sum);
    }
    accumulate_pv<Elem>(acc_s, acc_o, rVt, tOsVt, mma, cpV, cpV_t);
    // Chunk c + 1's tables; their buffer was last read by chunk c - 1, before this iteration's first barrier.
    if (has_next) stage_tables(buf ^ 1, next_key, next_key_bias);
  }
  cute::cp_async_wait<0>();

  float* lse_ptr = p.lse + (int64_t(b) * p.heads + h) * p.q_len;
  store_output<Kt>(acc_o, row_max, row_sum, cS, sQ, gO, mma, lse_ptr, row0, q_len);
}

}  // namespace fwd
}  // namespace dmattn
