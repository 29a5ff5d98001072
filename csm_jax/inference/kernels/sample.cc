// One token per row from float32 logits (B, V): temperature, top-k, top-p, min-p, then an inverse-CDF draw with
// the row's uniform, exactly as `csm_jax.sampling.sample` does it (same filters, same tie rules, same draw).
//
// Why: on XLA's CPU backend the exact top-k threshold (a 32-pass bisection) and the draw are ~700 small ops per
// codebook, about a fifth of a small model's frame; here they are one pass plus a partial sort of a 2051-entry row.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The k-th largest logit (-inf when fewer than k are finite): candidates above the running threshold are appended
// to a buffer of 4k, which is cut back to its k largest whenever it fills. For CSM's k = 50 of 2051 logits that
// is one predictable comparison per logit and a few partial sorts of 200, where a partial sort of the whole row
// costs several unpredictable comparisons per logit.
float kth_largest(const std::vector<float>& l, int64_t k, std::vector<float>& buffer) {
  const size_t want = static_cast<size_t>(k), capacity = 4 * want;
  buffer.resize(capacity + 1);
  float threshold = kNegInf;
  size_t n = 0;
  auto keep_k_largest = [&] {
    std::nth_element(buffer.begin(), buffer.begin() + (want - 1), buffer.begin() + n, std::greater<float>());
    threshold = buffer[want - 1];
    n = want;
  };
  for (float x : l) {
    buffer[n] = x;
    n += x > threshold;
    if (n == capacity) keep_k_largest();
  }
  if (n < want) return kNegInf;
  keep_k_largest();
  return threshold;
}

// Keeps the most likely logits whose softmax mass reaches p (ties at the threshold stay; the top one always).
void top_p(std::vector<float>& l, float p, std::vector<float>& scratch) {
  const float top = *std::max_element(l.begin(), l.end());
  float total = 0.0f;
  for (float x : l) total += x > kNegInf ? std::exp(x - top) : 0.0f;
  scratch.clear();
  for (float x : l)
    if (x > kNegInf) scratch.push_back(x);
  std::sort(scratch.begin(), scratch.end(), std::greater<float>());
  float mass = 0.0f, threshold = scratch.empty() ? kNegInf : scratch.front();
  for (size_t i = 0; i < scratch.size(); ++i) {
    mass += std::exp(scratch[i] - top) / total;
    const bool group_end = i + 1 == scratch.size() || scratch[i + 1] != scratch[i];
    if (group_end && mass >= p) {
      threshold = scratch[i];
      break;
    }
    threshold = scratch[i];
  }
  for (float& x : l) x = x >= threshold ? x : kNegInf;
}

float max_of(const std::vector<float>& l) {
  float lanes[8] = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
  size_t i = 0;
  for (; i + 8 <= l.size(); i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] = std::max(lanes[j], l[i + j]);
  for (; i < l.size(); ++i) lanes[0] = std::max(lanes[0], l[i]);
  return *std::max_element(lanes, lanes + 8);
}

struct Candidate {
  int64_t index;
  float weight;
};

// Filters, then walks the unnormalised softmax weights of the kept logits in vocabulary order to uniform x total.
int32_t draw(const float* logits, int64_t v, float uniform, float temperature, int64_t k, float p, float min_p,
             std::vector<float>& l, std::vector<float>& scratch, std::vector<Candidate>& kept) {
  l.assign(logits, logits + v);
  for (float& x : l) x /= temperature;
  float floor = k > 0 && k < v ? kth_largest(l, k, scratch) : kNegInf;
  if (p < 1.0f) {
    for (float& x : l) x = x >= floor ? x : kNegInf;
    top_p(l, p, scratch);
  }
  const float top = max_of(l);
  if (min_p > 0.0f) floor = std::max(floor, top + std::log(min_p));
  kept.clear();
  float total = 0.0f;
  for (int64_t i = 0; i < v; ++i) {
    if (l[i] >= floor && l[i] > kNegInf) {
      kept.push_back({i, std::exp(l[i] - top)});
      total += kept.back().weight;
    }
  }
  const float target = uniform * total;
  float cdf = 0.0f;
  for (const Candidate& c : kept)
    if ((cdf += c.weight) > target) return static_cast<int32_t>(c.index);
  return static_cast<int32_t>(v - 1);
}

ffi::Error sample(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> uniforms, ffi::Result<ffi::Buffer<ffi::S32>> out,
                  float temperature, int64_t top_k, float top_p, float min_p) {
  auto dims = logits.dimensions();
  if (dims.size() != 2 || uniforms.dimensions().size() != 1 || uniforms.dimensions()[0] != dims[0])
    return ffi::Error::InvalidArgument("expected logits (B, V) and uniforms (B,)");
  std::vector<float> l, scratch;
  std::vector<Candidate> kept;
  for (int64_t r = 0; r < dims[0]; ++r)
    out->typed_data()[r] = draw(logits.typed_data() + r * dims[1], dims[1], uniforms.typed_data()[r], temperature,
                                top_k, top_p, min_p, l, scratch, kept);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CsmSampleF32, sample,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("temperature")
                                  .Attr<int64_t>("top_k")
                                  .Attr<float>("top_p")
                                  .Attr<float>("min_p"));
