"""Fused CPU kernels for GPT-2 training and generation in Jittor (jt.code + oneDNN's sgemm).

Why: on CPU Jittor sends only 2-D matmuls to oneDNN. Attention's batched (B, H, T, T)
matmuls run as generated broadcast-multiply-reduce loops, and softmax, masking and
dropout each stream the (B, H, T, T) score tensor through memory several times. Measured
on a GPT-2 124M LoRA step (batch 4 x 384, 2 cores): the 4-D matmul loops took about 50% of
the step, the random numbers of dropout 6%. Here one C++ kernel per (batch, head) runs
  S = scale * Q K^T  ->  causal + key-padding mask  ->  softmax  ->  dropout  ->  Y = P V
with dnnl_sgemm for the two matmuls and the rest on the (T, T) block while it is in cache,
and one more kernel does the backward pass. Dropout masks come from a counter-based hash
(splitmix64 of seed and element index), so the backward pass regenerates the mask instead
of storing it, and no random numbers go through Jittor's (slow, sequential) generator.

Numbers: the same float32 formulas as the plain Jittor code in GPT2_jittor.py (masked
scores replaced, so a fully masked query row gets uniform weights, as in transformers);
tests/test_cpu_kernels.py compares both, forward and backward.

Only for CPU with oneDNN (Jittor's "mkl"); `available()` says whether they can run.
"""
import math

from jittor_env import jt

_HEADER = r"""
#include <cstdint>
#include <cmath>
#include <cfloat>
#include <vector>
#include <algorithm>
// oneDNN's sgemm (row-major), the function Jittor's own mkl_matmul op calls; the library
// is already loaded by Jittor's mkl ops, so declaring it is enough.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
    const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

namespace gpt2cpu {

// A (B, H, T, D) tensor stored with arbitrary strides: element (b, h, t, d) is
// p[b * sb + h * sh + t * st + d]. q, k and v can then be read straight out of c_attn's
// (B, T, 3C) output, and y written straight into (B, T, C), with no transposes.
struct View {
    float* p; int64_t sb, sh, st;
    float* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

// Dropout keeps element i when hash(seed, i) >= threshold: splitmix64's finaliser over a
// counter, a standard high-quality 64-bit mix; vectorises and needs no state.
static inline uint32_t hash32(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}
static inline uint32_t drop_threshold(double p) { return (uint32_t)std::min(4294967295.0, p * 4294967296.0); }

// Per query row i of a (Tq, Tk) block: keys [0, lim) pass the causal mask, and key j is
// real when kmask[j] == 1 (key padding). Returns false for a row with no allowed key.
static inline int causal_limit(int i, int Tq, int Tk) { return std::min(Tk, i + (Tk - Tq) + 1); }

// Softmax of one score row in place; disallowed entries become 0. A row with no allowed
// key gets 1 / Tk everywhere, as softmax over scores all replaced by the same value does.
static inline bool softmax_row(float* s, const float* kmask, int lim, int Tk) {
    float mx = -FLT_MAX, any = 0.f;
    for (int j = 0; j < lim; j++) { mx = std::max(mx, kmask[j] > 0 ? s[j] : -FLT_MAX); any = std::max(any, kmask[j]); }
    if (any == 0.f) {
        for (int j = 0; j < Tk; j++) s[j] = 1.f / Tk;
        return false;
    }
    float sum = 0.f;
    // min(.., 0): disallowed entries may exceed the max; keep their exp finite before * 0.
    for (int j = 0; j < lim; j++) { float e = expf(std::min(s[j] - mx, 0.f)) * kmask[j]; s[j] = e; sum += e; }
    float inv = 1.f / sum;
    for (int j = 0; j < lim; j++) s[j] *= inv;
    for (int j = lim; j < Tk; j++) s[j] = 0.f;
    return true;
}

// dropped[j] = keep(seed, base + j) ? src[j] / (1 - p) : 0
static inline void dropout_row(float* dst, const float* src, int n, uint64_t seed, uint64_t base,
                               uint32_t threshold, float inv_keep) {
    for (int j = 0; j < n; j++) dst[j] = hash32(seed, base + j) >= threshold ? src[j] * inv_keep : 0.f;
}

// key_mask: (B, Tk) int32 1 = real, or nullptr; kmask gets it as floats for row b.
static inline void key_row(float* kmask, const int* key_mask, int b, int Tk) {
    for (int j = 0; j < Tk; j++) kmask[j] = key_mask ? (float)(key_mask[(int64_t)b * Tk + j] != 0) : 1.f;
}

// Y = dropout(softmax(mask(scale Q K^T))) V for every (b, h); P keeps the probabilities
// before dropout (the backward pass needs them).
static void attention_forward(int B, int H, int Tq, int Tk, int D, View q, View k, View v, View y,
                              float* P, const int* key_mask, float scale, double p_drop, uint64_t seed) {
    const bool drop = p_drop > 0;
    const uint32_t threshold = drop_threshold(p_drop);
    const float inv_keep = drop ? (float)(1.0 / (1.0 - p_drop)) : 1.f;
    #pragma omp parallel
    {
        std::vector<float> kmask(Tk), dropped(drop ? (size_t)Tq * Tk : 0);
        #pragma omp for schedule(dynamic)
        for (int bh = 0; bh < B * H; bh++) {
            int b = bh / H, h = bh % H;
            float* S = P + (size_t)bh * Tq * Tk;
            dnnl_sgemm('N', 'T', Tq, Tk, D, scale, q.at(b, h), q.st, k.at(b, h), k.st, 0.f, S, Tk);
            key_row(kmask.data(), key_mask, b, Tk);
            for (int i = 0; i < Tq; i++)
                softmax_row(S + (size_t)i * Tk, kmask.data(), causal_limit(i, Tq, Tk), Tk);
            const float* A = S;
            if (drop) {
                for (int i = 0; i < Tq; i++)
                    dropout_row(dropped.data() + (size_t)i * Tk, S + (size_t)i * Tk, Tk, seed,
                                ((uint64_t)bh * Tq + i) * Tk, threshold, inv_keep);
                A = dropped.data();
            }
            dnnl_sgemm('N', 'N', Tq, D, Tk, 1.f, A, Tk, v.at(b, h), v.st, 0.f, y.at(b, h), y.st);
        }
    }
}

// Gradients of attention_forward with respect to q, k and v, given dY and the saved P.
static void attention_backward(int B, int H, int Tq, int Tk, int D, View q, View k, View v, View dy,
                               const float* P, const int* key_mask, float scale, double p_drop, uint64_t seed,
                               View dq, View dk, View dv) {
    const bool drop = p_drop > 0;
    const uint32_t threshold = drop_threshold(p_drop);
    const float inv_keep = drop ? (float)(1.0 / (1.0 - p_drop)) : 1.f;
    #pragma omp parallel
    {
        std::vector<float> kmask(Tk), G((size_t)Tq * Tk), dropped(drop ? (size_t)Tq * Tk : 0);
        #pragma omp for schedule(dynamic)
        for (int bh = 0; bh < B * H; bh++) {
            int b = bh / H, h = bh % H;
            const float* Pb = P + (size_t)bh * Tq * Tk;
            // dPd = dY V^T: gradient of the (dropped-out) probabilities
            dnnl_sgemm('N', 'T', Tq, Tk, D, 1.f, dy.at(b, h), dy.st, v.at(b, h), v.st, 0.f, G.data(), Tk);
            const float* A = Pb;
            if (drop) {
                for (int i = 0; i < Tq; i++) {
                    uint64_t base = ((uint64_t)bh * Tq + i) * Tk;
                    dropout_row(dropped.data() + (size_t)i * Tk, Pb + (size_t)i * Tk, Tk, seed, base, threshold, inv_keep);
                    float* g = G.data() + (size_t)i * Tk;
                    dropout_row(g, g, Tk, seed, base, threshold, inv_keep);
                }
                A = dropped.data();
            }
            // dV = Pd^T dY
            dnnl_sgemm('T', 'N', Tk, D, Tq, 1.f, A, Tk, dy.at(b, h), dy.st, 0.f, dv.at(b, h), dv.st);
            // softmax backward: dS = P * (dP - sum_j dP P) * scale; 0 where the score was masked
            key_row(kmask.data(), key_mask, b, Tk);
            for (int i = 0; i < Tq; i++) {
                const float* p = Pb + (size_t)i * Tk;
                float* g = G.data() + (size_t)i * Tk;
                int lim = causal_limit(i, Tq, Tk);
                float any = 0.f, r = 0.f;
                for (int j = 0; j < lim; j++) { any = std::max(any, kmask[j]); r += g[j] * p[j]; }
                if (any == 0.f) lim = 0;  // every score of this row was replaced: no gradient
                for (int j = 0; j < lim; j++) g[j] = p[j] * (g[j] - r) * scale;
                for (int j = lim; j < Tk; j++) g[j] = 0.f;
            }
            // dQ = dS K, dK = dS^T Q
            dnnl_sgemm('N', 'N', Tq, D, Tk, 1.f, G.data(), Tk, k.at(b, h), k.st, 0.f, dq.at(b, h), dq.st);
            dnnl_sgemm('T', 'N', Tk, D, Tq, 1.f, G.data(), Tk, q.at(b, h), q.st, 0.f, dk.at(b, h), dk.st);
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
    """A Var holding 2 x 24 random bits from Jittor's generator (so jt.set_seed governs dropout)."""
    return jt.randint(0, 1 << 24, (2,), "int32")


# Source snippets: views into the packed (B, T, 3C) c_attn output and the (B, T, C) result.
_PACKED_VIEWS = r"""
    int B = in0_shape0, T = in0_shape1, C3 = in0_shape2, H = (int)data["H"], C = C3 / 3, D = C / H;
    float* qkv = (float*)in0_p;
    gpt2cpu::View q{qkv, (int64_t)T * C3, D, C3}, k{qkv + C, (int64_t)T * C3, D, C3}, v{qkv + 2 * C, (int64_t)T * C3, D, C3};
    const int* key_mask = data["has_mask"] > 0 ? (const int*)in1_p : nullptr;
    const int* s = (const int*)in2_p;
    uint64_t seed = ((uint64_t)s[0] << 24) ^ (uint64_t)s[1];
    float scale = 1.f / sqrtf((float)D);
"""


class PackedCausalAttention(jt.Function):
    """Causal self-attention over c_attn's packed output qkv (B, T, 3C) -> (B, T, C).

    key_mask: (B, T) int32, 1 = real token, or None. p_drop: dropout on the probabilities.
    """

    def execute(self, qkv, key_mask, n_head, p_drop):
        B, T, C3 = qkv.shape
        has_mask = key_mask is not None
        mask = key_mask.int32() if has_mask else jt.zeros((1,), "int32")
        seed = _seed() if p_drop > 0 else jt.zeros((2,), "int32")
        data = {"H": n_head, "has_mask": float(has_mask), "p": float(p_drop)}
        y, probs = jt.code(
            [(B, T, C3 // 3), (B, n_head, T, T)], ["float32", "float32"], [qkv, mask, seed],
            cpu_header=_HEADER, data=data,
            cpu_src=_PACKED_VIEWS + r"""
    gpt2cpu::View y{out0_p, (int64_t)T * C, D, C};
    gpt2cpu::attention_forward(B, H, T, T, D, q, k, v, y, out1_p, key_mask, scale, data["p"], seed);
""")
        self.saved = (qkv, mask, seed, probs, data)
        return y

    def grad(self, dy):
        qkv, mask, seed, probs, data = self.saved
        dqkv = jt.code(
            qkv.shape, "float32", [qkv, mask, seed, probs, dy], cpu_header=_HEADER, data=data,
            cpu_src=_PACKED_VIEWS + r"""
    const float* P = (const float*)in3_p;
    gpt2cpu::View dy{(float*)in4_p, (int64_t)T * C, D, C};
    float* g = out0_p;
    gpt2cpu::View dq{g, (int64_t)T * C3, D, C3}, dk{g + C, (int64_t)T * C3, D, C3}, dv{g + 2 * C, (int64_t)T * C3, D, C3};
    gpt2cpu::attention_backward(B, H, T, T, D, q, k, v, dy, P, key_mask, scale, data["p"], seed, dq, dk, dv);
""")
        return dqkv, None, None, None


def packed_causal_attention(qkv, key_mask, n_head, p_drop=0.0):
    return PackedCausalAttention()(qkv, key_mask, n_head, p_drop)


def cached_attention(qkv, k, v, key_mask, n_head):
    """Inference attention of new tokens against a KV cache (no dropout, no gradient).

    qkv: (B, Tq, 3C) c_attn output of the new tokens (its q part is used); k, v: (B, H, Tk, D)
    cache including the new tokens; key_mask: (B, Tk) int32 or None. Returns (B, Tq, C).
    """
    B, Tq, C3 = qkv.shape
    Tk = k.shape[2]
    has_mask = key_mask is not None
    mask = key_mask.int32() if has_mask else jt.zeros((1,), "int32")
    y, _ = jt.code(
        [(B, Tq, C3 // 3), (B, n_head, Tq, Tk)], ["float32", "float32"], [qkv, k, v, mask],
        cpu_header=_HEADER, data={"H": n_head, "has_mask": float(has_mask)},
        cpu_src=r"""
    int B = in0_shape0, Tq = in0_shape1, C3 = in0_shape2, H = (int)data["H"], C = C3 / 3, D = C / H;
    int Tk = in1_shape2;
    gpt2cpu::View q{(float*)in0_p, (int64_t)Tq * C3, D, C3};
    gpt2cpu::View k{(float*)in1_p, (int64_t)H * Tk * D, (int64_t)Tk * D, D};
    gpt2cpu::View v{(float*)in2_p, (int64_t)H * Tk * D, (int64_t)Tk * D, D};
    gpt2cpu::View y{out0_p, (int64_t)Tq * C, D, C};
    const int* key_mask = data["has_mask"] > 0 ? (const int*)in3_p : nullptr;
    gpt2cpu::attention_forward(B, H, Tq, Tk, D, q, k, v, y, out1_p, key_mask, 1.f / sqrtf((float)D), 0.0, 0);
""")
    return y
