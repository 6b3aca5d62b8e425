"""Fused CPU kernels for GPT-2 + LoRA in Jittor: attention, LoRA linear, LayerNorm, GELU, dropout.

Why (jt.profile_scope of a GPT-2 124M LoRA training step on real SQuAD batches, 2 cores):
- Jittor sends only 2-D matmuls to oneDNN on CPU. Attention's batched (B, H, T, T)
  matmuls ran as generated broadcast-multiply-reduce loops: about 50% of the step.
- Dropout drew its random numbers one by one from Jittor's generator: 6-9%.
- jt.matmul's gradient made a transposed copy of every frozen weight: ~4%.
- oneDNN's own threading splits wide outputs poorly (85-120 GFLOP/s on (768 x 768) @
  (768 x 2304) against ~350 when each core runs its own block), and Jittor's elementwise
  kernels (LayerNorm, GELU, bias and LoRA sums) run on one core.

What is here (C++ through jt.code, matmuls through oneDNN's dnnl_sgemm):
- Attention: one routine per (sequence, head) runs
      S = scale Q K^T -> causal + key-padding mask -> softmax -> dropout -> Y = P V
  on the (Tq, Tk) block while it sits in cache, in query blocks that skip the keys
  causality hides; another does the backward pass. q, k, v are read in place from
  c_attn's (rows, 3C) output through strides and y is written into (rows, C): no
  transposes. Layouts: padded (B, T) batches with a key mask, packed rows (the real
  tokens of each sequence one after the other, PackedRows), and a KV cache (KVCache).
- linear(): x W + b + LoRA's s (dropout(x) A^T) B^T as one kernel (bias and both products
  accumulate into y), with gradients that skip what nothing reads (frozen W and b).
- layer_norm(), gelu_tanh(): one pass each way, rows split over the cores.
- A generation step (a few rows times every weight) is bound by reading the weights from
  memory: gemm_few streams each weight once per thread at 22-25 GB/s (sgemm: ~14), and
  GreedyHead picks greedy tokens from a bfloat16 copy of the LM head's table with a
  proven error bound, recomputing in float32 the tokens the bound cannot rule out (the
  same tokens as the full head, from about half the bytes).
- Dropout with a counter-based hash of a seed and the element index: the backward pass
  regenerates the mask instead of storing it. Seeds come from Jittor's generator, so
  jt.set_seed still makes runs repeatable.
- Threads: each kernel splits its work in blocks handed out dynamically, and small
  kernels run on one thread (see PARALLEL_MIN_WORK): when another process keeps a core
  busy, every parallel region can wait a scheduler time slice for its second thread.

Numbers: the same float32 formulas as the plain Jittor code in GPT2_jittor.py and LoRA.py
(which remains the path when these kernels cannot run); masked scores are replaced, so a
fully masked query row gets uniform weights, as in transformers. tests/test_cpu_kernels.py
compares every kernel with that plain Jittor code, forward and backward.

Only for Jittor on CPU with oneDNN ("mkl" in Jittor); `available()` says whether they run.
"""
import numpy as np

from jittor_env import jt

_HEADER = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cfloat>
#include <vector>
#include <algorithm>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
// oneDNN's row-major sgemm, the function Jittor's own mkl_matmul op calls. Jittor has
// already loaded the library for its mkl ops, so the declaration is all we need.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
    const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

namespace gpt2cpu {

// Work below which a kernel runs on one thread: starting the other threads costs ~20 us on
// an idle machine, but up to a scheduler time slice (measured 4-8 ms per parallel region)
// when another process keeps a core busy. Small ops (LoRA's rank-8 products, a generation
// step's elementwise work) gain little from a second core anyway. A generation step's
// weight products are the exception (see gemm_few): one core reads ~13 GB/s, two ~27.
static const int64_t PARALLEL_MIN_WORK = 1 << 24;  // multiply-adds, or elements x 16

// Below that size, oneDNN must run single-threaded too: outside an active parallel region
// its sgemm starts its own threads (measured: 2.5 ms per tiny sgemm under load).
struct OneThread {
    int saved;
    explicit OneThread(bool on) : saved(on ? omp_get_max_threads() : 0) { if (on) omp_set_num_threads(1); }
    ~OneThread() { if (saved) omp_set_num_threads(saved); }
};

// --- dropout -----------------------------------------------------------------
// Element i is kept when hash(seed, i) >= threshold (probability 1 - p), then scaled by
// 1 / (1 - p). The hash is MurmurHash3's 32-bit finaliser (a bijection with full
// avalanche) of the counter mixed with two seed words: stateless, so it vectorises (32-bit
// multiplies; a 64-bit splitmix64 ran 3x slower), runs in parallel, and the backward pass
// regenerates exactly the forward mask.
static inline uint32_t hash32(uint32_t s0, uint32_t s1, uint32_t i) {
    uint32_t z = (i * 0x9E3779B9u + s0) ^ s1;
    z ^= z >> 16; z *= 0x85EBCA6Bu; z ^= z >> 13; z *= 0xC2B2AE35u; z ^= z >> 16;
    return z;
}

struct Drop {
    bool on; uint32_t s0, s1, threshold; float inv_keep;
    Drop(double p, const int* seed2) : on(p > 0), s0(0), s1(0), threshold(0), inv_keep(1.f) {
        if (!on) return;
        s0 = (uint32_t)seed2[0]; s1 = (uint32_t)seed2[1] * 0x01000193u;
        threshold = (uint32_t)std::min(4294967295.0, p * 4294967296.0);
        inv_keep = (float)(1.0 / (1.0 - p));
    }
    // dst[j] = src[j] / (1 - p) if element base + j is kept, else 0 (dst may be src)
    void apply(float* dst, const float* src, int64_t n, uint64_t base) const {
        // locals: stores to dst could alias the members, which would stop vectorisation
        const uint32_t a = s0, b = s1, t = threshold, i0 = (uint32_t)base;
        const float scale = inv_keep;
        for (int64_t j = 0; j < n; j++)
            dst[j] = hash32(a, b, i0 + (uint32_t)j) >= t ? src[j] * scale : 0.f;
    }
};

// --- attention -------------------------------------------------------------------
// One head of one sequence: Tq queries, which are the last Tq of the Tk key positions
// (Tq == Tk in training; Tq = new tokens with a KV cache). Query i may see keys
// j < causal_limit(i) whose kmask[j] is 1. Rows of q, k, v, y and the gradients are
// `ld` floats apart, so they can point into c_attn's (rows, 3C) output directly.
struct Head {
    int Tq = 0, Tk = 0;
    const float *q = nullptr, *k = nullptr, *v = nullptr; int64_t ldq = 0, ldk = 0, ldv = 0;
    float* y = nullptr; int64_t ldy = 0;
    float* P = nullptr;               // (Tq, Tk) probabilities before dropout, kept for backward;
                                      // nullptr: inference, a per-thread scratch block is used
    const float* kmask = nullptr;     // (Tk) 1 = real key, 0 = padding
    uint64_t drop_base = 0;           // dropout counter of P[0][0]
    const float* dy = nullptr; int64_t lddy = 0;                        // backward only
    float *dq = nullptr, *dk = nullptr, *dv = nullptr; int64_t lddq = 0, lddk = 0, lddv = 0;
    int causal_limit(int i) const { return std::min(Tk, i + (Tk - Tq) + 1); }
};

// Softmax of one score row in place, 0 outside [0, lim) and where kmask is 0. A row with
// no allowed key gets 1 / Tk everywhere: softmax over scores that were all replaced by
// the same value (transformers replaces masked scores with the float32 minimum).
static inline void softmax_row(float* s, const float* kmask, int lim, int Tk) {
    float mx = -FLT_MAX, any = 0.f, sum = 0.f;
    for (int j = 0; j < lim; j++) { mx = std::max(mx, kmask[j] > 0 ? s[j] : -FLT_MAX); any = std::max(any, kmask[j]); }
    if (any == 0.f) {
        for (int j = 0; j < Tk; j++) s[j] = 1.f / Tk;
        return;
    }
    // min(.., 0): a masked score may exceed the max; keep its exp finite before the * 0
    for (int j = 0; j < lim; j++) { float e = expf(std::min(s[j] - mx, 0.f)) * kmask[j]; s[j] = e; sum += e; }
    float inv = 1.f / sum;
    for (int j = 0; j < lim; j++) s[j] *= inv;
    for (int j = lim; j < Tk; j++) s[j] = 0.f;
}

// Queries are processed in blocks of QB rows. Causality lets block [i0, i1) skip the keys
// from its last row's causal limit on, which roughly halves attention's matmul work (it
// was ~9% of a training step). A fully masked row (a left pad) keeps 1/Tk on every key,
// as softmax over replaced scores gives, so a block with one needs all keys.
static const int QB = 64;

// keys that block [i0, i1) reads: up to its last row's causal limit, or all of them when
// its first row is fully masked (no real key before its causal limit)
static int key_extent(const Head& a, int i0, int i1, int first_real) {
    return a.causal_limit(i0) > first_real ? a.causal_limit(i1 - 1) : a.Tk;
}

static int first_real_key(const Head& a) {
    int j = 0;
    while (j < a.Tk && a.kmask[j] == 0.f) j++;
    return j;
}

// A few queries (a generation step): plain loops. An sgemm call per head and product
// costs more than the work here (measured: 0.6 s of 3.6 s generating 16 answers at once).
static void head_forward_few(const Head& a, int D, float scale) {
    for (int i = 0; i < a.Tq; i++) {
        const float* q = a.q + i * a.ldq;
        float* s = a.P + (int64_t)i * a.Tk;
        for (int j = 0; j < a.Tk; j++) {
            const float* k = a.k + j * a.ldk;
            float d = 0.f;
            for (int c = 0; c < D; c++) d += q[c] * k[c];
            s[j] = d * scale;
        }
        softmax_row(s, a.kmask, a.causal_limit(i), a.Tk);
        float* y = a.y + i * a.ldy;
        std::fill(y, y + D, 0.f);
        for (int j = 0; j < a.Tk; j++) {
            const float* v = a.v + j * a.ldv;
            const float p = s[j];
            for (int c = 0; c < D; c++) y[c] += p * v[c];
        }
    }
}

// y = dropout(P) v with P = softmax(mask(scale q k^T)); `dropped` holds Tq * Tk floats.
static void head_forward(const Head& a, int D, float scale, const Drop& drop, float* dropped) {
    if (a.Tq <= 4 && !drop.on) return head_forward_few(a, D, scale);
    const int first_real = first_real_key(a);
    for (int i0 = 0; i0 < a.Tq; i0 += QB) {
        const int i1 = std::min(a.Tq, i0 + QB), rows = i1 - i0, kend = key_extent(a, i0, i1, first_real);
        float* S = a.P + (int64_t)i0 * a.Tk;
        dnnl_sgemm('N', 'T', rows, kend, D, scale, a.q + i0 * a.ldq, a.ldq, a.k, a.ldk, 0.f, S, a.Tk);
        for (int i = i0; i < i1; i++) softmax_row(a.P + (int64_t)i * a.Tk, a.kmask, a.causal_limit(i), a.Tk);
        const float* A = S;
        if (drop.on) {
            for (int i = i0; i < i1; i++)
                drop.apply(dropped + (int64_t)i * a.Tk, a.P + (int64_t)i * a.Tk, kend, a.drop_base + (uint64_t)i * a.Tk);
            A = dropped + (int64_t)i0 * a.Tk;
        }
        dnnl_sgemm('N', 'N', rows, D, kend, 1.f, A, a.Tk, a.v, a.ldv, 0.f, a.y + i0 * a.ldy, a.ldy);
    }
}

// dq, dk, dv of head_forward from dy and the saved P; G and `dropped` hold Tq * Tk floats.
static void head_backward(const Head& a, int D, float scale, const Drop& drop, float* G, float* dropped) {
    const int first_real = first_real_key(a);
    for (int j = 0; j < a.Tk; j++) {  // dk and dv accumulate over query blocks
        std::fill(a.dk + j * a.lddk, a.dk + j * a.lddk + D, 0.f);
        std::fill(a.dv + j * a.lddv, a.dv + j * a.lddv + D, 0.f);
    }
    for (int i0 = 0; i0 < a.Tq; i0 += QB) {
        const int i1 = std::min(a.Tq, i0 + QB), rows = i1 - i0, kend = key_extent(a, i0, i1, first_real);
        float* Gb = G + (int64_t)i0 * a.Tk;
        const float* Pb = a.P + (int64_t)i0 * a.Tk;
        // G = dy v^T: gradient of the probabilities after dropout
        dnnl_sgemm('N', 'T', rows, kend, D, 1.f, a.dy + i0 * a.lddy, a.lddy, a.v, a.ldv, 0.f, Gb, a.Tk);
        const float* A = Pb;
        if (drop.on) {
            for (int i = i0; i < i1; i++) {
                const uint64_t base = a.drop_base + (uint64_t)i * a.Tk;
                drop.apply(dropped + (int64_t)i * a.Tk, a.P + (int64_t)i * a.Tk, kend, base);
                drop.apply(G + (int64_t)i * a.Tk, G + (int64_t)i * a.Tk, kend, base);  // now the gradient of P
            }
            A = dropped + (int64_t)i0 * a.Tk;
        }
        // dv += P_d^T dy
        dnnl_sgemm('T', 'N', kend, D, rows, 1.f, A, a.Tk, a.dy + i0 * a.lddy, a.lddy, 1.f, a.dv, a.lddv);
        // softmax backward: dS = P (dP - sum_j dP P) scale; 0 where the score was replaced
        for (int i = i0; i < i1; i++) {
            const float* p = a.P + (int64_t)i * a.Tk;
            float* g = G + (int64_t)i * a.Tk;
            int lim = a.causal_limit(i);
            float any = 0.f, r = 0.f;
            for (int j = 0; j < lim; j++) { any = std::max(any, a.kmask[j]); r += g[j] * p[j]; }
            if (any == 0.f) lim = 0;
            for (int j = 0; j < lim; j++) g[j] = p[j] * (g[j] - r) * scale;
            for (int j = lim; j < kend; j++) g[j] = 0.f;
        }
        dnnl_sgemm('N', 'N', rows, D, kend, 1.f, Gb, a.Tk, a.k, a.ldk, 0.f, a.dq + i0 * a.lddq, a.lddq);  // dq = dS k
        dnnl_sgemm('T', 'N', kend, D, rows, 1.f, Gb, a.Tk, a.q + i0 * a.ldq, a.ldq, 1.f, a.dk, a.lddk);  // dk += dS^T q
    }
}

// All heads in parallel, one (sequence, head) per task; oneDNN runs single-threaded
// inside the parallel region, and each task's (Tq, Tk) block stays in the core's cache.
static void run_heads(const std::vector<Head>& heads, int D, float scale, const Drop& drop, bool backward) {
    int64_t most = 1, work = 0, kv = 0;
    for (const Head& a : heads) {
        most = std::max(most, (int64_t)a.Tq * a.Tk);
        work += (int64_t)a.Tq * a.Tk * D;
        kv += (int64_t)a.Tk * D * 2;
    }
    // in parallel also when streaming the keys and values dominates (a generation step)
    const bool parallel = work >= PARALLEL_MIN_WORK / 4 || kv >= PARALLEL_MIN_WORK / 16;
    OneThread serial(!parallel);
    #pragma omp parallel if (parallel)
    {
        std::vector<float> G(backward ? most : 0), dropped(drop.on ? most : 0), scratch;
        #pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < (int64_t)heads.size(); t++) {
            if (backward) { head_backward(heads[t], D, scale, drop, G.data(), dropped.data()); continue; }
            Head a = heads[t];
            if (!a.P) {  // one (Tq, Tk) block per thread instead of a (B, H, Tq, Tk) array to fill
                scratch.resize(most);
                a.P = scratch.data();
            }
            head_forward(a, D, scale, drop, dropped.data());
        }
    }
}

// Padded batch: qkv (B, T, 3C), y (B, T, C), P (B, H, T, T); kmask (B, T) floats.
static std::vector<Head> padded_heads(int B, int T, int H, int C, const float* qkv, float* y, float* P,
                                      const float* kmask, const float* dy = nullptr, float* dqkv = nullptr) {
    std::vector<Head> heads;
    const int D = C / H;
    for (int b = 0; b < B; b++) for (int h = 0; h < H; h++) {
        Head a;
        a.Tq = a.Tk = T;
        int64_t row = (int64_t)b * T, off = (int64_t)h * D, bh = (int64_t)b * H + h;
        a.q = qkv + row * 3 * C + off; a.k = a.q + C; a.v = a.q + 2 * C; a.ldq = a.ldk = a.ldv = 3 * C;
        a.y = y ? y + row * C + off : nullptr; a.ldy = C;
        a.P = P + bh * T * T; a.kmask = kmask + row; a.drop_base = bh * T * T;
        if (dy) {
            a.dy = dy + row * C + off; a.lddy = C;
            a.dq = dqkv + row * 3 * C + off; a.dk = a.dq + C; a.dv = a.dq + 2 * C;
            a.lddq = a.lddk = a.lddv = 3 * C;
        }
        heads.push_back(a);
    }
    return heads;
}

// Packed rows: sequence s has Tk = seg[3s+1] rows from row seg[3s] of qkv (rows, 3C); its
// queries are its last Tq = seg[3s+2] rows, whose outputs fill y (sum Tq, C) in order.
// P holds, per sequence, (H, Tq, Tk). ones: at least max Tk floats of 1 (no padding here).
static std::vector<Head> packed_heads(int S, const int* seg, int H, int C, const float* qkv, float* y,
                                      float* P, const float* ones, const float* dy = nullptr, float* dqkv = nullptr) {
    std::vector<Head> heads;
    const int D = C / H;
    int64_t out_row = 0, p_off = 0;
    for (int s = 0; s < S; s++) {
        int64_t start = seg[3 * s], Tk = seg[3 * s + 1], Tq = seg[3 * s + 2], qrow = start + Tk - Tq;
        for (int h = 0; h < H && Tq > 0; h++) {  // no queries: no output, and dq = dk = dv = 0
            Head a;
            a.Tq = Tq; a.Tk = Tk;
            int64_t off = (int64_t)h * D;
            a.q = qkv + qrow * 3 * C + off; a.k = qkv + start * 3 * C + C + off; a.v = a.k + C;
            a.ldq = a.ldk = a.ldv = 3 * C;
            a.y = y ? y + out_row * C + off : nullptr; a.ldy = C;
            a.P = P + p_off; a.kmask = ones; a.drop_base = p_off;
            if (dy) {
                a.dy = dy + out_row * C + off; a.lddy = C;
                a.dq = dqkv + qrow * 3 * C + off; a.dk = dqkv + start * 3 * C + C + off; a.dv = a.dk + C;
                a.lddq = a.lddk = a.lddv = 3 * C;
            }
            heads.push_back(a);
            p_off += Tq * Tk;
        }
        out_row += Tq;
    }
    return heads;
}

// --- few rows: a generation step -------------------------------------------------
// x (4, 768) times a weight: each weight element is used by 4 multiply-adds, so streaming
// the weights from memory is the whole cost (~340 MB per GPT-2 124M step, ~154 MB more
// for the LM head). oneDNN's sgemm reaches ~14 GB/s on these shapes (column blocks read
// strided panels of B); one pass over contiguous rows per thread, with a software
// prefetch, reaches 22-26 GB/s on 2 cores (measured with 48 distinct 768 x 2304, 768 x
// 3072 and 3072 x 768 weights; the machine's read bandwidth is ~27 GB/s).
// Up to 16 rows (measured, 48 LoRA linears of GPT-2 124M: 8 rows 21 ms vs 39 through sgemm,
// 16 rows 33 vs 43; at 32 rows sgemm is faster, 49 vs 64).
static const int64_t FEW_ROWS = 16;
static const int PREFETCH_BYTES = 16384;  // ahead of the read position (measured: 8-16 KB best)

#ifdef __AVX512F__
static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// C = alpha A B + beta C, A (M, K), B (K, N). Each thread takes a contiguous block of B's
// rows (a K range), accumulates its partial C (M, N) in cache, and the partials are added
// in thread order.
static void gemm_few_nn(int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
                        float alpha, float beta) {
    const int slots = omp_get_max_threads();
    // 16 KB between the threads' partials: adjacent ones ran at 16-18 GB/s instead of 25
    // (measured; the cores' prefetchers reach into each other's lines)
    const int64_t stride = M * N + 4096;
    std::vector<float> part((size_t)slots * stride);
    #pragma omp parallel num_threads(slots)
    {
        // the team may be smaller than asked (a nested region runs on one thread)
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t k0 = K * t / nt, k1 = K * (t + 1) / nt;
        float* y = part.data() + t * stride;
        std::fill(y, y + M * N, 0.f);
        int64_t k = k0;
        for (; k + 4 <= k1; k += 4) {  // four rows of B per pass over y
            const float* w = B + k * N;
            for (int64_t n = 0; n < N; n += 16) {
                const __mmask16 mk = tail_mask(N - n);
                const char* p = (const char*)(w + n) + PREFETCH_BYTES;
                for (int i = 0; i < 4; i++) _mm_prefetch(p + i * N * 4, _MM_HINT_T0);
                const __m512 w0 = _mm512_maskz_loadu_ps(mk, w + n), w1 = _mm512_maskz_loadu_ps(mk, w + N + n),
                             w2 = _mm512_maskz_loadu_ps(mk, w + 2 * N + n), w3 = _mm512_maskz_loadu_ps(mk, w + 3 * N + n);
                for (int64_t m = 0; m < M; m++) {
                    const float* a = A + m * K + k;
                    __m512 acc = _mm512_maskz_loadu_ps(mk, y + m * N + n);
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(a[0]), w0, acc);
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(a[1]), w1, acc);
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(a[2]), w2, acc);
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(a[3]), w3, acc);
                    _mm512_mask_storeu_ps(y + m * N + n, mk, acc);
                }
            }
        }
        for (; k < k1; k++)
            for (int64_t m = 0; m < M; m++) {
                const float a = A[m * K + k];
                for (int64_t n = 0; n < N; n++) y[m * N + n] += a * B[k * N + n];
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
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const float* p, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, p); }
static inline __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 load16(const uint16_t* p, __mmask16 mk) {
    uint16_t t[16] = {0};
    for (int i = 0; i < 16; i++) if (mk >> i & 1) t[i] = p[i];
    return load16(t);
}

// Dot products of one row b (K elements) with up to 4 float32 rows of A (lda = K), in a
// fixed order (16 lanes, then _mm512_reduce_add_ps): the greedy LM head below recomputes
// logits with this same function, so its values are bit-identical to the full head's.
// prefetch: every cache line of b, PREFETCH_BYTES / 4 elements ahead.
template <class T>
static inline void dot_rows(const T* b, const float* A, int64_t K, int64_t mm, float* out, bool prefetch) {
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
static void gemm_few_nt(int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
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
static bool bf16_table(int64_t V, int64_t K, const float* E, uint16_t* Eb, float* c) {
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
static void greedy_head(int64_t M, int64_t V, int64_t K, const float* h, const float* E, const uint16_t* Eb,
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
#endif

// A generation step's product: few rows of A against a weight big enough to be worth two
// cores. Returns false when the caller must use sgemm.
static bool gemm_few(char ta, char tb, int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
                     float alpha, float beta) {
#ifdef __AVX512F__
    if (ta != 'N' || M > FEW_ROWS || N * K < PARALLEL_MIN_WORK / 64) return false;
    if (tb == 'N') gemm_few_nn(M, N, K, A, B, C, alpha, beta);
    else gemm_few_nt(M, N, K, A, B, C, alpha, beta);
    return true;
#else
    return false;
#endif
}

// --- matmul --------------------------------------------------------------------
// C (M, N) = op(A) op(B), row-major, op = transpose when the flag is 'T'. C is cut into
// row blocks (tall C) or column blocks (wide C), 4 per thread, handed out dynamically, and
// each block is one single-threaded oneDNN sgemm. Measured on 2 cores, (768 x 768) @
// (768 x 2304): 150-190 GFLOP/s this way under load from another process (a thread that
// waits for its core takes fewer blocks), ~350 idle; 85-120 with oneDNN's own threading
// (Jittor's mkl_matmul), which splits wide outputs poorly. PyTorch (MKL): 125-150 loaded.
static void gemm(char ta, char tb, int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
                 float alpha = 1.f, float beta = 0.f) {
    if (gemm_few(ta, tb, M, N, K, A, B, C, alpha, beta)) return;
    const int64_t lda = ta == 'N' ? K : M, ldb = tb == 'N' ? N : K;
    // Also in parallel: a large B with few rows of A, where gemm_few cannot run. Streaming
    // the weight from memory bounds those; two cores stream ~14 GB/s through sgemm, one ~7.5.
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

// --- LoRA linear -------------------------------------------------------------------
// y = x W + b + s (dropout(x) A^T) B^T, x (n, in), W (in, out), A (r, in), B (out, r).
// The bias is written first and both products accumulate into y (sgemm beta = 1), so y
// is the only (n, out) array: no separate bias / LoRA sums streaming through memory.
// The dropout of x is applied per block of 64 rows in a per-thread buffer, right before
// the rank-r product that is its only reader.
static const int64_t ROWS = 64;

// f(block, first row, rows, x rows after dropout) for each block of ROWS rows of x (n, in),
// in parallel; the dropped rows live in a per-thread buffer (x itself without dropout).
template <class F>
static void for_dropped_row_blocks(int64_t n, int64_t in, const float* x, const Drop& drop, F f) {
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

static void lora_forward(int64_t n, int64_t in, int64_t out, int64_t r, const float* x, const float* W,
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
static void lora_input_grad(int64_t n, int64_t in, int64_t out, int64_t r, const float* dy, const float* W,
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
static void lora_weight_grads(int64_t n, int64_t in, int64_t out, int64_t r, const float* dy, const float* x,
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

// --- LayerNorm and GELU: one pass over rows, in parallel (Jittor's own CPU kernels are
// single-threaded: LayerNorm and GELU were ~10% of a training step on 2 cores) ---------

// y = (x - mean) / sqrt(var + eps) * w + b per row of C, var = E[(x - mean)^2] (PyTorch's)
static void layer_norm(int64_t n, int64_t C, const float* x, const float* w, const float* b, float eps,
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
static void layer_norm_backward(int64_t n, int64_t C, const float* x, const float* w, const float* mean,
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

// GPT-2's GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); with dy, the
// gradient dy * gelu'(x) instead. tanhf's argument is clamped to [-15, 15]: tanh(15)
// rounds to 1 in float32, so no value changes.
static void gelu_tanh(int64_t n, const float* x, const float* dy, float* out) {
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
"""


def available():
    """True when the kernels can run: Jittor on CPU with oneDNN loaded."""
    from jittor import compile_extern
    return not jt.flags.use_cuda and getattr(compile_extern, "mkl_ops", None) is not None


def _seed():
    """2 x 24 random bits from Jittor's generator (so jt.set_seed makes dropout repeatable)."""
    return jt.randint(0, 1 << 24, (2,), "int32")


def _no_seed():
    return jt.zeros((2,), "int32")


# ----------------------------------------------------------------------------
# Dropout

_DROPOUT_SRC = r"""
    gpt2cpu::Drop drop(data["p"], (const int*)in1_p);
    int64_t n = in0->num;
    const float* x = (const float*)in0_p;
    // chunks of 4096: each thread hashes its own counters, so any split gives the same mask
    #pragma omp parallel for schedule(dynamic, 16) if (n * 16 >= gpt2cpu::PARALLEL_MIN_WORK)
    for (int64_t c = 0; c < n; c += 4096)
        drop.apply(out0_p + c, x + c, std::min<int64_t>(4096, n - c), (uint64_t)c);
"""


class _Dropout(jt.Function):
    def execute(self, x, p):
        self.seed, self.p = _seed(), p
        return jt.code(x.shape, "float32", [x, self.seed], cpu_header=_HEADER, cpu_src=_DROPOUT_SRC,
                       data={"p": float(p)})

    def grad(self, dy):  # the same mask and scale, regenerated from the seed
        return jt.code(dy.shape, "float32", [dy, self.seed], cpu_header=_HEADER, cpu_src=_DROPOUT_SRC,
                       data={"p": float(self.p)}), None


def dropout(x, p):
    """Inverted dropout of a float32 Var (training): zero with probability p, else x / (1 - p)."""
    return _Dropout()(x, p)


# ----------------------------------------------------------------------------
# Matmul

_GEMM_SRC = r"""
    const char ta = data["ta"] > 0 ? 'T' : 'N', tb = data["tb"] > 0 ? 'T' : 'N';
    int64_t M = out0_shape0, N = out0_shape1, K = ta == 'N' ? in0_shape1 : in0_shape0;
    gpt2cpu::gemm(ta, tb, M, N, K, (const float*)in0_p, (const float*)in1_p, out0_p);
"""


def _gemm(a, b, trans_a, trans_b):
    """op(a) @ op(b) for 2-D float32 a, b (see gpt2cpu::gemm)."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    return jt.code((m, n), "float32", [a, b], cpu_header=_HEADER, cpu_src=_GEMM_SRC,
                   data={"ta": float(trans_a), "tb": float(trans_b)})


class _MatMul(jt.Function):
    """a @ b (trans_b: a @ b^T); gradients are matmuls with transpose flags."""

    def execute(self, a, b, trans_b):
        self.a, self.b, self.trans_b = a, b, trans_b
        return _gemm(a, b, False, trans_b)

    def grad(self, dc):
        a, b = self.a, self.b
        # Jittor is lazy: a gradient nobody reads (a frozen weight's) is never computed.
        if self.trans_b:   # c = a b^T: da = dc b, db = dc^T a
            return _gemm(dc, b, False, False), _gemm(dc, a, True, False), None
        return _gemm(dc, b, False, True), _gemm(a, dc, True, False), None  # c = a b


def matmul(a, b, trans_b=False):
    """2-D a @ b, or a @ b^T with trans_b, in oneDNN with transpose-free gradients."""
    if not available():
        return jt.matmul(a, b.transpose(1, 0) if trans_b else b)
    return _MatMul()(a, b, trans_b)


class GreedyHead:
    """Greedy next tokens from the tied LM head, through a bfloat16 copy of the embedding.

    Each generation step's full head streams the (vocab, C) float32 table (154 MB for
    GPT-2): ~7.5 ms of a ~30 ms step at batch 4. The bfloat16 copy halves that; the
    tokens its error bound cannot rule out are recomputed in float32 exactly as the full
    head computes them, so the chosen tokens are the full head's (proof in greedy_head
    above). The copy (half the table's size) is made from the weight as it is when
    built; a changed weight (Jittor gives it a new id) needs a new GreedyHead.
    """

    def __init__(self, weight):
        V, C = weight.shape
        self.weight, self.weight_id = weight, weight.id
        self.table, self.bound, ok = jt.code(
            [(V, C), (V,), (1,)], ["uint16", "float32", "int32"], [weight], cpu_header=_HEADER, cpu_src=r"""
    #ifdef __AVX512F__
    out2_p[0] = gpt2cpu::bf16_table(in0_shape0, in0_shape1, in0_p, out0_p, out1_p);
    #else
    out2_p[0] = 0;  // compiled without AVX-512: the full head is used
    #endif
""")
        self.ok = bool(ok.item())
        self.counts = None  # per row, the tokens recomputed exactly at the last step

    @classmethod
    def build(cls, weight):
        """A GreedyHead for weight (vocab, C), or None where it cannot run: no CPU kernels,
        no AVX-512, C not a multiple of 16, or a non-finite weight."""
        if not available() or weight.shape[1] % 16:
            return None
        head = cls(weight)
        return head if head.ok else None

    # Above 8 rows the per-token bound checks cost more than the bytes saved (measured, GPT-2's
    # table: 4 rows 4.5 ms vs 7.4 for the full head, 8 rows 8.0 vs 8.8, 16 rows 17 vs 18, 32 rows 35 vs 23).
    MAX_ROWS = 8

    def next_tokens(self, h):
        """argmax over the vocabulary of h (B, C) @ weight^T, per row (numpy int64); None
        where the full head should run instead: more than MAX_ROWS rows, or a row of h that
        is not finite (no bound holds)."""
        if h.shape[0] > self.MAX_ROWS:
            return None
        if self.weight.id != self.weight_id:
            raise RuntimeError("GreedyHead: the weight changed since its bfloat16 copy was made; build a new one")
        B = h.shape[0]
        tokens, counts = jt.code(
            [(B,), (B,)], ["int32", "int32"], [h, self.weight, self.table, self.bound],
            cpu_header=_HEADER, cpu_src=r"""
    #ifdef __AVX512F__
    gpt2cpu::greedy_head(in0_shape0, in1_shape0, in1_shape1, in0_p, in1_p, in2_p, in3_p, out0_p, out1_p);
    #endif
""")
        tokens, self.counts = tokens.numpy(), counts.numpy()
        return None if (tokens < 0).any() else tokens.astype(np.int64)


_LORA_HEAD = r"""
    // (jt.code names its outputs out0, out1 and also `out`: hence n_in / n_out)
    int64_t n = in0_shape0, n_in = (int64_t)data["in"], n_out = (int64_t)data["out"], r = (int64_t)data["r"];
    gpt2cpu::Drop drop(data["p"], (const int*)in4_p);
    float s = (float)data["s"];
"""


class _LoRALinear(jt.Function):
    """x W + b + s (dropout(x) A^T) B^T; r = 0: x W + b (A and B are then placeholders)."""

    def execute(self, x, weight, bias, lora_A, B_full, seed, scaling, p_drop):
        n, (n_in, n_out) = x.shape[0], weight.shape
        r = lora_A.shape[0] if scaling else 0
        self.data = {"in": n_in, "out": n_out, "r": r, "s": float(scaling), "p": float(p_drop)}
        y, a = jt.code([(n, n_out), (n, max(r, 1))], ["float32", "float32"], [x, weight, bias, lora_A, seed, B_full],
                       cpu_header=_HEADER, data=self.data, cpu_src=_LORA_HEAD + r"""
    gpt2cpu::lora_forward(n, n_in, n_out, r, (const float*)in0_p, (const float*)in1_p, (const float*)in2_p,
                          (const float*)in3_p, (const float*)in5_p, s, drop, out0_p, out1_p);
""")
        self.saved = (x, weight, lora_A, B_full, seed, a)
        return y

    def grad(self, dy):
        x, weight, lora_A, B_full, seed, a = self.saved
        n_in, n_out, r = self.data["in"], self.data["out"], self.data["r"]
        # Jittor is lazy: of these, only what something reads is computed (no dW for a frozen W).
        dW, db = _gemm(x, dy, True, False), dy.sum(0)
        if not r:
            return _gemm(dy, weight, False, True), dW, db, None, None, None, None, None
        g = _gemm(dy, B_full, False, False) * self.data["s"]  # (n, r), shared by both kernels below
        dx = jt.code((x.shape[0], n_in), "float32", [dy, weight, lora_A, g, seed],
                     cpu_header=_HEADER, data=self.data, cpu_src=_LORA_HEAD + r"""
    gpt2cpu::lora_input_grad(n, n_in, n_out, r, (const float*)in0_p, (const float*)in1_p, (const float*)in2_p,
                             (const float*)in3_p, drop, out0_p);
""")
        dA, dB = jt.code([(r, n_in), (n_out, r)], ["float32", "float32"], [dy, x, a, g, seed],
                         cpu_header=_HEADER, data=self.data, cpu_src=_LORA_HEAD + r"""
    gpt2cpu::lora_weight_grads(n, n_in, n_out, r, (const float*)in0_p, (const float*)in1_p, (const float*)in2_p,
                               (const float*)in3_p, s, drop, out0_p, out1_p);
""")
        return dx, dW, db, dA, dB, None, None, None


def linear(x, weight, bias, lora_A=None, B_full=None, scaling=0.0, p_drop=0.0):
    """x (n, in) @ weight (in, out) + bias, plus LoRA's scaling * (dropout(x) lora_A^T) B_full^T."""
    if not available():
        y = jt.matmul(x, weight) + bias
        if lora_A is not None:
            drop = jt.nn.Dropout(p_drop, is_train=p_drop > 0)
            y = y + jt.matmul(jt.matmul(drop(x), lora_A.transpose(1, 0)), B_full.transpose(1, 0)) * scaling
        return y
    if lora_A is None:
        lora_A = B_full = jt.zeros((1, 1), "float32")
        scaling = 0.0
    seed = _seed() if p_drop > 0 else _no_seed()
    return _LoRALinear()(x, weight, bias, lora_A, B_full, seed, scaling, p_drop)


class _LayerNorm(jt.Function):
    def execute(self, x, weight, bias, eps):
        n, C = x.shape
        y, mean, rstd = jt.code([(n, C), (n,), (n,)], ["float32"] * 3, [x, weight, bias], cpu_header=_HEADER,
                                data={"eps": float(eps)}, cpu_src=r"""
    gpt2cpu::layer_norm(in0_shape0, in0_shape1, (const float*)in0_p, (const float*)in1_p, (const float*)in2_p,
                        (float)data["eps"], out0_p, out1_p, out2_p);
""")
        self.saved = (x, weight, mean, rstd)
        return y

    def grad(self, dy):
        x, weight, mean, rstd = self.saved
        dx = jt.code(x.shape, "float32", [x, weight, mean, rstd, dy], cpu_header=_HEADER, cpu_src=r"""
    gpt2cpu::layer_norm_backward(in0_shape0, in0_shape1, (const float*)in0_p, (const float*)in1_p,
                                 (const float*)in2_p, (const float*)in3_p, (const float*)in4_p, out0_p);
""")
        # weight / bias gradients (lazy: only computed when they train)
        xhat = (x - mean.unsqueeze(1)) * rstd.unsqueeze(1)
        return dx, (dy * xhat).sum(0), dy.sum(0), None


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dimension of a float32 x, as GPT2_jittor.LayerNorm computes it."""
    shape = x.shape
    return _LayerNorm()(x.reshape(-1, shape[-1]), weight, bias, eps).reshape(shape)


class _GeluTanh(jt.Function):
    def execute(self, x):
        self.x = x
        return jt.code(x.shape, "float32", [x], cpu_header=_HEADER, cpu_src=r"""
    gpt2cpu::gelu_tanh(in0->num, (const float*)in0_p, nullptr, out0_p);
""")

    def grad(self, dy):
        return jt.code(dy.shape, "float32", [self.x, dy], cpu_header=_HEADER, cpu_src=r"""
    gpt2cpu::gelu_tanh(in0->num, (const float*)in0_p, (const float*)in1_p, out0_p);
""")


def gelu_tanh(x):
    """GPT-2's tanh-approximated GELU (transformers' NewGELUActivation) of a float32 x."""
    return _GeluTanh()(x)


# ----------------------------------------------------------------------------
# Attention

_PADDED_SRC = r"""
    int B = in0_shape0, T = in0_shape1, C = in0_shape2 / 3, H = (int)data["H"];
    std::vector<float> kmask((size_t)B * T, 1.f);
    if (data["has_mask"] > 0) for (size_t i = 0; i < kmask.size(); i++) kmask[i] = ((const int*)in1_p)[i] != 0;
    gpt2cpu::Drop drop(data["p"], (const int*)in2_p);
    float scale = 1.f / sqrtf((float)(C / H));
"""
_PACKED_SRC = r"""
    int C = in0_shape1 / 3, H = (int)data["H"], S = in1_shape0;
    const int* seg = (const int*)in1_p;
    int most = 1;
    for (int s = 0; s < S; s++) most = std::max(most, seg[3 * s + 1]);
    std::vector<float> ones(most, 1.f);
    gpt2cpu::Drop drop(data["p"], (const int*)in2_p);
    float scale = 1.f / sqrtf((float)(C / H));
"""


class _PaddedAttention(jt.Function):
    def execute(self, qkv, mask, seed, n_head, p_drop):
        B, T, C3 = qkv.shape
        self.saved = (qkv, mask, seed)
        self.data = {"H": n_head, "p": float(p_drop), "has_mask": float(mask.ndim == 2)}
        y, self.probs = jt.code(
            [(B, T, C3 // 3), (B, n_head, T, T)], ["float32", "float32"], [qkv, mask, seed],
            cpu_header=_HEADER, data=self.data, cpu_src=_PADDED_SRC + r"""
    auto heads = gpt2cpu::padded_heads(B, T, H, C, (const float*)in0_p, out0_p, out1_p, kmask.data());
    gpt2cpu::run_heads(heads, C / H, scale, drop, false);
""")
        return y

    def grad(self, dy):
        qkv, mask, seed = self.saved
        dqkv = jt.code(
            qkv.shape, "float32", [qkv, mask, seed, self.probs, dy],
            cpu_header=_HEADER, data=self.data, cpu_src=_PADDED_SRC + r"""
    auto heads = gpt2cpu::padded_heads(B, T, H, C, (const float*)in0_p, nullptr, (float*)in3_p, kmask.data(),
                                       (const float*)in4_p, out0_p);
    gpt2cpu::run_heads(heads, C / H, scale, drop, true);
""")
        return dqkv, None, None, None, None


def padded_causal_attention(qkv, key_mask, n_head, p_drop=0.0):
    """Causal self-attention of a padded batch from c_attn's output qkv (B, T, 3C) -> (B, T, C).

    key_mask: (B, T), 1 = real token, or None; p_drop: dropout on the probabilities.
    """
    mask = key_mask.int32() if key_mask is not None else jt.zeros((1,), "int32")
    return _PaddedAttention()(qkv, mask, _seed() if p_drop > 0 else _no_seed(), n_head, p_drop)


class PackedRows:
    """The real tokens of a padded batch, row after row, with no padding between them.

    lengths[b] real tokens of row b; queries[b]: how many of its LAST tokens need an output
    (all of them, except in the last layer when only supervised positions are needed).
    Its attention() treats each row's tokens as one causal sequence, which is exactly what
    the padded batch computes for its real tokens: causal attention never looks past a
    token, and padded keys are masked, so dropping the pads changes no real output.
    """

    def __init__(self, lengths, queries=None):
        lengths = np.asarray(lengths, dtype=np.int64)
        queries = lengths if queries is None else np.asarray(queries, dtype=np.int64)
        self.lengths, self.queries = lengths, queries
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.n_rows, self.n_out = int(lengths.sum()), int(queries.sum())
        keep = lengths > 0
        self.seg = jt.array(np.stack([self.starts, lengths, queries], 1)[keep].astype(np.int32))
        self.n_probs = int((lengths * queries).sum())

    def query_rows(self):
        """Indices of the rows that get an output, in output order."""
        return np.concatenate([np.arange(s + n - q, s + n) for s, n, q in
                               zip(self.starts, self.lengths, self.queries)]).astype(np.int32)

    def with_queries(self, queries):
        return PackedRows(self.lengths, queries)


class _PackedAttention(jt.Function):
    def execute(self, qkv, layout, seed, n_head, p_drop):
        rows, C3 = qkv.shape
        self.saved = (qkv, layout, seed)
        self.data = {"H": n_head, "p": float(p_drop)}
        y, self.probs = jt.code(
            [(layout.n_out, C3 // 3), (n_head * layout.n_probs,)], ["float32", "float32"], [qkv, layout.seg, seed],
            cpu_header=_HEADER, data=self.data, cpu_src=_PACKED_SRC + r"""
    auto heads = gpt2cpu::packed_heads(S, seg, H, C, (const float*)in0_p, out0_p, out1_p, ones.data());
    gpt2cpu::run_heads(heads, C / H, scale, drop, false);
""")
        return y

    def grad(self, dy):
        qkv, layout, seed = self.saved
        dqkv = jt.code(
            qkv.shape, "float32", [qkv, layout.seg, seed, self.probs, dy],
            cpu_header=_HEADER, data=self.data, cpu_src=_PACKED_SRC + r"""
    if (data["partial"] > 0) memset(out0_p, 0, sizeof(float) * out0->num);  // rows with no query get dq = 0
    auto heads = gpt2cpu::packed_heads(S, seg, H, C, (const float*)in0_p, nullptr, (float*)in3_p, ones.data(),
                                       (const float*)in4_p, out0_p);
    gpt2cpu::run_heads(heads, C / H, scale, drop, true);
""".replace('data["partial"]', str(int(layout.n_out != layout.n_rows))))
        return dqkv, None, None, None, None


def packed_causal_attention(qkv, layout, n_head, p_drop=0.0):
    """Causal self-attention over packed rows: qkv (rows, 3C) -> (layout.n_out, C)."""
    return _PackedAttention()(qkv, layout, _seed() if p_drop > 0 else _no_seed(), n_head, p_drop)


_CACHED_SRC = r"""
    // in0 qkv (B, Tq, 3C) of the new tokens; in1, in2: k and v buffers (B, H, capacity, D)
    // whose first `past` positions are filled; in3 key mask (B, past + Tq) int32. Only the
    // last nq new tokens are queries (nq = Tq but for the last layer of a prompt pass).
    int B = in0_shape0, Tq = in0_shape1, C = in0_shape2 / 3, H = (int)data["H"], D = C / H, nq = out0_shape1;
    int64_t cap = in1_shape2, past = (int64_t)data["past"], Tk = past + Tq;
    const float* qkv = (const float*)in0_p;
    float *kb = (float*)in1_p, *vb = (float*)in2_p;
    if (data["append"] > 0) {  // write this step's keys and values into the buffers, in place
        for (int b = 0; b < B; b++) for (int t = 0; t < Tq; t++) for (int h = 0; h < H; h++) {
            const float* src = qkv + ((int64_t)b * Tq + t) * 3 * C + h * D;
            int64_t dst = (((int64_t)b * H + h) * cap + past + t) * D;
            std::copy(src + C, src + C + D, kb + dst);
            std::copy(src + 2 * C, src + 2 * C + D, vb + dst);
        }
    }
    std::vector<float> kmask((size_t)B * Tk);
    for (size_t i = 0; i < kmask.size(); i++) kmask[i] = ((const int*)in3_p)[i] != 0;
    std::vector<gpt2cpu::Head> heads;
    for (int b = 0; b < B; b++) for (int h = 0; h < H; h++) {
        gpt2cpu::Head a;
        a.Tq = nq; a.Tk = Tk;
        int64_t bh = (int64_t)b * H + h;
        a.q = qkv + ((int64_t)b * Tq + Tq - nq) * 3 * C + h * D; a.ldq = 3 * C;
        a.k = kb + bh * cap * D; a.v = vb + bh * cap * D; a.ldk = a.ldv = D;
        a.y = out0_p + (int64_t)b * nq * C + h * D; a.ldy = C;
        a.kmask = kmask.data() + (int64_t)b * Tk;  // P: scratch (no backward here)
        heads.push_back(a);
    }
    gpt2cpu::run_heads(heads, D, 1.f / sqrtf((float)D), gpt2cpu::Drop(0.0, nullptr), false);
    out1_p[0] = 0;
"""


def _key_mask(key_mask, B, Tk):
    return key_mask.int32() if key_mask is not None else jt.ones((B, Tk), "int32")


def cached_attention(qkv, k, v, key_mask, n_head):
    """Attention of new tokens against a (k, v) cache, for inference (no dropout, no gradient).

    qkv: (B, Tq, 3C) c_attn output of the new tokens (its q part is used); k, v: (B, H, Tk, D)
    cache that ends with the new tokens; key_mask: (B, Tk) or None. Returns (B, Tq, C).
    """
    B, Tq, C3 = qkv.shape
    Tk = k.shape[2]
    y, _ = jt.code([(B, Tq, C3 // 3), (1,)], ["float32", "int32"], [qkv, k, v, _key_mask(key_mask, B, Tk)],
                   cpu_header=_HEADER, cpu_src=_CACHED_SRC, data={"H": n_head, "past": Tk - Tq, "append": 0})
    return y


class KVCache:
    """One layer's keys and values during generation, in buffers of a fixed capacity.

    attend() writes the new tokens' keys and values into the buffers in place and attends
    over everything cached so far. A (k, v) tuple cache is concatenated instead, which
    copies the whole cache at every step: ~11 ms of an ~85 ms GPT-2 124M step for 4
    prompts of ~200 tokens (measured). Writing into a Jittor Var in place is outside
    Jittor's dataflow model, so every attend() also takes the previous one's output as
    an input: that orders the steps even if the caller does not sync between them.
    """

    def __init__(self, batch, n_head, head_dim, capacity):
        # uninitialised: attention only reads the positions written so far
        self.k = jt.empty((batch, n_head, capacity, head_dim), "float32")
        self.v = jt.empty((batch, n_head, capacity, head_dim), "float32")
        self.length, self.capacity, self.n_head = 0, capacity, n_head
        self.last = jt.zeros((1,), "int32")
        jt.sync([self.k, self.v, self.last])  # real buffers from here on

    def attend(self, qkv, key_mask, queries=None):
        """Attention output (B, queries, C) of the last `queries` (default all) new tokens of
        qkv (B, Tq, 3C), whose keys and values all join the cache; key_mask (B, length + Tq)."""
        B, Tq, C3 = qkv.shape
        if self.length + Tq > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {Tq} tokens > capacity {self.capacity}")
        y, self.last = jt.code(
            [(B, queries or Tq, C3 // 3), (1,)], ["float32", "int32"],
            [qkv, self.k, self.v, _key_mask(key_mask, B, self.length + Tq), self.last],
            cpu_header=_HEADER, cpu_src=_CACHED_SRC, data={"H": self.n_head, "past": self.length, "append": 1})
        self.length += Tq
        return y


# ----------------------------------------------------------------------------
# Drop-in pieces for the model code: the kernels where they run, plain Jittor elsewhere

class Dropout(jt.nn.Dropout):
    """jittor.nn.Dropout (same p / is_train), with the hash kernel above when it can run."""

    def execute(self, x):
        if self.is_train and 0 < self.p < 1 and available() and x.dtype == "float32":
            return dropout(x, self.p)
        return super().execute(x)
