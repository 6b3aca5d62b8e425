// GPT-2's GELU (tanh form) and its gradient, one pass, split over the cores (Jittor's own
// CPU kernels for it run on one core).
#ifndef GPT2CPU_GELU_H
#define GPT2CPU_GELU_H

#include "common.h"

namespace gpt2cpu {

// GPT-2's GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); with dy, the
// gradient dy * gelu'(x) instead. tanhf's argument is clamped to [-15, 15]: tanh(15)
// rounds to 1 in float32, so no value changes.
inline void gelu_tanh(int64_t n, const float* x, const float* dy, float* out) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    OneThread serial(n * 16 < PARALLEL_MIN_WORK);
    #pragma omp parallel for schedule(static) if (n * 16 >= PARALLEL_MIN_WORK)
    for (int64_t c = 0; c < n; c += 4096) {
        const int64_t e = std::min(n, c + 4096);
        if (!dy) {
            for (int64_t i = c; i < e; i++) {
                float v = x[i], t = tanhf(std::min(15.f, std::max(-15.f, k0 * (v + k1 * v * v * v))));
                out[i] = 0.5f * v * (1.f + t);
            }
        } else {
            for (int64_t i = c; i < e; i++) {
                float v = x[i], t = tanhf(std::min(15.f, std::max(-15.f, k0 * (v + k1 * v * v * v))));
                out[i] = dy[i] * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * k0 * (1.f + 3.f * k1 * v * v));
            }
        }
    }
}

}  // namespace gpt2cpu

#endif  // GPT2CPU_GELU_H
