// The linear layer with LoRA, forward and backward: y = x W + b + s (dropout(x) A^T) B^T.
#ifndef GPT2CPU_LINEAR_H
#define GPT2CPU_LINEAR_H

#include "matmul.h"

namespace gpt2cpu {

// y = x W + b + s (dropout(x) A^T) B^T, x (n, in), W (in, out), A (r, in), B (out, r).
// The bias is written first and both products accumulate into y (sgemm beta = 1), so y
// is the only (n, out) array: no separate bias / LoRA sums streaming through memory.
// The dropout of x is applied per block of 64 rows in a per-thread buffer, right before
// the rank-r product that is its only reader.
static const int64_t ROWS = 64;

// f(block, first row, rows, x rows after dropout) for each block of ROWS rows of x (n, in),
// in parallel; the dropped rows live in a per-thread buffer (x itself without dropout).
template <class F>
inline void for_dropped_row_blocks(int64_t n, int64_t in, const float* x, const Drop& drop, F f) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
    const bool parallel = n * in * 128 >= PARALLEL_MIN_WORK;  // hashing + a rank-8 product per element
    OneThread serial(!parallel);
    #pragma omp parallel if (parallel)
    {
        std::vector<float> xd(drop.on ? ROWS * in : 0);
        #pragma omp for schedule(dynamic)
        for (int64_t blk = 0; blk < blocks; blk++) {
            int64_t i0 = blk * ROWS, rows = std::min(ROWS, n - i0);
            const float* xs = x + i0 * in;
            if (drop.on) { drop.apply(xd.data(), xs, rows * in, (uint64_t)(i0 * in)); xs = xd.data(); }
            f(blk, i0, rows, xs);
        }
    }
}

inline void lora_forward(int64_t n, int64_t in, int64_t out, int64_t r, const float* x, const float* W,
                         const float* b, const float* A, const float* B, float s, const Drop& drop,
                         float* y, float* a) {
    {
        const bool parallel = n * out * 16 >= PARALLEL_MIN_WORK;
        OneThread serial(!parallel);
        #pragma omp parallel for schedule(static) if (parallel)
        for (int64_t i = 0; i < n; i++) std::copy(b, b + out, y + i * out);
    }
    gemm('N', 'N', n, out, in, x, W, y, 1.f, 1.f);
    if (!r) return;
    for_dropped_row_blocks(n, in, x, drop, [&](int64_t, int64_t i0, int64_t rows, const float* xs) {
        dnnl_sgemm('N', 'T', rows, r, in, 1.f, xs, in, A, in, 0.f, a + i0 * r, r);
    });
    gemm('N', 'T', n, out, r, a, B, y, s, 1.f);
}

// dx = dy W^T + dropout'(s (dy B) A): g = s dy B (n, r) is an input (computed once, shared
// with lora_weight_grads); the LoRA part is added per row block with the dropout mask.
inline void lora_input_grad(int64_t n, int64_t in, int64_t out, int64_t r, const float* dy, const float* W,
                            const float* A, const float* g, const Drop& drop, float* dx) {
    gemm('N', 'T', n, in, out, dy, W, dx);
    if (!r) return;
    if (!drop.on) { gemm('N', 'N', n, in, r, g, A, dx, 1.f, 1.f); return; }
    const int64_t blocks = (n + ROWS - 1) / ROWS;
    const bool parallel = n * in * 128 >= PARALLEL_MIN_WORK;
    OneThread serial(!parallel);
    #pragma omp parallel if (parallel)
    {
        std::vector<float> t(ROWS * in);
        #pragma omp for schedule(dynamic)
        for (int64_t blk = 0; blk < blocks; blk++) {
            int64_t i0 = blk * ROWS, rows = std::min(ROWS, n - i0);
            dnnl_sgemm('N', 'N', rows, in, r, 1.f, g + i0 * r, r, A, in, 0.f, t.data(), in);
            drop.apply(t.data(), t.data(), rows * in, (uint64_t)(i0 * in));
            float* d = dx + i0 * in;
            for (int64_t j = 0; j < rows * in; j++) d[j] += t[j];
        }
    }
}

// dA = g^T dropout(x) (r, in); dB = s dy^T a (out, r). dA is summed over row blocks, one
// partial per block added in block order: the same bits whichever thread ran which block.
inline void lora_weight_grads(int64_t n, int64_t in, int64_t out, int64_t r, const float* dy, const float* x,
                              const float* a, const float* g, float s, const Drop& drop, float* dA, float* dB) {
    gemm('T', 'N', out, r, n, dy, a, dB, s, 0.f);
    const int64_t blocks = (n + ROWS - 1) / ROWS;
    std::vector<float> part(blocks * r * in);
    for_dropped_row_blocks(n, in, x, drop, [&](int64_t blk, int64_t i0, int64_t rows, const float* xs) {
        dnnl_sgemm('T', 'N', r, in, rows, 1.f, g + i0 * r, r, xs, in, 0.f, part.data() + blk * r * in, in);
    });
    std::fill(dA, dA + r * in, 0.f);
    for (int64_t blk = 0; blk < blocks; blk++)
        for (int64_t j = 0; j < r * in; j++) dA[j] += part[blk * r * in + j];
}

}  // namespace gpt2cpu

#endif  // GPT2CPU_LINEAR_H
