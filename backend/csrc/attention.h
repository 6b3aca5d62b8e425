// Causal self-attention, forward and backward, one (sequence, head) at a time, for the
// three layouts of cpu_kernels.py: a padded batch, packed rows, and a KV cache.
#ifndef GPT2CPU_ATTENTION_H
#define GPT2CPU_ATTENTION_H

#include "common.h"

namespace gpt2cpu {

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
    const int* qkeys = nullptr;       // keyed dropout: the key of each query's token (row i: qkeys[i])
    int head = 0;                     // ... and this head's index
    const float* dy = nullptr; int64_t lddy = 0;                        // backward only
    float *dq = nullptr, *dk = nullptr, *dv = nullptr; int64_t lddq = 0, lddk = 0, lddv = 0;
    int causal_limit(int i) const { return std::min(Tk, i + (Tk - Tq) + 1); }
};

// Dropout of query row i's n probabilities: keyed by (the query's token, head) with the key
// positions as counters when the rows have keys, else the flat counters of P from drop_base.
inline void drop_probs(const Head& a, const Drop& drop, int i, float* dst, const float* src, int n) {
    if (a.qkeys) drop.row((uint32_t)a.qkeys[i]).row((uint32_t)a.head).apply(dst, src, n, 0);
    else drop.apply(dst, src, n, a.drop_base + (uint64_t)i * a.Tk);
}

// Softmax of one score row in place, 0 outside [0, lim) and where kmask is 0. A row with
// no allowed key gets 1 / Tk everywhere: softmax over scores that were all replaced by
// the same value (transformers replaces masked scores with the float32 minimum).
inline void softmax_row(float* s, const float* kmask, int lim, int Tk) {
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
// from its last row's causal limit on, which roughly halves attention's matmul work. A
// fully masked row (a left pad) keeps 1/Tk on every key, as softmax over replaced scores
// gives, so a block with one needs all keys.
static const int QB = 64;

// keys that block [i0, i1) reads: up to its last row's causal limit, or all of them when
// its first row is fully masked (no real key before its causal limit)
inline int key_extent(const Head& a, int i0, int i1, int first_real) {
    return a.causal_limit(i0) > first_real ? a.causal_limit(i1 - 1) : a.Tk;
}

inline int first_real_key(const Head& a) {
    int j = 0;
    while (j < a.Tk && a.kmask[j] == 0.f) j++;
    return j;
}

// A few queries (a generation step): plain loops. An sgemm call per head and product
// costs more than the work here (docs/cpu_kernels.md).
inline void head_forward_few(const Head& a, int D, float scale) {
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
inline void head_forward(const Head& a, int D, float scale, const Drop& drop, float* dropped) {
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
                drop_probs(a, drop, i, dropped + (int64_t)i * a.Tk, a.P + (int64_t)i * a.Tk, kend);
            A = dropped + (int64_t)i0 * a.Tk;
        }
        dnnl_sgemm('N', 'N', rows, D, kend, 1.f, A, a.Tk, a.v, a.ldv, 0.f, a.y + i0 * a.ldy, a.ldy);
    }
}

// dq, dk, dv of head_forward from dy and the saved P; G and `dropped` hold Tq * Tk floats.
inline void head_backward(const Head& a, int D, float scale, const Drop& drop, float* G, float* dropped) {
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
                drop_probs(a, drop, i, dropped + (int64_t)i * a.Tk, a.P + (int64_t)i * a.Tk, kend);
                drop_probs(a, drop, i, G + (int64_t)i * a.Tk, G + (int64_t)i * a.Tk, kend);  // now the gradient of P
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
inline void run_heads(const std::vector<Head>& heads, int D, float scale, const Drop& drop, bool backward) {
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

// Padded batch: qkv (B, T, 3C), y (B, T, C), P (B, H, T, T); kmask (B, T) floats; keys
// (B, T) of the tokens for keyed dropout, or nullptr.
inline std::vector<Head> padded_heads(int B, int T, int H, int C, const float* qkv, float* y, float* P,
                                      const float* kmask, const int* keys, const float* dy = nullptr,
                                      float* dqkv = nullptr) {
    std::vector<Head> heads;
    const int D = C / H;
    for (int b = 0; b < B; b++) for (int h = 0; h < H; h++) {
        Head a;
        a.Tq = a.Tk = T;
        int64_t row = (int64_t)b * T, off = (int64_t)h * D, bh = (int64_t)b * H + h;
        a.q = qkv + row * 3 * C + off; a.k = a.q + C; a.v = a.q + 2 * C; a.ldq = a.ldk = a.ldv = 3 * C;
        a.y = y ? y + row * C + off : nullptr; a.ldy = C;
        a.P = P + bh * T * T; a.kmask = kmask + row; a.drop_base = bh * T * T;
        if (keys) { a.qkeys = keys + row; a.head = h; }
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
// keys (rows) of the tokens for keyed dropout, or nullptr.
inline std::vector<Head> packed_heads(int S, const int* seg, int H, int C, const float* qkv, float* y,
                                      float* P, const float* ones, const int* keys, const float* dy = nullptr,
                                      float* dqkv = nullptr) {
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
            if (keys) { a.qkeys = keys + qrow; a.head = h; }
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

// KV cache: the last nq of the Tq new tokens of qkv (B, Tq, 3C) attend over key and value
// buffers kb, vb (B, H, cap, D) whose first Tk positions are filled; y (B, nq, C); kmask
// (B, Tk). Inference only: P is left to run_heads' per-thread scratch.
inline std::vector<Head> cached_heads(int B, int Tq, int nq, int H, int C, int Tk, int64_t cap, const float* qkv,
                                      const float* kb, const float* vb, const float* kmask, float* y) {
    std::vector<Head> heads;
    const int D = C / H;
    for (int b = 0; b < B; b++) for (int h = 0; h < H; h++) {
        Head a;
        a.Tq = nq; a.Tk = Tk;
        int64_t bh = (int64_t)b * H + h;
        a.q = qkv + ((int64_t)b * Tq + Tq - nq) * 3 * C + h * D; a.ldq = 3 * C;
        a.k = kb + bh * cap * D; a.v = vb + bh * cap * D; a.ldk = a.ldv = D;
        a.y = y + (int64_t)b * nq * C + h * D; a.ldy = C;
        a.kmask = kmask + (int64_t)b * Tk;
        heads.push_back(a);
    }
    return heads;
}

// --- one entry point per layout (the jt.code calls of cpu_kernels.py) -------------------

// kmask floats of n keys from int flags (1 = real token), or all ones when mask is nullptr
inline std::vector<float> key_mask(int64_t n, const int* mask) {
    std::vector<float> kmask((size_t)n, 1.f);
    if (mask) for (int64_t i = 0; i < n; i++) kmask[i] = mask[i] != 0;
    return kmask;
}

inline float attention_scale(int C, int H) { return 1.f / sqrtf((float)(C / H)); }

// Padded batch: qkv (B, T, 3C) -> y (B, T, C), keeping P (B, H, T, T); mask (B, T) or
// nullptr. With dy (B, T, C): the backward pass into dqkv (B, T, 3C) from the saved P.
inline void padded_attention(int B, int T, int C, int H, const int* mask, const Drop& drop, const float* qkv,
                             float* y, float* P, const float* dy = nullptr, float* dqkv = nullptr) {
    const std::vector<float> kmask = key_mask((int64_t)B * T, mask);
    run_heads(padded_heads(B, T, H, C, qkv, y, P, kmask.data(), drop.keys, dy, dqkv), C / H, attention_scale(C, H),
              drop, dy != nullptr);
}

// Packed rows: seg (S, 3) as in packed_heads, qkv (rows, 3C) -> y (sum Tq, C), keeping P.
// With dy (sum Tq, C): the backward pass into dqkv (rows, 3C). Rows that are no query get
// no dq from the heads (and a sequence without queries no dk, dv either), so dqkv is
// cleared first when there are such rows.
inline void packed_attention(int S, const int* seg, int64_t rows, int C, int H, const Drop& drop, const float* qkv,
                             float* y, float* P, const float* dy = nullptr, float* dqkv = nullptr) {
    int most = 1;
    int64_t queries = 0;
    for (int s = 0; s < S; s++) { most = std::max(most, seg[3 * s + 1]); queries += seg[3 * s + 2]; }
    const std::vector<float> ones(most, 1.f);  // no padding between packed rows
    if (dqkv && queries < rows) std::fill(dqkv, dqkv + rows * 3 * C, 0.f);
    run_heads(packed_heads(S, seg, H, C, qkv, y, P, ones.data(), drop.keys, dy, dqkv), C / H,
              attention_scale(C, H), drop, dy != nullptr);
}

// KV cache step: writes the keys and values of the Tq new tokens of qkv (B, Tq, 3C) into
// kb, vb (B, H, cap, D) after their first `past` positions, in place, then the last nq
// new tokens attend over all past + Tq positions: y (B, nq, C); mask (B, past + Tq).
inline void kv_cache_attend(int B, int Tq, int nq, int C, int H, int64_t past, int64_t cap, const float* qkv,
                            float* kb, float* vb, const int* mask, float* y) {
    const int D = C / H;
    for (int b = 0; b < B; b++) for (int t = 0; t < Tq; t++) for (int h = 0; h < H; h++) {
        const float* src = qkv + ((int64_t)b * Tq + t) * 3 * C + h * D;
        int64_t dst = (((int64_t)b * H + h) * cap + past + t) * D;
        std::copy(src + C, src + C + D, kb + dst);
        std::copy(src + 2 * C, src + 2 * C + D, vb + dst);
    }
    const int Tk = (int)(past + Tq);
    const std::vector<float> kmask = key_mask((int64_t)B * Tk, mask);
    run_heads(cached_heads(B, Tq, nq, H, C, Tk, cap, qkv, kb, vb, kmask.data(), y), D, attention_scale(C, H),
              Drop(0.0, nullptr), false);
}

}  // namespace gpt2cpu

#endif  // GPT2CPU_ATTENTION_H
