// y (M, N) f32 = x (M, K) f32 @ w (K, N) bfloat16 or float32, for the few rows (M <= 16) of a decode step; the
// int8 variant y = (x @ q) * scale with per-column scales (N,) f32 (weight-only int8 quantization); and the 4-bit
// variant over packed codes with a float16 scale and bias per group of input rows (see matvec_int4 below).
//
// Why: XLA's CPU backend runs these matrix-vector products well below memory bandwidth, and bfloat16 ones at
// ~1.7 GB/s; and it runs small ones on one core, whose L2 cannot hold all of a small depth decoder's layers.
// Decoding is bound by reading the weights once per step, so this kernel streams each thread's column slab of w
// row by row (long contiguous reads), widens bfloat16 to float32 exactly (a 16-bit shift) and accumulates in
// float32 into y held in L1/L2. Work is split over XLA's own intra-op thread pool.
#include <algorithm>
#include <array>
#include <utility>
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
  const uint16_t* gscale = nullptr;  // 4-bit weights: float16 scale and bias per (group, column)
  const uint16_t* gbias = nullptr;
  int64_t group = 0;  // 4-bit weights: input rows per group
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

// Runs slab_fn over one column slab per thread, slab s preferably on the s-th thread, so that each core's cache
// keeps its share of weights that are read again and again (a depth decoder's layers, 31 times per frame). The
// caller runs every slab that no pool thread has started soon after its own: it never waits on a busy pool (which
// may be itself).
ffi::Error run_slabs(ffi::ThreadPool& pool, std::shared_ptr<Task> task, void (*slab_fn)(const Task&, int64_t)) {
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, 64);
  const int64_t slabs = std::max<int64_t>(1, std::min(threads, task->n / 64));
  task->slab = ((task->n + slabs - 1) / slabs + 15) / 16 * 16;
  task->slabs = (task->n + task->slab - 1) / task->slab;
  auto run = [slab_fn](Task& t, int64_t s) {
    if (!t.claim(s)) return;
    slab_fn(t, s);
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
  return run_slabs(pool, task, run_slab<W>);
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

// ---- 4-bit weights ----------------------------------------------------------------------------------------------
// w (K/2, N) uint8: rows 2i and 2i+1 of the codes in the low and high nibble of row i; w[k, j] = code * scale[g, j] +
// bias[g, j] for the group g = k / group, scale and bias float16. Per group, acc = sum over its rows of x[k] * code
// (float32), then y += scale * acc + bias * (sum of the group's x). The codes are widened in registers: a byte per
// column gives two codes (and 15, shift 4) converted to float32, so each weight is read from memory as half a byte.

inline float half1(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  if (exp == 0) {
    const float f = static_cast<float>(mant) * 5.9604644775390625e-08f;  // subnormal: mant x 2^-24
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (exp == 0x1f ? 0x7f800000u : (exp + 112) << 23) | (mant << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Vec = __m512;
inline Vec vset(float a) { return _mm512_set1_ps(a); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vhalf(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Vec codes(const uint8_t* p, Vec& high) {  // 16 bytes -> low and high codes of 16 columns
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  high = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
}
#define CSM_INT4_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int64_t kLanes = 8;
using Vec = __m256;
inline Vec vset(float a) { return _mm256_set1_ps(a); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vhalf(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec codes(const uint8_t* p, Vec& high) {  // 8 bytes -> low and high codes of 8 columns
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  high = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
}
#define CSM_INT4_SIMD 1
#endif

constexpr int64_t kChunkFloats = 16384;  // accumulators per chunk of columns (all rows): 64 KB, held in L2

// acc[r, :] += x[r, 2i] * low codes + x[r, 2i + 1] * high codes of packed rows [i0, i1), columns [c0, c1): one row
// streams whole packed rows (long contiguous reads); several rows take int4_block when SIMD is compiled in.
void accumulate_int4(const Task& t, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* acc) {
  const uint8_t* w = static_cast<const uint8_t*>(t.w);
  const int64_t cw = c1 - c0;
  int64_t i = i0;
#if defined(CSM_INT4_SIMD)
  const int64_t simd_end = c0 + cw / kLanes * kLanes;
  if (t.m == 1) {  // two packed rows per pass over acc: it is loaded and stored once per four weight rows
    for (; i + 2 <= i1; i += 2) {
      const float* x = t.x + 2 * i;
      const Vec a0 = vset(x[0]), a1 = vset(x[1]), a2 = vset(x[2]), a3 = vset(x[3]);
      const uint8_t* r0 = w + i * t.n;
      const uint8_t* r1 = r0 + t.n;
      for (int64_t j = c0; j < simd_end; j += kLanes) {
        Vec h0, h1;
        const Vec l0 = codes(r0 + j, h0), l1 = codes(r1 + j, h1);
        Vec s = vload(acc + j - c0);
        s = vfma(a0, l0, s);
        s = vfma(a1, h0, s);
        s = vfma(a2, l1, s);
        s = vfma(a3, h1, s);
        vstore(acc + j - c0, s);
      }
      for (int64_t j = simd_end; j < c1; ++j)
        acc[j - c0] += x[0] * (r0[j] & 15) + x[1] * (r0[j] >> 4) + x[2] * (r1[j] & 15) + x[3] * (r1[j] >> 4);
    }
  }
#endif
  for (; i < i1; ++i) {  // what is left: a last odd row, and without SIMD everything
    const uint8_t* row = w + i * t.n;
    for (int64_t j = c0; j < c1; ++j) {
      const float low = row[j] & 15, high = row[j] >> 4;
      for (int64_t r = 0; r < t.m; ++r) {
        const float* x = t.x + r * t.k + 2 * i;
        acc[r * cw + j - c0] += x[0] * low + x[1] * high;
      }
    }
  }
}

#if defined(CSM_INT4_SIMD)
constexpr int64_t kBlock = 64;  // columns per block: a cache line of each packed row

// Several rows of x (M, at most 16) against the columns [c0, c1) of one block: per group and strip of kLanes columns,
// the M accumulators stay in registers while the group's packed rows are decoded once each; the block's lines of
// the group (group / 2 x 64 bytes) stay in L1 across its strips, and the next group's are prefetched (its rows are
// n bytes apart, too far for the hardware prefetchers).
template <int M>
void int4_block(const Task& t, int64_t c0, int64_t c1, const float* xs) {
  const uint8_t* w = static_cast<const uint8_t*>(t.w);
  const int64_t groups = t.k / t.group, half = t.group / 2;
  for (int64_t g = 0; g < groups; ++g) {
    if (g + 1 < groups)
      for (int64_t i = 0; i < half; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(w + ((g + 1) * half + i) * t.n + c0), _MM_HINT_T0);
    for (int64_t j = c0; j < c1; j += kLanes) {
      Vec acc[M];
      for (int r = 0; r < M; ++r) acc[r] = vset(0.0f);
      const uint8_t* p = w + g * half * t.n + j;
      const float* x = t.x + g * t.group;
      for (int64_t i = 0; i < half; ++i, p += t.n, x += 2) {
        Vec high;
        const Vec low = codes(p, high);
        for (int r = 0; r < M; ++r) acc[r] = vfma(vset(x[r * t.k + 1]), high, vfma(vset(x[r * t.k]), low, acc[r]));
      }
      const Vec scale = vhalf(t.gscale + g * t.n + j), bias = vhalf(t.gbias + g * t.n + j);
      for (int r = 0; r < M; ++r) {
        float* y = t.y + r * t.n + j;
        vstore(y, vfma(scale, acc[r], vfma(bias, vset(xs[r * groups + g]), vload(y))));
      }
    }
  }
}

template <int... Ms>
constexpr std::array<void (*)(const Task&, int64_t, int64_t, const float*), sizeof...(Ms)> int4_blocks(
    std::integer_sequence<int, Ms...>) {
  return {int4_block<Ms + 1>...};
}
constexpr auto kInt4Blocks = int4_blocks(std::make_integer_sequence<int, 16>());
#endif

void run_slab_int4(const Task& t, int64_t s) {
  int64_t n0 = s * t.slab;
  const int64_t n1 = std::min(t.n, n0 + t.slab);
#if defined(CSM_INT4_SIMD)
  if (t.m > 1 && t.m <= 16) {  // one row streams whole packed rows instead (accumulate_int4), measured 2x faster
    const int64_t groups = t.k / t.group;
    std::unique_ptr<float[]> xs(new float[t.m * groups]);  // each row's sum of x per group, which the bias multiplies
    for (int64_t r = 0; r < t.m; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        float sum = 0.0f;
        for (int64_t kk = g * t.group; kk < (g + 1) * t.group; ++kk) sum += t.x[r * t.k + kk];
        xs[r * groups + g] = sum;
      }
    const int64_t blocked = n0 + (n1 - n0) / kLanes * kLanes;
    for (int64_t r = 0; r < t.m; ++r) std::fill(t.y + r * t.n + n0, t.y + r * t.n + blocked, 0.0f);
    for (int64_t c0 = n0; c0 < blocked; c0 += kBlock)
      kInt4Blocks[t.m - 1](t, c0, std::min(blocked, c0 + kBlock), xs.get());
    n0 = blocked;  // the last columns (fewer than kLanes) below
  }
#endif
  const int64_t chunk = std::max<int64_t>(64, kChunkFloats / t.m / 64 * 64);
  const int64_t groups = t.k / t.group;
  std::unique_ptr<float[]> acc(new float[t.m * std::min(chunk, n1 - n0)]);
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const int64_t c1 = std::min(n1, c0 + chunk), cw = c1 - c0;
    for (int64_t r = 0; r < t.m; ++r) std::fill(t.y + r * t.n + c0, t.y + r * t.n + c1, 0.0f);
    for (int64_t g = 0; g < groups; ++g) {
      std::fill(acc.get(), acc.get() + t.m * cw, 0.0f);
      accumulate_int4(t, g * t.group / 2, (g + 1) * t.group / 2, c0, c1, acc.get());
      const uint16_t* scale = t.gscale + g * t.n;
      const uint16_t* bias = t.gbias + g * t.n;
      for (int64_t r = 0; r < t.m; ++r) {
        float xs = 0.0f;  // the group's sum of x, which the bias multiplies
        for (int64_t kk = g * t.group; kk < (g + 1) * t.group; ++kk) xs += t.x[r * t.k + kk];
        float* y = t.y + r * t.n;
        const float* a = acc.get() + r * cw - c0;
        int64_t j = c0;
#if defined(CSM_INT4_SIMD)
        const Vec vxs = vset(xs);
        for (; j + kLanes <= c1; j += kLanes)
          vstore(y + j, vfma(vhalf(scale + j), vload(a + j), vfma(vhalf(bias + j), vxs, vload(y + j))));
#endif
        for (; j < c1; ++j) y[j] += half1(scale[j]) * a[j] + half1(bias[j]) * xs;
      }
    }
  }
}

// x (M, K) f32, w (K/2, N) u8, scale and bias (K/group, N) f16 -> y (M, N) f32.
ffi::Error matvec_int4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                       ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> bias, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions(), bd = bias.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || bd.size() != 2 || xd[1] != 2 * wd[0] || sd[1] != wd[1] ||
      sd[0] != bd[0] || sd[1] != bd[1] || sd[0] == 0 || xd[1] % sd[0] != 0 || (xd[1] / sd[0]) % 2 != 0)
    return ffi::Error::InvalidArgument("int4 shape mismatch");
  auto task = std::make_shared<Task>();
  task->x = x.typed_data();
  task->w = w.typed_data();
  task->gscale = reinterpret_cast<const uint16_t*>(scale.untyped_data());
  task->gbias = reinterpret_cast<const uint16_t*>(bias.untyped_data());
  task->y = y->typed_data();
  task->m = xd[0];
  task->k = xd[1];
  task->n = wd[1];
  task->group = xd[1] / sd[0];
  return run_slabs(pool, task, run_slab_int4);
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(CsmMatvecI4, matvec_int4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
