// Exact top-k selection by radix select over unique 64-bit composite keys, shared by the CPU and
// CUDA kernels (host/device functions): the CPU builds each histogram serially, the GPU with
// shared-memory atomics, and both make the same decisions from it.
//
// composite = order_key(logit) << 32 | (C - 1 - index)
// Composites are unique and order elements by (logit desc, index asc), so the k largest
// composites are exactly the top k under the tie rule. Digits of 8 bits are decided from the top:
// the value digits (2 for 16-bit logits, 4 for float32), then the index digits. Selection stops as
// soon as the bucket holding the k-th element is taken whole.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace vitfast {
namespace radix {

constexpr int kBins = 256;

VF_HD uint64_t composite(uint32_t value_key, uint32_t index, uint32_t cmax) {
  return (static_cast<uint64_t>(value_key) << 32) | (cmax - index);
}

VF_HD uint32_t index_of(uint64_t composite, uint32_t cmax) {
  return cmax - static_cast<uint32_t>(composite & 0xFFFFFFFFu);
}

// Shift of the first digit (the top 8 bits of the value key).
VF_HD int first_shift(int key_bits) { return 32 + key_bits - 8; }

// Bits needed for the reversed index C - 1 - j, i.e. for C - 1.
VF_HD int index_bits(uint32_t cmax) {
  int b = 0;
  while (b < 32 && (cmax >> b) != 0) ++b;
  return b;
}

// The digit after `shift`, or -1 when none is left (cannot happen before selection is done:
// after the last index digit a bucket holds exactly one element).
VF_HD int next_shift(int shift, int idx_bits) {
  if (shift > 32) return shift - 8;
  if (shift == 32) return idx_bits > 0 ? ((idx_bits - 1) / 8) * 8 : -1;
  return shift - 8;
}

struct State {
  uint64_t desired = 0;  // decided digits
  uint64_t mask = 0;     // which bits are decided
  int need = 0;          // elements still to take from the undecided bucket
  bool done = false;
};

// Bucket holding the need-th largest element of a histogram (bins in ascending key order), and
// how many elements lie in higher bins.
VF_HD void find_bucket(const uint32_t* hist, int need, int* bucket, uint32_t* above) {
  uint32_t acc = 0;
  for (int b = kBins - 1; b >= 0; --b) {
    if (acc + hist[b] >= static_cast<uint32_t>(need)) {
      *bucket = b;
      *above = acc;
      return;
    }
    acc += hist[b];
  }
  *bucket = 0;
  *above = acc;
}

// Take the decision for the digit at `shift`: bucket chosen, `above` elements in higher buckets,
// `count` elements in the bucket itself.
VF_HD void advance(State& s, int shift, int bucket, uint32_t above, uint32_t count) {
  s.desired |= static_cast<uint64_t>(bucket) << shift;
  s.mask |= static_cast<uint64_t>(0xFF) << shift;
  s.need -= static_cast<int>(above);
  s.done = count == static_cast<uint32_t>(s.need);
}

// Does an element still compete at this digit (its decided digits match)?
VF_HD bool matches(const State& s, uint64_t c) { return (c & s.mask) == s.desired; }

// Once done: is the element among the k selected?
VF_HD bool selected(const State& s, uint64_t c) { return (c & s.mask) >= s.desired; }

}  // namespace radix
}  // namespace vitfast
