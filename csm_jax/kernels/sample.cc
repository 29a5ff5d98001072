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

// Logits below the k-th largest become -inf (ties at the k-th value stay).
void top_k(std::vector<float>& l, int64_t k, std::vector<float>& scratch) {
  const int64_t v = static_cast<int64_t>(l.size());
  if (k <= 0 || k >= v) return;
  scratch = l;
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
  const float kth = scratch[k - 1];
  for (float& x : l) x = x >= kth ? x : kNegInf;
}

// Keeps the most likely logits whose softmax mass reaches p (ties at the threshold stay; the top one always).
void top_p(std::vector<float>& l, float p, std::vector<float>& scratch) {
  if (p >= 1.0f) return;
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

int32_t draw(const float* logits, int64_t v, float uniform, float temperature, int64_t k, float p, float min_p,
             std::vector<float>& l, std::vector<float>& scratch) {
  l.assign(logits, logits + v);
  for (float& x : l) x /= temperature;
  top_k(l, k, scratch);
  top_p(l, p, scratch);
  const float top = *std::max_element(l.begin(), l.end());
  if (min_p > 0.0f) {
    const float floor = top + std::log(min_p);
    for (float& x : l) x = x >= floor ? x : kNegInf;
  }
  float total = 0.0f;
  for (float& x : l) total += (x = x > kNegInf ? std::exp(x - top) : 0.0f);  // now the unnormalised weights
  const float target = uniform * total;
  float cdf = 0.0f;
  int64_t index = 0;
  for (; index < v; ++index) {
    cdf += l[index];
    if (cdf > target) break;
  }
  return static_cast<int32_t>(std::min(index, v - 1));
}

ffi::Error sample(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> uniforms, ffi::Result<ffi::Buffer<ffi::S32>> out,
                  float temperature, int64_t top_k, float top_p, float min_p) {
  auto dims = logits.dimensions();
  if (dims.size() != 2 || uniforms.dimensions().size() != 1 || uniforms.dimensions()[0] != dims[0])
    return ffi::Error::InvalidArgument("expected logits (B, V) and uniforms (B,)");
  std::vector<float> l, scratch;
  for (int64_t r = 0; r < dims[0]; ++r)
    out->typed_data()[r] = draw(logits.typed_data() + r * dims[1], dims[1], uniforms.typed_data()[r], temperature,
                                top_k, top_p, min_p, l, scratch);
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
