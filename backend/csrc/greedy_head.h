// Greedy next tokens from the tied LM head through a bfloat16 copy of the embedding
// (GreedyHead in cpu_kernels.py): the same tokens as the full head, from about half the bytes.
#ifndef GPT2CPU_GREEDY_HEAD_H
#define GPT2CPU_GREEDY_HEAD_H

#include "matmul.h"

namespace gpt2cpu {

#ifdef __AVX512F__
// --- greedy LM head --------------------------------------------------------------------
// Greedy decoding needs only the argmax of h E^T over the vocabulary, but the full head
// streams the whole (V, C) float32 embedding E (154 MB for GPT-2) at every step. Here a
// bfloat16 copy Eb (half the bytes) gives approximate logits s~ with a proven error
// bound, and only the tokens that bound cannot rule out are recomputed exactly:
//   |exact fp32 logit - s~| <= |h| (e_v + g (2 |E_v| + e_v)) = bound_v,
// with e_v = |E_v - Eb_v| (row norm of the rounding error, computed when Eb is made),
// |h|, |E_v| Euclidean norms (Cauchy-Schwarz) and g = K u / (1 - K u), u = 2^-24, the
// float32 rounding of a length-K dot product (each of s~ and the exact logit has at most
// g |h| |row|). With L = max_v (s~_v - bound_v), a token whose s~_v + bound_v < L cannot
// be the argmax; the others are recomputed with dot_rows, exactly as the full head does
// for up to FEW_ROWS rows (gemm_few_nt), and the first largest wins (numpy's argmax). So
// the tokens equal the full head's.

// Eb (V, K) and per row c_v = e_v + g (2 |E_v| + e_v), so that bound_v = |h| c_v. Sums of
// squares run in float32 over 16 lanes (relative rounding < 1e-5 for any K here) and c_v
// is enlarged by 1e-4 to stay an upper bound. Returns false when E holds a non-finite
// value (no bound holds then; the caller uses the full head). K: a multiple of 16.
inline bool bf16_table(int64_t V, int64_t K, const float* E, uint16_t* Eb, float* c) {
    const double u = 5.9604644775390625e-08, g = K * u / (1 - K * u);  // u = 2^-24
    int bad = 0;
    #pragma omp parallel for schedule(static) reduction(|:bad)
    for (int64_t v = 0; v < V; v++) {
        __m512 err = _mm512_setzero_ps(), norm = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 w = _mm512_loadu_ps(E + v * K + k);
            const __m512i bits = _mm512_castps_si512(w);
            // round to nearest even: add 0x7FFF + the lowest kept bit, keep the top 16 bits
            const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)))), 16);
            _mm256_storeu_si256((__m256i*)(Eb + v * K + k), _mm512_cvtepi32_epi16(r));
            // inf / nan (exponent all ones), tested on the bits: -Ofast assumes finite floats
            const __m512i exp_mask = _mm512_set1_epi32(0x7F800000);
            if (_mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exp_mask), exp_mask)) bad = 1;
            const __m512 d = _mm512_sub_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(r, 16)));
            err = _mm512_fmadd_ps(d, d, err);
            norm = _mm512_fmadd_ps(w, w, norm);
        }
        const double e = std::sqrt((double)_mm512_reduce_add_ps(err)), n = std::sqrt((double)_mm512_reduce_add_ps(norm));
        c[v] = (float)((e + g * (2 * n + e)) * (1 + 1e-4));
    }
    return !bad;
}

// Next token per row of h (M, K); K a multiple of 16. tokens[m] = -1 when h's row is not
// finite (the caller uses the full head). counts[m]: tokens recomputed exactly.
inline void greedy_head(int64_t M, int64_t V, int64_t K, const float* h, const float* E, const uint16_t* Eb,
                        const float* c, int* tokens, int* counts) {
    std::vector<double> hn(M);  // |h_m|, enlarged like c_v
    std::vector<char> finite(M, 1);
    for (int64_t m = 0; m < M; m++) {
        double s = 0;
        for (int64_t k = 0; k < K; k++) {
            uint32_t bits; std::memcpy(&bits, h + m * K + k, 4);
            if ((bits & 0x7F800000u) == 0x7F800000u) finite[m] = 0;  // on the bits: -Ofast assumes finite
            s += (double)h[m * K + k] * h[m * K + k];
        }
        hn[m] = std::sqrt(s) * (1 + 1e-6);
    }
    const double tiny = 1e-30;  // products flushed to zero (-Ofast): at most K * 2^-126 per logit
    std::vector<float> approx((size_t)M * V);
    const int slots = omp_get_max_threads();
    std::vector<double> lower((size_t)slots * M, -INFINITY);  // per thread: max_v (s~ - bound)
    #pragma omp parallel num_threads(slots)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();  // the team may be smaller
        const int64_t v0 = V * t / nt, v1 = V * (t + 1) / nt;
        float s[4];
        for (int64_t v = v0; v < v1; v++)
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const int64_t mm = std::min<int64_t>(4, M - m0);
                dot_rows(Eb + v * K, h + m0 * K, K, mm, s, m0 == 0);
                for (int64_t i = 0; i < mm; i++) {
                    const int64_t m = m0 + i;
                    approx[m * V + v] = s[i];
                    lower[t * M + m] = std::max(lower[t * M + m], s[i] - hn[m] * c[v] - tiny);
                }
            }
    }
    #pragma omp parallel for schedule(dynamic)
    for (int64_t m = 0; m < M; m++) {
        if (!finite[m]) { tokens[m] = -1; counts[m] = 0; continue; }
        double L = -INFINITY;
        for (int u = 0; u < slots; u++) L = std::max(L, lower[u * M + m]);
        int best = -1, n = 0;
        float best_s = 0.f, s;
        for (int64_t v = 0; v < V; v++) {
            if (approx[m * V + v] + hn[m] * c[v] + tiny < L) continue;  // cannot be the argmax
            dot_rows(E + v * K, h + m * K, K, 1, &s, false);  // as gemm_few_nt computes it
            n++;
            if (best < 0 || s > best_s) { best = (int)v; best_s = s; }
        }
        tokens[m] = best; counts[m] = n;
    }
}
#else
// compiled without AVX-512: no table (GreedyHead.build returns None), and every row asks
// for the full head
inline bool bf16_table(int64_t, int64_t, const float*, uint16_t*, float*) { return false; }
inline void greedy_head(int64_t M, int64_t, int64_t, const float*, const float*, const uint16_t*, const float*,
                        int* tokens, int* counts) {
    std::fill(tokens, tokens + M, -1);
    std::fill(counts, counts + M, 0);
}
#endif

}  // namespace gpt2cpu

#endif  // GPT2CPU_GREEDY_HEAD_H
