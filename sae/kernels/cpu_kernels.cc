// CPU kernels for the sparse parts of a TopK-family step, as XLA FFI custom calls (sae/kernels/__init__.py).
//
// XLA's CPU backend runs top-k, gathers and scatters on one thread, and its top-k sorts; these kernels
// split rows (or latents) over XLA's intra-op thread pool. Shapes: B tokens, N latents, D = d_in, k kept.
//   sae_top_k:       z [B,N], bias [N] -> values, indices [B,k]: top-k of (ReLU)(z + bias) per row,
//                    descending, ties to the lower index (as lax.top_k)
//   sae_gather_sum:  vals [B,k], w [N,D], idx [B,k] -> [B,D]   out[b] = Σ_j vals[b,j] w[idx[b,j]]
//   sae_gather_sum_grad: vals, w, idx, g [B,D] -> grad_vals [B,k] (g[b] · w[idx[b,j]]), grad_w [N,D]
//   sae_scatter_columns: vals [B,k], rows [B,D], idx [B,k] -> [D,N]:
//                    out[:, n] = Σ_{b,j: idx[b,j] = n} vals[b,j] rows[b]   (latent-major, no atomics)
// Indices outside [0, N) contribute nothing (XLA's scatter drops them too).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

struct Work {
  std::function<void(int64_t)> body;  // runs one chunk; called only while the caller waits
  int64_t n_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void run_chunks(Work& work) {
  for (int64_t c; (c = work.next.fetch_add(1)) < work.n_chunks;) {
    work.body(c);
    work.done.fetch_add(1, std::memory_order_release);
  }
}

// body(begin, end) over [0, n) in chunks of at least `grain`, on the pool's threads and the caller's.
// The caller claims chunks too and waits only for chunks others claimed, so a task that starts late
// (its pool thread busy elsewhere) finds nothing to do: no deadlock when several kernels run at once.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t grain, F body) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(4 * threads, n / std::max<int64_t>(1, grain)));
  int64_t size = (n + n_chunks - 1) / n_chunks;
  n_chunks = (n + size - 1) / size;
  if (n_chunks <= 1) {
    body(int64_t{0}, n);
    return;
  }
  auto work = std::make_shared<Work>();
  work->n_chunks = n_chunks;
  work->body = [&body, size, n](int64_t c) { body(c * size, std::min(n, (c + 1) * size)); };
  for (int64_t t = 0; t < std::min(threads, n_chunks - 1); ++t) {
    pool.Schedule([work] { run_chunks(*work); });
  }
  run_chunks(*work);
  while (work->done.load(std::memory_order_acquire) < n_chunks) std::this_thread::yield();
}

// Rank of an (activation, latent) pair: larger value first, then the lower index (lax.top_k's order).
struct Entry {
  float value;
  int32_t index;
};
struct Better {
  bool operator()(const Entry& a, const Entry& b) const {
    return a.value > b.value || (a.value == b.value && a.index < b.index);
  }
};

// (ReLU)(z + bias), with NaN ranked as −∞ so that the orderings below stay strict weak orders.
template <bool kRelu>
inline float activation(float z, float bias) {
  float v = z + bias;
  v = v > -std::numeric_limits<float>::infinity() ? v : -std::numeric_limits<float>::infinity();
  return kRelu ? std::max(v, 0.0f) : v;
}

#if defined(__AVX512F__)
// The mask of lanes [0, count) of a 16-lane vector (count clamped to [0, 16]).
inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16{0xFFFF} : count <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << count) - 1);
}

struct Counts16 {
  __m512i above, equal;
};

// For the 16 entries m[c0, c0 + 16) at once (lanes past s unused): how many of m[0, s) are above
// each, and how many equal it (with kBefore, only those at a lower position). O(s) vector compares.
template <bool kBefore>
inline Counts16 above_and_equal(const float* m, int64_t s, int64_t c0) {
  const __m512 vc = _mm512_maskz_loadu_ps(first_lanes(s - c0), m + c0);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i above = _mm512_setzero_si512(), equal = _mm512_setzero_si512();
  for (int64_t d = 0; d < s; ++d) {
    const __m512 vd = _mm512_set1_ps(m[d]);
    above = _mm512_mask_add_epi32(above, _mm512_cmp_ps_mask(vd, vc, _CMP_GT_OQ), above, one);
    __mmask16 eq = _mm512_cmp_ps_mask(vd, vc, _CMP_EQ_OQ);
    if (kBefore) eq &= static_cast<__mmask16>(~first_lanes(d - c0 + 1));  // lanes c0 + l with l > d − c0
    equal = _mm512_mask_add_epi32(equal, eq, equal, one);
  }
  return {above, equal};
}
#else
// Of m[0, s): the entries above m[c], and those equal to it (with kBefore, only at positions < c).
template <bool kBefore>
inline std::pair<int32_t, int32_t> above_and_equal(const float* m, int64_t s, int64_t c) {
  int32_t above = 0, equal = 0;
  const float x = m[c];
#pragma omp simd reduction(+ : above, equal)
  for (int64_t d = 0; d < s; ++d) {
    above += m[d] > x;
    equal += (m[d] == x) & (!kBefore || d < c);
  }
  return {above, equal};
}
#endif

// The k-th largest of m[0, s). Small s: the entry with fewer than k above it and at least k at or
// above it (counted, no data-dependent branches); larger s: nth_element, which reorders m.
float kth_largest(float* m, int64_t s, int64_t k) {
  if (s <= 128) {
#if defined(__AVX512F__)
    const __m512i vk = _mm512_set1_epi32(static_cast<int32_t>(k));
    for (int64_t c0 = 0; c0 < s; c0 += 16) {
      const auto [above, equal] = above_and_equal<false>(m, s, c0);
      const __mmask16 hit = first_lanes(s - c0) & _mm512_cmplt_epi32_mask(above, vk) &
                            _mm512_cmpge_epi32_mask(_mm512_add_epi32(above, equal), vk);
      if (hit) return m[c0 + __builtin_ctz(hit)];
    }
#else
    for (int64_t c = 0; c < s; ++c) {
      const auto [above, equal] = above_and_equal<false>(m, s, c);
      if (above < k && above + equal >= k) return m[c];
    }
#endif
  }
  std::nth_element(m, m + k - 1, m + s, std::greater<float>());
  return m[k - 1];
}

// The k best of `count` (value, index) pairs held in index order, sorted into values/indices [k]:
// each pair's rank is the pairs above it plus the equal ones before it. value and index have 16
// readable slots past count.
void rank_into(const float* value, const int32_t* index, int64_t count, int64_t k, float* values, int32_t* indices) {
#if defined(__AVX512F__)
  const __m512i vk = _mm512_set1_epi32(static_cast<int32_t>(k));
  for (int64_t c0 = 0; c0 < count; c0 += 16) {
    const auto [above, equal_before] = above_and_equal<true>(value, count, c0);
    const __m512i rank = _mm512_add_epi32(above, equal_before);
    const __mmask16 keep = first_lanes(count - c0) & _mm512_cmplt_epi32_mask(rank, vk);
    _mm512_mask_i32scatter_ps(values, keep, rank, _mm512_loadu_ps(value + c0), 4);
    _mm512_mask_i32scatter_epi32(indices, keep, rank, _mm512_loadu_si512(index + c0), 4);
  }
#else
  for (int64_t c = 0; c < count; ++c) {
    const auto [above, equal_before] = above_and_equal<true>(value, count, c);
    const int64_t rank = above + equal_before;
    if (rank < k) {
      values[rank] = value[c];
      indices[rank] = index[c];
    }
  }
#endif
}

// A row's entries above τ, and the first k equal to it, in index order (pass 2 of top_k_row).
struct Candidates {
  std::vector<float> value;    // entries > τ: [0, above)
  std::vector<int32_t> index;  // their latents, ascending
  std::vector<int32_t> tie;    // latents of the first min(k, #ties) entries == τ, ascending
  int64_t above = 0, ties = 0;

  Candidates(int64_t n, int64_t k) : value(n + 16), index(n + 16), tie(k + 16) {}
};

constexpr int64_t kLanes = 16;

// No branch per entry: each entry is stored and the count advances past those that qualify. With
// AVX-512 a vector compress stores 16 lanes' qualifiers at once, and a group of 64 entries without
// one is skipped after a single test.
template <bool kRelu>
void collect(const float* __restrict z, const float* __restrict bias, int64_t n, int64_t k, float tau,
             Candidates& out) {
  int64_t above = 0, ties = 0, i = 0;
  float* value = out.value.data();
  int32_t* index = out.index.data();
  int32_t* tie = out.tie.data();
#if defined(__AVX512F__)
  const __m512 vtau = _mm512_set1_ps(tau), floor = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  auto load = [&](int64_t at) {  // max(a, b) returns b where a is NaN: NaN becomes −∞, as in `activation`
    __m512 v = _mm512_max_ps(_mm512_add_ps(_mm512_loadu_ps(z + at), _mm512_loadu_ps(bias + at)), floor);
    return kRelu ? _mm512_max_ps(v, _mm512_setzero_ps()) : v;
  };
  constexpr int64_t kGroup = 4 * kLanes;  // most groups of 64 hold no candidate: one test skips them
  for (; i + kGroup <= n; i += kGroup) {
    const __m512 v0 = load(i), v1 = load(i + kLanes), v2 = load(i + 2 * kLanes), v3 = load(i + 3 * kLanes);
    const __m512 top = _mm512_max_ps(_mm512_max_ps(v0, v1), _mm512_max_ps(v2, v3));
    if (!_mm512_cmp_ps_mask(top, vtau, _CMP_GE_OQ)) continue;
    for (const auto& [v, at0] : {std::pair{v0, i}, {v1, i + kLanes}, {v2, i + 2 * kLanes}, {v3, i + 3 * kLanes}}) {
      const __mmask16 gt = _mm512_cmp_ps_mask(v, vtau, _CMP_GT_OQ), eq = _mm512_cmp_ps_mask(v, vtau, _CMP_EQ_OQ);
      const __m512i at = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(at0)));
      _mm512_storeu_ps(value + above, _mm512_maskz_compress_ps(gt, v));
      _mm512_storeu_si512(index + above, _mm512_maskz_compress_epi32(gt, at));
      above += __builtin_popcount(gt);
      if (eq) {  // rare unless τ is ReLU's 0
        _mm512_storeu_si512(tie + ties, _mm512_maskz_compress_epi32(eq, at));  // tie has k + 16 slots
        ties = std::min<int64_t>(k, ties + __builtin_popcount(eq));
      }
    }
  }
#endif
  for (; i < n; ++i) {
    const float v = activation<kRelu>(z[i], bias[i]);
    value[above] = v;
    index[above] = static_cast<int32_t>(i);
    above += v > tau;
    tie[ties] = static_cast<int32_t>(i);
    ties = std::min<int64_t>(k, ties + (v == tau));
  }
  out.above = above;
  out.ties = ties;
}

// One row's top-k of a = (ReLU)(z + bias), exactly, in two passes over the row.
// Strided blocks: block c holds entries {c, c + S, c + 2S, ...} (S = n / groups), so the block maxima
// are an elementwise max of `groups` contiguous slices (vectorised). τ, the k-th largest maximum, has
// at least k entries ≥ τ (one in each of the k best blocks), so every top-k entry is ≥ τ: the second
// pass collects the entries > τ and the first k equal to τ, and only those are ranked. Ties (ReLU's
// zeros, −∞) rank by index, as in lax.top_k.
template <bool kRelu>
void top_k_row(const float* __restrict z, const float* __restrict bias, int64_t n, int64_t k, int64_t groups,
               float* values, int32_t* indices, float* __restrict maxima, Candidates& cand) {
  const int64_t stride = n / groups;
#pragma omp simd
  for (int64_t c = 0; c < stride; ++c) maxima[c] = activation<kRelu>(z[c], bias[c]);
  for (int64_t t = 1; t < groups; ++t) {
    const float* __restrict zt = z + t * stride;
    const float* __restrict bt = bias + t * stride;
#pragma omp simd
    for (int64_t c = 0; c < stride; ++c) {
      const float v = activation<kRelu>(zt[c], bt[c]);
      maxima[c] = v > maxima[c] ? v : maxima[c];
    }
  }
  const float tau = kth_largest(maxima, stride, k);
  collect<kRelu>(z, bias, n, k, tau, cand);
  const float* value = cand.value.data();
  const int32_t* index = cand.index.data();
  const int64_t above = cand.above;
  if (above <= 128) {
    rank_into(value, index, above, k, values, indices);
  } else {  // (fewer than k of them when k > 128: all are ranked)
    const int64_t m = std::min(k, above);
    std::vector<Entry> entries(above);
    for (int64_t c = 0; c < above; ++c) entries[c] = {value[c], index[c]};
    std::nth_element(entries.begin(), entries.begin() + m - 1, entries.end(), Better());
    std::sort(entries.begin(), entries.begin() + m, Better());
    for (int64_t j = 0; j < m; ++j) {
      values[j] = entries[j].value;
      indices[j] = entries[j].index;
    }
  }
  for (int64_t j = above; j < k; ++j) {  // fewer than k above τ: the first ties fill the rest
    values[j] = tau;
    indices[j] = cand.tie[j - above];
  }
}

// Strided groups per block: the most that leave at least 2k blocks (1: τ is the k-th largest entry).
int64_t block_groups(int64_t n, int64_t k) {
  for (int64_t groups : {128, 64, 32, 16, 8, 4, 2})
    if (n % groups == 0 && n / groups >= 2 * k) return groups;
  return 1;
}

template <bool kRelu>
void top_k_rows(const float* z, const float* bias, int64_t begin, int64_t end, int64_t n, int64_t k,
                float* values, int32_t* indices) {
  const int64_t groups = block_groups(n, k);
  std::vector<float> maxima(n / groups);
  Candidates candidates(n, k);
  for (int64_t r = begin; r < end; ++r)
    top_k_row<kRelu>(z + r * n, bias, n, k, groups, values + r * k, indices + r * k, maxima.data(), candidates);
}

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> z, ffi::Buffer<ffi::F32, 1> bias,
                ffi::ResultBuffer<ffi::F32, 2> values, ffi::ResultBuffer<ffi::S32, 2> indices, bool relu) {
  const int64_t rows = z.dimensions()[0], n = z.dimensions()[1], k = values->dimensions()[1];
  if (k < 1 || k > n || bias.dimensions()[0] != n) return ffi::Error::InvalidArgument("sae_top_k: shapes");
  const float* zp = z.typed_data();
  const float* bp = bias.typed_data();
  float* vp = values->typed_data();
  int32_t* ip = indices->typed_data();
  parallel_for(pool, rows, 16, [&](int64_t begin, int64_t end) {
    if (relu) {
      top_k_rows<true>(zp, bp, begin, end, n, k, vp, ip);
    } else {
      top_k_rows<false>(zp, bp, begin, end, n, k, vp, ip);
    }
  });
  return ffi::Error::Success();
}

ffi::Error GatherSum(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> vals, ffi::Buffer<ffi::F32, 2> w,
                     ffi::Buffer<ffi::S32, 2> idx, ffi::ResultBuffer<ffi::F32, 2> out) {
  const int64_t rows = vals.dimensions()[0], k = vals.dimensions()[1];
  const int64_t n = w.dimensions()[0], d = w.dimensions()[1];
  const float* vp = vals.typed_data();
  const float* wp = w.typed_data();
  const int32_t* ip = idx.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, rows, 32, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* o = op + r * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t i = ip[r * k + j];
        if (i < 0 || i >= n) continue;
        const float a = vp[r * k + j];
        const float* row = wp + i * d;
        for (int64_t c = 0; c < d; ++c) o[c] += a * row[c];
      }
    }
  });
  return ffi::Error::Success();
}

// The (token, slot) pairs grouped by latent (a counting sort of idx): pairs of latent i are
// position[start[i] .. start[i+1]), each a flat index b·k + j into idx.
struct ByLatent {
  std::vector<int64_t> start;
  std::vector<int32_t> position;

  ByLatent(const int32_t* idx, int64_t pairs, int64_t n) : start(n + 1, 0) {
    for (int64_t e = 0; e < pairs; ++e)
      if (idx[e] >= 0 && idx[e] < n) ++start[idx[e] + 1];
    for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
    position.resize(start[n]);
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < pairs; ++e)
      if (idx[e] >= 0 && idx[e] < n) position[fill[idx[e]]++] = static_cast<int32_t>(e);
  }
};

// Backward of gather_sum for upstream g [B,D]: grad_vals[b,j] = g[b] · w[idx[b,j]] and
// grad_w[i] = Σ_{b,j: idx[b,j] = i} vals[b,j] g[b], in one latent-major pass (each g[b] read once
// for both, no atomics).
ffi::Error GatherSumGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> vals, ffi::Buffer<ffi::F32, 2> w,
                         ffi::Buffer<ffi::S32, 2> idx, ffi::Buffer<ffi::F32, 2> g,
                         ffi::ResultBuffer<ffi::F32, 2> grad_vals, ffi::ResultBuffer<ffi::F32, 2> grad_w) {
  const int64_t rows = idx.dimensions()[0], k = idx.dimensions()[1];
  const int64_t n = w.dimensions()[0], d = w.dimensions()[1];
  const float* vp = vals.typed_data();
  const float* wp = w.typed_data();
  const float* gp = g.typed_data();
  float* gv = grad_vals->typed_data();
  float* gw = grad_w->typed_data();
  std::fill(gv, gv + rows * k, 0.0f);  // pairs with an out-of-range index
  const ByLatent by_latent(idx.typed_data(), rows * k, n);
  parallel_for(pool, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* wi = wp + i * d;
      float* acc = gw + i * d;
      std::fill(acc, acc + d, 0.0f);
      for (int64_t e = by_latent.start[i]; e < by_latent.start[i + 1]; ++e) {
        const int64_t pos = by_latent.position[e];
        const float* gb = gp + (pos / k) * d;
        const float s = vp[pos];
        float dot = 0.0f;
        for (int64_t c = 0; c < d; ++c) {
          dot += gb[c] * wi[c];
          acc[c] += s * gb[c];
        }
        gv[pos] = dot;
      }
    }
  });
  return ffi::Error::Success();
}

// out[:, i] = Σ_{b,j: idx[b,j] = i} vals[b,j] rows[b]: the encoder's gradient for the k selected
// columns per token, written in W_enc's own [D, N] layout.
ffi::Error ScatterColumns(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> vals, ffi::Buffer<ffi::F32, 2> rows_in,
                          ffi::Buffer<ffi::S32, 2> idx, ffi::ResultBuffer<ffi::F32, 2> out) {
  const int64_t rows = vals.dimensions()[0], k = vals.dimensions()[1], d = rows_in.dimensions()[1];
  const int64_t n = out->dimensions()[1];
  const float* vp = vals.typed_data();
  const float* xp = rows_in.typed_data();
  float* op = out->typed_data();
  const ByLatent by_latent(idx.typed_data(), rows * k, n);
  constexpr int64_t kBlock = 16;  // latents per block: a transposed write is kBlock floats contiguous
  parallel_for(pool, (n + kBlock - 1) / kBlock, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kBlock * d);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlock, m = std::min(kBlock, n - n0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t l = 0; l < m; ++l) {
        float* a = acc.data() + l * d;
        for (int64_t e = by_latent.start[n0 + l]; e < by_latent.start[n0 + l + 1]; ++e) {
          const int64_t pos = by_latent.position[e];
          const float s = vp[pos];
          const float* x = xp + (pos / k) * d;
          for (int64_t c = 0; c < d; ++c) a[c] += s * x[c];
        }
      }
      for (int64_t c = 0; c < d; ++c)
        for (int64_t l = 0; l < m; ++l) op[c * n + n0 + l] = acc[l * d + c];
    }
  });
  return ffi::Error::Success();
}

// Buffer types as aliases: template commas would split the handler macros' arguments.
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using F32Vector = ffi::Buffer<ffi::F32, 1>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Vector>()
                                  .Ret<F32Matrix>()
                                  .Ret<S32Matrix>()
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeGatherSum, GatherSum,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Arg<S32Matrix>()
                                  .Ret<F32Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeGatherSumGrad, GatherSumGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Arg<S32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>()
                                  .Ret<F32Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeScatterColumns, ScatterColumns,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Arg<S32Matrix>()
                                  .Ret<F32Matrix>());
