// What every kernel uses: oneDNN's sgemm, the threading rule, and hashed dropout.
#ifndef GPT2CPU_COMMON_H
#define GPT2CPU_COMMON_H

#ifdef __AVX512F__
#include <immintrin.h>
#endif
// Jittor's jt.code inserts its definitions (in0_type, index_t, ...) after the LAST #include
// of the source: that one must not sit inside an #if, or a CPU without AVX-512 loses them.
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cfloat>
#include <vector>
#include <algorithm>
#include <omp.h>

// oneDNN's row-major sgemm, the function Jittor's own mkl_matmul op calls. Jittor has
// already loaded the library for its mkl ops, so the declaration is all we need.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
    const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

namespace gpt2cpu {

// Work below which a kernel runs on one thread (multiply-adds, or elements x 16).
// Starting the other threads is cheap on an idle machine, but a parallel region can wait
// a scheduler time slice for its second thread when another process keeps a core busy,
// and small ops (LoRA's rank-8 products, a generation step's elementwise work) gain
// little from a second core. A generation step's weight products are the exception (see
// gemm_few): reading the weights from memory is their whole cost, and two cores read
// about twice as fast as one. Measurements: docs/cpu_kernels.md.
static const int64_t PARALLEL_MIN_WORK = 1 << 24;

// Below that size, oneDNN must run single-threaded too: outside an active parallel region
// its sgemm starts its own threads, with the same wait under load.
struct OneThread {
    int saved;
    explicit OneThread(bool on) : saved(on ? omp_get_max_threads() : 0) { if (on) omp_set_num_threads(1); }
    ~OneThread() { if (saved) omp_set_num_threads(saved); }
};

// --- dropout -----------------------------------------------------------------
// Element i is kept when hash(seed, i) >= threshold (probability 1 - p), then scaled by
// 1 / (1 - p). The hash is MurmurHash3's 32-bit finaliser (a bijection with full
// avalanche) of the counter mixed with two seed words: stateless, so it vectorises (32-bit
// multiplies), runs in parallel, and the backward pass regenerates exactly the forward mask.
//
// Keyed rows (cpu_kernels.token_keys): when the array is (rows, width) with one key per row
// (its token), element (r, c) hashes counter c under the seed mixed with keys[r] instead of
// counter r * width + c, so a token's mask does not depend on where in the batch it sits.
inline uint32_t hash32(uint32_t s0, uint32_t s1, uint32_t i) {
    uint32_t z = (i * 0x9E3779B9u + s0) ^ s1;
    z ^= z >> 16; z *= 0x85EBCA6Bu; z ^= z >> 13; z *= 0xC2B2AE35u; z ^= z >> 16;
    return z;
}

struct Drop {
    bool on; uint32_t s0, s1, threshold; float inv_keep;
    const int* keys; int64_t width;  // keyed rows: a key per row of `width` elements; nullptr: flat counters
    // p: dropout probability (0: off, seed2 unused); seed2: two random seed words
    Drop(double p, const int* seed2, const int* row_keys = nullptr, int64_t row_width = 0)
        : on(p > 0), s0(0), s1(0), threshold(0), inv_keep(1.f), keys(nullptr), width(0) {
        if (!on) return;
        s0 = (uint32_t)seed2[0]; s1 = (uint32_t)seed2[1] * 0x01000193u;
        threshold = (uint32_t)std::min(4294967295.0, p * 4294967296.0);
        inv_keep = (float)(1.0 / (1.0 - p));
        keys = row_keys; width = row_width;
    }
    // the flat stream of one keyed row: its own seed, counters from 0
    Drop row(uint32_t key) const {
        Drop d = *this;
        d.s0 = hash32(s0, s1, key);
        d.keys = nullptr;
        return d;
    }
    // dst[j] = src[j] / (1 - p) if element base + j is kept, else 0 (dst may be src)
    void apply(float* dst, const float* src, int64_t n, uint64_t base) const {
        if (keys) {  // split at row ends: element base + j is column (base + j) % width of its row
            for (int64_t j = 0; j < n;) {
                const int64_t r = (int64_t)((base + j) / width), c = (int64_t)((base + j) % width);
                const int64_t len = std::min(n - j, width - c);
                row((uint32_t)keys[r]).apply(dst + j, src + j, len, (uint64_t)c);
                j += len;
            }
            return;
        }
        // locals: stores to dst could alias the members, which would stop vectorisation
        const uint32_t a = s0, b = s1, t = threshold, i0 = (uint32_t)base;
        const float scale = inv_keep;
        for (int64_t j = 0; j < n; j++)
            dst[j] = hash32(a, b, i0 + (uint32_t)j) >= t ? src[j] * scale : 0.f;
    }
};

// y = dropout(x) over n floats, element i hashed with counter i (or keyed by rows); also
// its own gradient (the same mask and scale applied to dy). Chunks of 4096: each thread
// hashes its own counters, so any split gives the same mask.
inline void dropout(int64_t n, const float* x, const Drop& drop, float* y) {
    #pragma omp parallel for schedule(dynamic, 16) if (n * 16 >= PARALLEL_MIN_WORK)
    for (int64_t c = 0; c < n; c += 4096)
        drop.apply(y + c, x + c, std::min<int64_t>(4096, n - c), (uint64_t)c);
}

}  // namespace gpt2cpu

#endif  // GPT2CPU_COMMON_H
