// LayerNorm over rows, forward and backward, rows split over the cores (Jittor's own CPU
// kernels for it run on one core).
#ifndef GPT2CPU_LAYER_NORM_H
#define GPT2CPU_LAYER_NORM_H

#include "common.h"

namespace gpt2cpu {

// y = (x - mean) / sqrt(var + eps) * w + b per row of C, var = E[(x - mean)^2] (PyTorch's)
inline void layer_norm(int64_t n, int64_t C, const float* x, const float* w, const float* b, float eps,
                       float* y, float* mean, float* rstd) {
    OneThread serial(n * C * 16 < PARALLEL_MIN_WORK);
    #pragma omp parallel for schedule(static) if (n * C * 16 >= PARALLEL_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const float* xi = x + i * C;
        float* yi = y + i * C;
        double s = 0, ss = 0;
        for (int64_t j = 0; j < C; j++) s += xi[j];
        const float m = (float)(s / C);
        for (int64_t j = 0; j < C; j++) { float d = xi[j] - m; ss += (double)d * d; }
        const float r = 1.f / sqrtf((float)(ss / C) + eps);
        for (int64_t j = 0; j < C; j++) yi[j] = (xi[j] - m) * r * w[j] + b[j];
        mean[i] = m; rstd[i] = r;
    }
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w, xhat = (x - mean) rstd
inline void layer_norm_backward(int64_t n, int64_t C, const float* x, const float* w, const float* mean,
                                const float* rstd, const float* dy, float* dx) {
    OneThread serial(n * C * 16 < PARALLEL_MIN_WORK);
    #pragma omp parallel for schedule(static) if (n * C * 16 >= PARALLEL_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * C, *gi = dy + i * C;
        const float m = mean[i], r = rstd[i];
        double sg = 0, sgx = 0;
        for (int64_t j = 0; j < C; j++) { float g = gi[j] * w[j]; sg += g; sgx += (double)g * ((xi[j] - m) * r); }
        const float a = (float)(sg / C), c = (float)(sgx / C);
        float* di = dx + i * C;
        for (int64_t j = 0; j < C; j++) di[j] = r * (gi[j] * w[j] - a - (xi[j] - m) * r * c);
    }
}

}  // namespace gpt2cpu

#endif  // GPT2CPU_LAYER_NORM_H
