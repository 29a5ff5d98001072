// y (M, N) f32 = x (M, K) f32 @ w (K, N) bfloat16 or float32, for the few rows (M <= 16) of a decode step; and
// the int8 variant y = (x @ q) * scale with per-column scales (N,) f32 (weight-only int8 quantization).
//
// Why: XLA's CPU backend runs these matrix-vector products well below memory bandwidth, and bfloat16 ones at
// ~1.7 GB/s; and it runs small ones on one core, whose L2 cannot hold all of a small depth decoder's layers.
// Decoding is bound by reading the weights once per step, so this kernel streams each thread's column slab of w
// row by row (long contiguous reads), widens bfloat16 to float32 exactly (a 16-bit shift) and accumulates in
// float32 into y held in L1/L2. Work is split over XLA's own intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Task {
  const float* x;
  const void* w;
  const float* scale;  // per-column scales (int8 weights), else nullptr
  float* y;
  int64_t m, k, n, slab, slabs;
  std::atomic<uint64_t> claimed{0};  // bit s: someone runs slab s
  std::atomic<int64_t> finished{0};

  bool claim(int64_t s) { return !(claimed.fetch_or(uint64_t{1} << s) & (uint64_t{1} << s)); }
};

#if defined(__AVX512F__)
inline __m512 widen16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

inline float widen1(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float widen1(float v) { return v; }
inline float widen1(int8_t v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
constexpr int64_t kTile = 256;  // columns per register tile: 16 accumulators of 16 floats
constexpr int64_t kDepth = 128;  // rows of w per pass: a 64-128 KB tile that stays in L2 across the M rows
constexpr int64_t kPrefetchRows = 4;  // one-row products: how many rows ahead to prefetch

// Several rows: each (kDepth x kTile) tile of w is read from memory once and reused from L2 for every row, with
// the row's 256 outputs in registers.
template <typename W>
void tile_rows(const Task& t, const W* w, int64_t j) {
  for (int64_t k0 = 0; k0 < t.k; k0 += kDepth) {
    const int64_t k1 = std::min(t.k, k0 + kDepth);
    for (int64_t r = 0; r < t.m; ++r) {
      float* y = t.y + r * t.n + j;
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_loadu_ps(y + 16 * i);
      for (int64_t kk = k0; kk < k1; ++kk) {
        const __m512 a = _mm512_set1_ps(t.x[r * t.k + kk]);
        const W* row = w + kk * t.n + j;
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(a, widen16(row + 16 * i), acc[i]);
      }
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(y + 16 * i, acc[i]);
    }
  }
}
#endif

template <typename W>
void run_slab(const Task& t, int64_t s) {
  const int64_t n0 = s * t.slab, n1 = std::min(t.n, n0 + t.slab);
  const W* w = static_cast<const W*>(t.w);
  for (int64_t r = 0; r < t.m; ++r) std::fill(t.y + r * t.n + n0, t.y + r * t.n + n1, 0.0f);
  int64_t tiled_end = n0;
#if defined(__AVX512F__)
  if (t.m > 1) {
    for (; tiled_end + kTile <= n1; tiled_end += kTile) tile_rows<W>(t, w, tiled_end);
  }
#endif
  int64_t kk = 0;
#if defined(__AVX512F__)
  if (t.m == 1) {
    // One row: four rows of w per pass over y, so y is loaded and stored a quarter as often (it dominated the
    // traffic for int8 weights) and four read streams are in flight. The rows and columns left over run below.
    const int64_t j_end = tiled_end + (n1 - tiled_end) / 64 * 64;
    for (; kk + 4 <= t.k; kk += 4) {
      const __m512 a0 = _mm512_set1_ps(t.x[kk]), a1 = _mm512_set1_ps(t.x[kk + 1]);
      const __m512 a2 = _mm512_set1_ps(t.x[kk + 2]), a3 = _mm512_set1_ps(t.x[kk + 3]);
      const W* r0 = w + kk * t.n;
      const W* r1 = r0 + t.n;
      const W* r2 = r1 + t.n;
      const W* r3 = r2 + t.n;
      for (int64_t j = tiled_end; j < j_end; j += 64) {
        if (kk + 4 + kPrefetchRows <= t.k)
          for (const W* p : {r0, r1, r2, r3})
            for (size_t b = 0; b < 64 * sizeof(W); b += 64)
              _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchRows * t.n + j) + b, _MM_HINT_T0);
        for (int64_t c = j; c < j + 64; c += 16) {
          __m512 acc = _mm512_loadu_ps(t.y + c);
          acc = _mm512_fmadd_ps(a0, widen16(r0 + c), acc);
          acc = _mm512_fmadd_ps(a1, widen16(r1 + c), acc);
          acc = _mm512_fmadd_ps(a2, widen16(r2 + c), acc);
          acc = _mm512_fmadd_ps(a3, widen16(r3 + c), acc);
          _mm512_storeu_ps(t.y + c, acc);
        }
      }
      for (int64_t j = j_end; j < n1; ++j)
        t.y[j] += t.x[kk] * widen1(r0[j]) + t.x[kk + 1] * widen1(r1[j]) + t.x[kk + 2] * widen1(r2[j]) +
                  t.x[kk + 3] * widen1(r3[j]);
    }
  }
#endif
  for (; kk < t.k; ++kk) {
    const W* row = w + kk * t.n;
    int64_t j = tiled_end;
#if defined(__AVX512F__)
    if (t.m == 1) {
      const __m512 a = _mm512_set1_ps(t.x[kk]);
      float* y = t.y;
      const W* ahead = row + kPrefetchRows * t.n;  // the same columns a few rows on: more reads in flight
      for (; j + 64 <= n1; j += 64) {
        if (kk + kPrefetchRows < t.k)
          for (size_t b = 0; b < 64 * sizeof(W); b += 64)
            _mm_prefetch(reinterpret_cast<const char*>(ahead + j) + b, _MM_HINT_T0);
        _mm512_storeu_ps(y + j, _mm512_fmadd_ps(a, widen16(row + j), _mm512_loadu_ps(y + j)));
        _mm512_storeu_ps(y + j + 16, _mm512_fmadd_ps(a, widen16(row + j + 16), _mm512_loadu_ps(y + j + 16)));
        _mm512_storeu_ps(y + j + 32, _mm512_fmadd_ps(a, widen16(row + j + 32), _mm512_loadu_ps(y + j + 32)));
        _mm512_storeu_ps(y + j + 48, _mm512_fmadd_ps(a, widen16(row + j + 48), _mm512_loadu_ps(y + j + 48)));
      }
    }
    for (; j + 16 <= n1; j += 16) {
      const __m512 wv = widen16(row + j);
      for (int64_t r = 0; r < t.m; ++r) {
        float* y = t.y + r * t.n + j;
        _mm512_storeu_ps(y, _mm512_fmadd_ps(_mm512_set1_ps(t.x[r * t.k + kk]), wv, _mm512_loadu_ps(y)));
      }
    }
#endif
    for (; j < n1; ++j) {
      const float wv = widen1(row[j]);
      for (int64_t r = 0; r < t.m; ++r) t.y[r * t.n + j] += t.x[r * t.k + kk] * wv;
    }
  }
  if (t.scale != nullptr)
    for (int64_t r = 0; r < t.m; ++r)
      for (int64_t j = n0; j < n1; ++j) t.y[r * t.n + j] *= t.scale[j];
}

template <typename W>
ffi::Error matvec_scaled(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, const float* scale,
                         ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) return ffi::Error::InvalidArgument("shape mismatch");
  auto task = std::make_shared<Task>();
  task->x = x.typed_data();
  task->w = w.untyped_data();
  task->scale = scale;
  task->y = y->typed_data();
  task->m = xd[0];
  task->k = xd[1];
  task->n = wd[1];
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, 64);
  // One column slab per thread, slab s preferably on the s-th thread, so that each core's cache keeps its share of
  // weights that are read again and again (a depth decoder's layers, 31 times per frame). The caller runs every
  // slab that no pool thread has started soon after its own: it never waits on a busy pool (which may be itself).
  const int64_t slabs = std::max<int64_t>(1, std::min(threads, task->n / 64));
  task->slab = ((task->n + slabs - 1) / slabs + 15) / 16 * 16;
  task->slabs = (task->n + task->slab - 1) / task->slab;
  auto run = [](Task& t, int64_t s) {
    if (!t.claim(s)) return;
    run_slab<W>(t, s);
    t.finished.fetch_add(1, std::memory_order_release);
  };
  for (int64_t s = 1; s < task->slabs; ++s) pool.Schedule([task, s, run] { run(*task, s); });
  run(*task, 0);
  const uint64_t all = task->slabs == 64 ? ~uint64_t{0} : (uint64_t{1} << task->slabs) - 1;
  for (int spin = 0; spin < 400 && task->claimed.load(std::memory_order_relaxed) != all; ++spin) _mm_pause();
  for (int64_t s = 1; s < task->slabs; ++s) run(*task, s);
  while (task->finished.load(std::memory_order_acquire) < task->slabs) _mm_pause();
  return ffi::Error::Success();
}

template <typename W>
ffi::Error matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                  ffi::Result<ffi::Buffer<ffi::F32>> y) {
  return matvec_scaled<W>(pool, x, w, nullptr, y);
}

ffi::Error matvec_int8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                       ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto wd = w.dimensions(), sd = scale.dimensions();
  if (wd.size() != 2 || sd.size() != 1 || sd[0] != wd[1]) return ffi::Error::InvalidArgument("scale shape mismatch");
  return matvec_scaled<int8_t>(pool, x, w, scale.typed_data(), y);
}

auto matvec_binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::AnyBuffer>().Ret<
      ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CsmMatvecBf16, matvec<uint16_t>, matvec_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CsmMatvecF32, matvec<float>, matvec_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CsmMatvecI8, matvec_int8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
