// Facts about the kernels that the code building their calls needs: tile sizes, instantiated head dims, key-list
// geometry, capacities and workspace rules. CUDA-free, so every build (CPU-only too) exports it through the
// extension (csrc/module.cc: kernel_facts) and jax_dmattn reads it there instead of restating it.
#pragma once
#include <cstdint>

namespace dmattn {

// Tile sizes of every forward instantiation and of the forward's mask tile-class map.
constexpr int kFwdBlockM = 128;
constexpr int kFwdBlockN = 64;
// Tile sizes of every key-tile backward instantiation and of the backward's own tile-class map.
constexpr int kBwdBlockM = 64;
constexpr int kBwdBlockN = 64;

// Head dims the CUDA kernels are instantiated for; a call with another D up to the largest is zero-padded to the
// next one. The one list: the dispatch switches expand it, and cmake/Cuda.cmake reads this line to generate one
// instantiation file per (kernel, head dim).
#define DMATTN_FOR_EACH_CUDA_HEAD_DIM(X) X(32) X(64) X(96) X(128) X(192) X(256)
#define DMATTN_HEAD_DIM_ITEM(D) D,
constexpr int kCudaHeadDims[] = {DMATTN_FOR_EACH_CUDA_HEAD_DIM(DMATTN_HEAD_DIM_ITEM)};
#undef DMATTN_HEAD_DIM_ITEM

// Head dims the Hopper (sm_90a) forward is instantiated for (csrc/cuda/sm90/); the others run the sm80 kernels on
// every device. cmake/Cuda.cmake reads this line too.
#define DMATTN_FOR_EACH_SM90_HEAD_DIM(X) X(64) X(128) X(256)
#define DMATTN_HEAD_DIM_ITEM(D) D,
constexpr int kSm90FwdHeadDims[] = {DMATTN_FOR_EACH_SM90_HEAD_DIM(DMATTN_HEAD_DIM_ITEM)};
#undef DMATTN_HEAD_DIM_ITEM

// Head dims the Hopper (sm_90a) backward is instantiated for: its two consumer warpgroups keep dK and dV of 64 keys
// each in registers (2 x 64 x D fp32), which D = 256 does not fit. cmake/Cuda.cmake reads this line too.
#define DMATTN_FOR_EACH_SM90_BWD_HEAD_DIM(X) X(64) X(128)
#define DMATTN_HEAD_DIM_ITEM(D) D,
constexpr int kSm90BwdHeadDims[] = {DMATTN_FOR_EACH_SM90_BWD_HEAD_DIM(DMATTN_HEAD_DIM_ITEM)};
#undef DMATTN_HEAD_DIM_ITEM

// Whether `head_dim` is in one of the lists above (the dispatch code's "is this built?" question).
template <int N>
constexpr bool has_head_dim(const int (&dims)[N], int head_dim) {
  for (int d : dims)
    if (d == head_dim) return true;
  return false;
}

// Mask tile classes (both tile-class maps, CPU and CUDA).
enum TileClass : uint8_t { kTileEmpty = 0, kTilePartial = 1, kTileFull = 2 };

// Key lists (csrc/cuda/key_lists.h): query rows per unit, keys per bit word, the count marking a dense unit,
// and the default cap on the keys listed per unit (keeps the lists' workspace O(B * H * Lq)).
constexpr int kKeyListBlockM = kFwdBlockM;
constexpr int kKeyListChunk = 64;
constexpr int32_t kKeyListDense = -1;
constexpr int64_t kKeyListMaxKeys = 4096;
// On Hopper, the fewest keys a unit's rows must see before its list may go to the forward's key tiles
// (csrc/cuda/key_lists.h: key_list_unit_on_tiles).
constexpr int64_t kKeyListTileMinVisible = 1024;
// Most query rows the key-list forward for few rows (csrc/cuda/flash_fwd_key_list_rows.h) takes; decoding steps
// split their shared lists into more parts when it serves them (jax_dmattn/_decode.py).
constexpr int kKeyListRowsMax = 8;

// Largest k of the causal TopKMask pre-pass (csrc/cuda/topk_key_lists.h keeps topk(prefix) in shared memory):
// it fits every supported GPU's shared memory per block (sm_80: 163 KB); the handler checks the device it runs on.
constexpr int64_t kTopKListsMaxK = 16384;

// The TopKMask pre-pass under row bounds (csrc/cuda/topk_bounded_key_lists.h): the most keys a group's rows' lo and
// hi may each spread over (a group's candidates are the k best of its common range and at most twice this many
// keys at its ends), and the largest k, whose candidates and union fit an A100's shared memory per block.
constexpr int kTopKBoundedGroupSpread = kKeyListBlockM;
constexpr int64_t kTopKBoundedListsMaxK = 8192 - 2 * kTopKBoundedGroupSpread;

// Whether that pre-pass serves a call by the shared-list select over one key range per unit: one query row without
// segment ids (a decoding step over a ragged batch), whose list is the top k of its row's range.
constexpr bool topk_bounded_one_range(int64_t q_len, bool key_segments) { return q_len == 1 && !key_segments; }

// The keys a unit's list of that pre-pass may have to hold: k on the one-range route; else k plus the group's two
// ends without segment ids, and twice that with them (packed sequences: a unit meets at most two long segments; a
// unit that outgrows it is marked dense). Rounded up to whole chunks, and at most the key length's chunks.
constexpr int64_t topk_bounded_list_capacity(int64_t k, int64_t q_len, bool key_segments, int64_t kv_len) {
  const int64_t need = topk_bounded_one_range(q_len, key_segments) ? k
                       : key_segments ? 2 * k + 4 * kTopKBoundedGroupSpread
                                      : k + 2 * kTopKBoundedGroupSpread;
  const int64_t chunks = (need + kKeyListChunk - 1) / kKeyListChunk;
  const int64_t kv_chunks = (kv_len + kKeyListChunk - 1) / kKeyListChunk;
  return (chunks < kv_chunks ? chunks : kv_chunks) * kKeyListChunk;
}

// uint32 words after the int64 dK / dV counts of the deterministic key-list backward (its statistics).
constexpr int kFixedStatsWords = 8;

// The key-list backward adds dK and dV into accumulators of 4 (fp32) or 8 (deterministic: int64 counts) bytes an
// element, 2x or 4x the size of the bf16 / f16 gradients. At long sequences the call works through the kv heads in
// passes instead: a pass covers `accum_kv_heads` kv heads (their query heads' CTAs) with accumulators
// [2, B, Lk, accum_kv_heads, D] and converts them into its heads of dk and dv before the next one starts. One pass
// while the accumulators of all kv heads stay within kKeyListAccumBytes; otherwise the fewest passes that bring
// them within it, as long as a pass keeps kKeyListPassMinCtas CTAs (several waves, so that a pass's tail stays
// small); else the smallest slice with that many CTAs.
constexpr int64_t kKeyListAccumBytes = int64_t(128) << 20;
constexpr int64_t kKeyListPassMinCtas = 1024;

constexpr int64_t key_list_bwd_accum_kv_heads(int64_t batch, int64_t q_len, int64_t heads, int64_t kv_len,
                                              int64_t kv_heads, int64_t head_dim, bool deterministic) {
  const int64_t elem_bytes = deterministic ? 8 : 4;
  const int64_t group = kv_heads > 0 ? heads / kv_heads : 1;
  const int64_t q_tiles = (q_len + 127) / 128;
  int64_t best = kv_heads;
  if (2 * batch * kv_len * kv_heads * head_dim * elem_bytes <= kKeyListAccumBytes) return best;
  for (int64_t hs = kv_heads - 1; hs >= 1; --hs) {  // fewer kv heads per pass: more passes, smaller accumulators
    if (kv_heads % hs != 0) continue;
    if (batch * hs * group * q_tiles < kKeyListPassMinCtas) break;
    best = hs;
    if (2 * batch * kv_len * hs * head_dim * elem_bytes <= kKeyListAccumBytes) break;
  }
  return best;
}

// Query rows per CTA the key-list backward is built with for a head dim: 128 (a whole key-list unit) while the
// dQ accumulator fits the registers (D <= 128), 64 above. D = 128 also has a 64-row build, for devices whose
// shared memory per block (sm_80: 163 KB) cannot hold the 128-row one (181 KB).
constexpr bool key_list_bwd_has_rows(int head_dim, int rows) {
  return rows == 128 ? head_dim <= 128 : (rows == 64 && head_dim >= 128);
}

// Dynamic shared memory of the key-list backward (BwdKeyListTraits::kSmemBytes, static_assert-ed equal there):
// Q, dO [rows, D] + 2 stages of K, V [64, D] + P, dS [rows, 64] (2-byte elements), the dense-unit mask stages
// [2, rows, 64] bytes, bit words [2, rows] u64, keys and bias values [2, 64] 4 B each, dbias bands
// [rows / 16, 64] f32, 4 fixed-point scales.
constexpr int key_list_bwd_smem_bytes(int head_dim, int rows) {
  return (2 * rows * head_dim + 4 * 64 * head_dim + 2 * rows * 64) * 2 + 2 * rows * 64 + 2 * rows * 8 +
         2 * 64 * 4 + 2 * 64 * 4 + (rows / 16) * 64 * 4 + 4 * 4;
}

// Key-tile backward: whether a dbias tile of a bias [Bb, Hb, Mb, Nb] gets several partial sums (a bias broadcast
// over batch, over kv heads, or over query rows with per-query-head heads), so that it is accumulated in fp32
// instead of stored by one flush. The loop order in a CTA (batch, kv head, query tile, query head) decides it.
constexpr bool dbias_tiles_get_several_flushes(const int64_t bias_dims[4], int64_t batch, int64_t heads,
                                               int64_t kv_heads) {
  return (bias_dims[0] == 1 && batch > 1) || (bias_dims[1] == 1 && kv_heads > 1) ||
         (bias_dims[2] == 1 && bias_dims[1] == heads && heads / kv_heads > 1);
}

// Whether the CUDA backward takes the key-list path (docs/cuda_backward.md, "Key-list path"): a mask with a full key
// dim, and a bias (if any) broadcast over query rows, so that its gradient is a column sum of dS. Both modes:
// dk / dv / dbias are added by fp32 atomics (deterministic=False) or int64 fixed-point atomics (deterministic=True).
// The lists of a compact mask stand in for a mask with a full key dim. (The call also needs a build of the head dim
// that fits the device's shared memory: the caller's key_list_rows.)
constexpr bool uses_key_list_path(bool has_mask, int64_t mask_cols, bool has_bias, int64_t bias_rows, int64_t Lk) {
  return has_mask && mask_cols == Lk && (!has_bias || bias_rows == 1);
}

}  // namespace dmattn
