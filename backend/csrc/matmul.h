// Matrix products: oneDNN sgemm split over the cores (gemm), and for a generation step's
// few rows a pass that streams each weight once per thread (gemm_few, AVX-512 only).
#ifndef GPT2CPU_MATMUL_H
#define GPT2CPU_MATMUL_H

#include "common.h"

namespace gpt2cpu {

// --- few rows: a generation step -------------------------------------------------
// x (4, 768) times a weight: each weight element is used by 4 multiply-adds, so streaming
// the weights from memory is the whole cost. oneDNN's sgemm reads these shapes slowly
// (its column blocks read strided panels of B); one pass over contiguous rows per thread,
// with a software prefetch, comes close to the machine's read bandwidth.
static const int64_t FEW_ROWS = 16;      // up to here faster than sgemm: docs/cpu_kernels.md
static const int PREFETCH_BYTES = 16384;  // ahead of the read position: docs/cpu_kernels.md

#ifdef __AVX512F__
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// C = alpha A B + beta C, A (M, K), B (K, N). Each thread takes a contiguous block of B's
// rows (a K range), accumulates its partial C (M, N) in cache, and the partials are added
// in thread order. Within a thread the K range is summed in blocks of K_BLOCK rows, each
// from zero, and the block sums are added: one running float32 sum over the LM head's
// 50,257 rows (dh = dlogits wte in training, where a micro-batch has few supervised tokens)
// made every gradient ~2x further from a float64 reference than sgemm's blocked sums.
static const int64_t K_BLOCK = 256;

inline void gemm_few_nn(int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
                        float alpha, float beta) {
    const int slots = omp_get_max_threads();
    // 16 KB between the threads' partials: adjacent ones ran markedly slower (the cores'
    // prefetchers reach into each other's lines; docs/cpu_kernels.md)
    const int64_t stride = 2 * M * N + 4096;
    std::vector<float> part((size_t)slots * stride);
    #pragma omp parallel num_threads(slots)
    {
        // the team may be smaller than asked (a nested region runs on one thread)
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t k0 = K * t / nt, k1 = K * (t + 1) / nt;
        float* y = part.data() + t * stride;  // this thread's partial C
        float* yb = y + M * N;                // the current block's sum
        std::fill(y, y + M * N, 0.f);
        for (int64_t kb = k0; kb < k1; kb += K_BLOCK) {
            const int64_t kb1 = std::min(k1, kb + K_BLOCK);
            std::fill(yb, yb + M * N, 0.f);
            int64_t k = kb;
            for (; k + 4 <= kb1; k += 4) {  // four rows of B per pass over yb
                const float* w = B + k * N;
                for (int64_t n = 0; n < N; n += 16) {
                    const __mmask16 mk = tail_mask(N - n);
                    const char* p = (const char*)(w + n) + PREFETCH_BYTES;
                    for (int i = 0; i < 4; i++) _mm_prefetch(p + i * N * 4, _MM_HINT_T0);
                    const __m512 w0 = _mm512_maskz_loadu_ps(mk, w + n), w1 = _mm512_maskz_loadu_ps(mk, w + N + n),
                                 w2 = _mm512_maskz_loadu_ps(mk, w + 2 * N + n), w3 = _mm512_maskz_loadu_ps(mk, w + 3 * N + n);
                    for (int64_t m = 0; m < M; m++) {
                        const float* a = A + m * K + k;
                        __m512 acc = _mm512_maskz_loadu_ps(mk, yb + m * N + n);
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[0]), w0, acc);
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[1]), w1, acc);
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[2]), w2, acc);
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[3]), w3, acc);
                        _mm512_mask_storeu_ps(yb + m * N + n, mk, acc);
                    }
                }
            }
            for (; k < kb1; k++)
                for (int64_t m = 0; m < M; m++) {
                    const float a = A[m * K + k];
                    for (int64_t n = 0; n < N; n++) yb[m * N + n] += a * B[k * N + n];
                }
            for (int64_t i = 0; i < M * N; i++) y[i] += yb[i];
        }
        #pragma omp barrier
        const int64_t i0 = M * N * t / nt, i1 = M * N * (t + 1) / nt;
        for (int64_t i = i0; i < i1; i++) {
            float s = 0.f;
            for (int u = 0; u < nt; u++) s += part[u * stride + i];
            C[i] = beta == 0.f ? alpha * s : alpha * s + beta * C[i];  // beta 0: C may be uninitialised
        }
    }
}

// 16 elements of a row as float32: float32 as it is, bfloat16 (GreedyHead's table) as the
// top half of a float32; masked: only the lanes in mk, zeros elsewhere.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, p); }
inline __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load16(const uint16_t* p, __mmask16 mk) {
    uint16_t t[16] = {0};
    for (int i = 0; i < 16; i++) if (mk >> i & 1) t[i] = p[i];
    return load16(t);
}

// Dot products of one row b (K elements) with up to 4 float32 rows of A (lda = K), in a
// fixed order (16 lanes, then _mm512_reduce_add_ps): the greedy LM head (greedy_head.h) recomputes
// logits with this same function, so its values are bit-identical to the full head's.
// prefetch: every cache line of b, PREFETCH_BYTES / 4 elements ahead.
template <class T>
inline void dot_rows(const T* b, const float* A, int64_t K, int64_t mm, float* out, bool prefetch) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        if (prefetch && k * sizeof(T) % 64 == 0) _mm_prefetch((const char*)(b + k + PREFETCH_BYTES / 4), _MM_HINT_T0);
        const __m512 w = load16(b + k);
        for (int64_t i = 0; i < mm; i++) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(A + i * K + k), w, acc[i]);
    }
    if (k < K) {
        const __mmask16 mk = tail_mask(K - k);
        const __m512 w = load16(b + k, mk);
        for (int64_t i = 0; i < mm; i++) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, A + i * K + k), w, acc[i]);
    }
    for (int64_t i = 0; i < mm; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// C = alpha A B^T + beta C, A (M, K), B (N, K): N dot products of length K per row of A
// (the LM head: B is the (vocab, C) embedding). Each thread takes a contiguous block of
// B's rows; A (M x K floats) stays in L1.
inline void gemm_few_nt(int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
                        float alpha, float beta) {
    #pragma omp parallel
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t n0 = N * t / nt, n1 = N * (t + 1) / nt;
        float s[4];
        for (int64_t j = n0; j < n1; j++)
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const int64_t mm = std::min<int64_t>(4, M - m0);
                dot_rows(B + j * K, A + m0 * K, K, mm, s, m0 == 0);
                for (int64_t i = 0; i < mm; i++) {
                    float* c = C + (m0 + i) * N + j;
                    *c = beta == 0.f ? alpha * s[i] : alpha * s[i] + beta * *c;
                }
            }
    }
}

// A generation step's product: few rows of A against a weight big enough to be worth two
// cores. Returns false when the caller must use sgemm.
inline bool gemm_few(char ta, char tb, int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
                     float alpha, float beta) {
    if (ta != 'N' || M > FEW_ROWS || N * K < PARALLEL_MIN_WORK / 64) return false;
    if (tb == 'N') gemm_few_nn(M, N, K, A, B, C, alpha, beta);
    else gemm_few_nt(M, N, K, A, B, C, alpha, beta);
    return true;
}
#else
// compiled without AVX-512: sgemm for every product
inline bool gemm_few(char, char, int64_t, int64_t, int64_t, const float*, const float*, float*, float, float) {
    return false;
}
#endif

// --- any product -----------------------------------------------------------------
// C (M, N) = alpha op(A) op(B) + beta C, row-major, op = transpose when the flag is 'T'.
// C is cut into row blocks (tall C) or column blocks (wide C), 4 per thread, handed out
// dynamically, and each block is one single-threaded oneDNN sgemm: a thread that waits
// for its core takes fewer blocks, and oneDNN's own threading splits wide outputs poorly
// (docs/cpu_kernels.md).
inline void gemm(char ta, char tb, int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
                 float alpha = 1.f, float beta = 0.f) {
    if (gemm_few(ta, tb, M, N, K, A, B, C, alpha, beta)) return;
    const int64_t lda = ta == 'N' ? K : M, ldb = tb == 'N' ? N : K;
    // Also in parallel: a large B with few rows of A, where gemm_few cannot run. Streaming
    // the weight from memory bounds those, and two cores stream faster than one.
    const bool parallel = M * N * K >= PARALLEL_MIN_WORK || N * K >= PARALLEL_MIN_WORK / 16, rows = M >= N;
    const int64_t L = rows ? M : N, blocks = parallel ? std::max<int64_t>(1, std::min<int64_t>(4 * omp_get_max_threads(), L / 64)) : 1;
    OneThread serial(!parallel);
    #pragma omp parallel for schedule(dynamic) if (parallel)
    for (int64_t i = 0; i < blocks; i++) {
        int64_t a0 = L * i / blocks, a1 = L * (i + 1) / blocks;
        if (rows)
            dnnl_sgemm(ta, tb, a1 - a0, N, K, alpha, ta == 'N' ? A + a0 * lda : A + a0, lda, B, ldb, beta, C + a0 * N, N);
        else
            dnnl_sgemm(ta, tb, M, a1 - a0, K, alpha, A, lda, tb == 'N' ? B + a0 : B + a0 * ldb, ldb, beta, C + a0, N);
    }
}

}  // namespace gpt2cpu

#endif  // GPT2CPU_MATMUL_H
