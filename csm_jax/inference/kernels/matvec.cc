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
  int64_t align = 16;  // slabs are whole multiples of this many columns
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
  const int64_t slabs = std::max<int64_t>(1, std::min(threads, task->n / std::max<int64_t>(64, task->align)));
  task->slab = ((task->n + slabs - 1) / slabs + task->align - 1) / task->align * task->align;
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
// The columns in strips of kTile4 (Int4Weight.tiled): w (N/kTile4, K/2, kTile4) uint8, strip s's packed rows one after
// another, rows 2i and 2i+1 of the codes in the low and high nibble of byte (s, i, c); scale and bias
// (N/kTile4, K/group, kTile4) float16; w[k, s * kTile4 + c] = code * scale[s, g, c] + bias[s, g, c], g = k / group.
// Per group, acc = sum over its rows of x[k] * code (float32), then y += scale * acc + bias * (the group's sum of x).
// Each strip is one sequential read and its accumulators stay in registers; the codes are widened in registers (a
// byte per column gives two codes: and 15, shift 4, converted to float32). Measured on a 2-core AMD EPYC (AVX-512),
// one row over (2048, 8192) weights: 32 GB/s, against 15-17 GB/s for the same weights in (K/2, N) rows, whose
// per-group sums had to go through memory.

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Vec = __m512;
inline Vec vset(float a) { return _mm512_set1_ps(a); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
constexpr int kRegisters = 32;
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
constexpr int kRegisters = 16;
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vhalf(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec codes(const uint8_t* p, Vec& high) {  // 8 bytes -> low and high codes of 8 columns
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  high = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
}
#define CSM_INT4_SIMD 1
#endif

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

#if defined(CSM_INT4_SIMD)
constexpr int64_t kStripVecs = 8;  // vector registers of columns per strip: 8 independent sums for one row
constexpr int64_t kTile4 = kStripVecs * kLanes;

constexpr int kStripRows = 4;  // rows of x per pass over a strip (more rows: another pass, from L1/L2); 4 measured
                               // 15% faster than 8 at 8 and 16 rows

// How many vectors of columns (of a strip's kStripVecs) M rows sum at once: as many as leave registers for the
// codes and broadcasts, so that each broadcast of x serves several vectors.
constexpr int vectors_for(int m) {
  int v = kStripVecs;
  while (v > 1 && m * v > kRegisters - 8) v /= 2;
  return v;
}

// Rows [r0, r0 + M) against one strip: per group, the M x V sums of V vectors of columns at a time stay in
// registers while the group's packed rows are decoded; the group's block of the strip (group / 2 x kTile4 bytes)
// stays in L1 across its passes.
template <int M>
void int4_strip(const Task& t, int64_t strip, int64_t r0, const float* xs) {
  constexpr int V = vectors_for(M);
  const int64_t groups = t.k / t.group, half = t.group / 2;
  const uint8_t* block = static_cast<const uint8_t*>(t.w) + strip * (t.k / 2) * kTile4;
  const uint16_t* scale = t.gscale + strip * groups * kTile4;
  const uint16_t* bias = t.gbias + strip * groups * kTile4;
  float* y = t.y + r0 * t.n + strip * kTile4;
  const float* xr = t.x + r0 * t.k;
  xs += r0 * groups;
  for (int r = 0; r < M; ++r) std::fill(y + r * t.n, y + r * t.n + kTile4, 0.0f);
  for (int64_t g = 0; g < groups; ++g, block += half * kTile4, scale += kTile4, bias += kTile4) {
    for (int64_t v0 = 0; v0 < kStripVecs; v0 += V) {
      Vec acc[M][V];
      for (int r = 0; r < M; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = vset(0.0f);
      const uint8_t* p = block + v0 * kLanes;
      const float* x = xr + g * t.group;
      for (int64_t i = 0; i < half; ++i, p += kTile4, x += 2) {
        for (int v = 0; v < V; ++v) {
          Vec high;
          const Vec low = codes(p + v * kLanes, high);
          for (int r = 0; r < M; ++r)
            acc[r][v] = vfma(vset(x[r * t.k + 1]), high, vfma(vset(x[r * t.k]), low, acc[r][v]));
        }
      }
      for (int v = 0; v < V; ++v) {
        const int64_t c = (v0 + v) * kLanes;
        const Vec s = vhalf(scale + c), b = vhalf(bias + c);
        for (int r = 0; r < M; ++r) {
          float* out = y + r * t.n + c;
          vstore(out, vfma(s, acc[r][v], vfma(b, vset(xs[r * groups + g]), vload(out))));
        }
      }
    }
  }
}

template <int... Ms>
constexpr std::array<void (*)(const Task&, int64_t, int64_t, const float*), sizeof...(Ms)> int4_strips(
    std::integer_sequence<int, Ms...>) {
  return {int4_strip<Ms + 1>...};
}
constexpr auto kInt4Strips = int4_strips(std::make_integer_sequence<int, kStripRows>());
#else
constexpr int64_t kTile4 = 64;

void int4_strip_plain(const Task& t, int64_t strip, const float* xs) {
  const int64_t groups = t.k / t.group, half = t.group / 2;
  const uint8_t* block = static_cast<const uint8_t*>(t.w) + strip * (t.k / 2) * kTile4;
  const uint16_t* scale = t.gscale + strip * groups * kTile4;
  const uint16_t* bias = t.gbias + strip * groups * kTile4;
  float acc[kTile4];
  for (int64_t r = 0; r < t.m; ++r) {
    float* y = t.y + r * t.n + strip * kTile4;
    std::fill(y, y + kTile4, 0.0f);
    for (int64_t g = 0; g < groups; ++g) {
      std::fill(acc, acc + kTile4, 0.0f);
      const uint8_t* p = block + g * half * kTile4;
      const float* x = t.x + r * t.k + g * t.group;
      for (int64_t i = 0; i < half; ++i, p += kTile4, x += 2)
        for (int64_t c = 0; c < kTile4; ++c) acc[c] += x[0] * (p[c] & 15) + x[1] * (p[c] >> 4);
      for (int64_t c = 0; c < kTile4; ++c)
        y[c] += half1(scale[g * kTile4 + c]) * acc[c] + half1(bias[g * kTile4 + c]) * xs[r * groups + g];
    }
  }
}
#endif

void run_slab_int4(const Task& t, int64_t s) {
  const int64_t groups = t.k / t.group;
  std::unique_ptr<float[]> xs(new float[t.m * groups]);  // each row's sum of x per group, which the bias multiplies
  for (int64_t r = 0; r < t.m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
      for (int64_t kk = g * t.group; kk < (g + 1) * t.group; ++kk) sum += t.x[r * t.k + kk];
      xs[r * groups + g] = sum;
    }
  const int64_t first = s * t.slab / kTile4, last = std::min(t.n, (s + 1) * t.slab) / kTile4;
  for (int64_t strip = first; strip < last; ++strip) {
#if defined(CSM_INT4_SIMD)
    for (int64_t r0 = 0; r0 < t.m; r0 += kStripRows)
      kInt4Strips[std::min<int64_t>(kStripRows, t.m - r0) - 1](t, strip, r0, xs.get());
#else
    int4_strip_plain(t, strip, xs.get());
#endif
  }
}

// x (M <= 16, K) f32, w (N/kTile4, K/2, kTile4) u8, scale and bias (N/kTile4, K/group, kTile4) f16 -> y (M, N) f32.
ffi::Error matvec_int4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                       ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> bias, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions(), bd = bias.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 3 || bd.size() != 3 || wd[2] != kTile4 ||
      xd[1] != 2 * wd[1] || sd[0] != wd[0] || sd[2] != kTile4 || sd[0] != bd[0] || sd[1] != bd[1] ||
      sd[2] != bd[2] || sd[1] == 0 || xd[1] % sd[1] != 0 || (xd[1] / sd[1]) % 2 != 0 || xd[0] < 1 || xd[0] > 16)
    return ffi::Error::InvalidArgument("int4 shape mismatch");
  auto task = std::make_shared<Task>();
  task->x = x.typed_data();
  task->w = w.typed_data();
  task->gscale = reinterpret_cast<const uint16_t*>(scale.untyped_data());
  task->gbias = reinterpret_cast<const uint16_t*>(bias.untyped_data());
  task->y = y->typed_data();
  task->m = xd[0];
  task->k = xd[1];
  task->n = wd[0] * kTile4;
  task->group = xd[1] / sd[1];
  task->align = kTile4;
  return run_slabs(pool, task, run_slab_int4);
}

}  // namespace

// The strip width the 4-bit kernel reads (Int4Weight.tiled).
extern "C" int64_t CsmInt4Tile() { return kTile4; }

namespace {

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
