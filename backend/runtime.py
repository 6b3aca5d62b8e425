"""Where and how the model runs: the one place that chooses the device, the precision and
the implementation.

    model = runtime.prepare(LoRAGPT(GPT.from_pretrained("gpt2"), LoRAConfig()))            # auto
    model = runtime.prepare(model, device="cuda", precision="bf16")
    print(runtime.describe(model))

Device and precision (names, defaults and rules in mixed_precision.py): prepare() switches
Jittor to the device (jt.flags.use_cuda, global in Jittor: every op of the process follows
it), sets TF32 (jt.flags.use_tensorcore, CUDA only) and, for bf16/fp16, stores the frozen
base weights that feed matmuls (projections, embeddings) in half. LoRA A/B and LayerNorm stay
float32; the model files cast activations where the dtypes meet (GPT2_jittor.as_dtype), so
each matmul has inputs of one dtype and LayerNorm, softmax and the loss run in float32. In
fp32 those casts are no-ops and the code is exactly the float32 reference.

The model files (GPT2_jittor.py, LoRA.py) hold the plain formulas, which run anywhere
Jittor runs and are the reference. On CPU with oneDNN, cpu_kernels.py computes the same
formulas as fused kernels; prepare() switches a model to them by

- swapping each module in FUSED below for its subclass here, whose execute() calls the
  kernel (the parameters and everything else about the module stay as they are), and
- setting `fused` on the attention layers (their one switch, as nanoGPT's `flash`) and on
  the GPT (packed training on the real tokens only, in-place KV cache, LM head).

prepare(model, fused=False) switches back; tests compare both on the same weights. The fused
kernels run only on the CPU in fp32. Either way each nn.Dropout becomes a
token_dropout.KeyedDropout: inside dropout_keys() both paths draw the same token-keyed masks.
"""

import numpy as np

from backend import jittor_env
from backend.jittor_env import jt
from jittor import nn
from backend import cpu_kernels, mixed_precision, token_dropout
from backend.token_dropout import KeyedDropout
from GPT2_jittor import GPT, CausalSelfAttention, Conv1D, LayerNorm, NewGELU
from LoRA import LoRALinear


def _flat(x):
    return x.reshape(-1, x.shape[-1])  # the kernels take (rows, features)


class FusedConv1D(Conv1D):
    """Conv1D.execute: x W + b as one oneDNN product with the bias added in place."""

    def execute(self, x):
        return cpu_kernels.linear(_flat(x), self.weight, self.bias).reshape(*x.shape[:-1], -1)


class FusedLoRALinear(LoRALinear):
    """LoRALinear.execute: x W + b + scaling * dropout(x) A^T B^T as one kernel (dropout
    by cpu_kernels' hashed mask, which the backward pass regenerates). DoRA: that kernel's
    output rescaled per column, (m/n) (y - b) + b, without dropout; with dropout, as
    LoRALinear.execute: the base x W + b, and the dropped input (the same token-keyed mask
    as the plain path: this layer's own lora_dropout) through W and through A, B."""

    def execute(self, x):
        if self.r and not self.merged and self.use_dora:
            return self.dora_execute(x).reshape(*x.shape[:-1], -1)
        lora = ()
        if self.r and not self.merged:
            drop = self.lora_dropout
            lora = (self.lora_A, self.B_full(), self.scaling, drop.p if drop.is_train else 0.0)
        return cpu_kernels.linear(_flat(x), self.weight, self.bias, *lora).reshape(*x.shape[:-1], -1)

    def dora_execute(self, x):
        scale = self.dora_scale()
        if not self.dropout_on():
            y = cpu_kernels.linear(_flat(x), self.weight, self.bias, self.lora_A, self.B_full(), self.scaling)
            return (y - self.bias) * scale + self.bias
        dropped = _flat(self.lora_dropout(x))  # the mask drawn on x's own shape, as the plain path draws it
        x = _flat(x)
        no_bias = jt.zeros(self.bias.shape, "float32")
        base = cpu_kernels.linear(x, self.weight, self.bias)
        lora = (dropped @ self.lora_A.t()) @ self.B_full().t()
        return base + (scale - 1) * cpu_kernels.linear(dropped, self.weight, no_bias) + scale * (lora * self.scaling)


class FusedLayerNorm(LayerNorm):
    """LayerNorm.execute in one threaded pass each way."""

    def execute(self, x):
        return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps)


class FusedNewGELU(NewGELU):
    """NewGELU.execute in one threaded pass each way."""

    def execute(self, x):
        return cpu_kernels.gelu_tanh(x)


class FusedDropout(KeyedDropout):
    """Inverted dropout with cpu_kernels' counter-hash mask (regenerated in backward, not stored)."""

    def execute(self, x):
        if self.is_train and 0 < self.p < 1:
            return cpu_kernels.dropout(x, self.p)
        return super().execute(x)


# plain module class -> the subclass above that computes the same formula with cpu_kernels.
# Every nn.Dropout becomes a KeyedDropout first: token-keyed masks on both paths.
FUSED = {Conv1D: FusedConv1D, LoRALinear: FusedLoRALinear, LayerNorm: FusedLayerNorm,
         NewGELU: FusedNewGELU, KeyedDropout: FusedDropout}
PLAIN = {fused: plain for plain, fused in FUSED.items()}


def fused_kernels_available():
    """cpu_kernels run here: Jittor on the CPU with oneDNN loaded (they are float32 only)."""
    return cpu_kernels.available()


def cuda_status():
    """(usable, why not): whether Jittor can run on a GPU in this process."""
    if jt.has_cuda:
        return True, ""
    if not jittor_env.GPU_VISIBLE:
        return False, "nvidia-smi lists no GPU, so jittor_env.py imported Jittor without CUDA"
    return False, "a GPU is listed but Jittor was built without CUDA (no nvcc found, or nvcc_path set empty)"


def resolve(device="auto", precision="auto"):
    """(device, precision) this machine runs for the given choices ("auto" resolved)."""
    usable, why_not = cuda_status()
    # bf16 tensor cores from compute capability 8.0 (Ampere) on; Jittor lists the GPU's archs
    archs = list(getattr(jt.flags, "cuda_archs", []) or []) if usable else []
    return mixed_precision.resolve(device, precision, usable, why_not, bf16_supported=not archs or min(archs) >= 80)


def prepare(model, device="auto", precision="auto", fused=None):
    """Put `model` (a GPT or LoRAGPT) on `device` in `precision` (see the module doc), with the
    fused CPU kernels where they run (fused=None: CPU, fp32 and oneDNN), or the plain Jittor
    code (fused=False). Returns the model.

    Going back from half to float32 keeps the half-rounded weights: reload for exact fp32.
    """
    device, precision = resolve(device, precision)
    jt.flags.use_cuda = int(device == "cuda")
    if device == "cuda":
        # With half inputs cuBLAS uses tensor cores with fp32 accumulation at 0 already; a
        # non-zero value would switch it to fp16 accumulation (cublas_matmul_op.cc).
        jt.flags.use_tensorcore = int(precision == "tf32")
    half = precision in mixed_precision.HALF_DTYPES
    # Level 3 keeps every op in its inputs' dtype and, above all, casts each gradient to its
    # tensor's dtype (grad.cc): at level 0 a half tensor that met float32 (the residual add)
    # gets a float32 gradient, and the matmul behind it then has inputs of two dtypes, which
    # cuBLAS and oneDNN refuse. Levels >= 4 would turn float32 ops into half: not used.
    jt.flags.auto_mixed_precision_level = 3 if half else 0
    cast_base_weights(model, mixed_precision.HALF_DTYPES[precision] if half else "float32")
    can_fuse = device == "cpu" and precision == "fp32"
    if fused is None:
        fused = can_fuse and fused_kernels_available()
    if fused and not can_fuse:
        raise RuntimeError(f"fused CPU kernels run on the CPU in fp32 only, not with --device {device} "
                           f"--precision {precision}")
    if fused and not fused_kernels_available():
        raise RuntimeError("fused CPU kernels need Jittor on the CPU with oneDNN "
                           "(install Debian's libdnnl-dev: `make setup` does it)")
    table = FUSED if fused else PLAIN
    for m in model.modules():
        if type(m) is nn.Dropout:
            m.__class__ = KeyedDropout
        if type(m) in table:
            m.__class__ = table[type(m)]
        if isinstance(m, (GPT, CausalSelfAttention)):
            m.fused = fused
    return model


def cast_base_weights(model, dtype):
    """Store the base weights that feed matmuls (Conv1D / LoRALinear weight and bias, the token
    and position embeddings) in `dtype`, in place (the Vars keep their stop_grad). LayerNorm
    and the LoRA A/B weights are not touched: they stay float32. Nor is a weight that a LoRAGPT's
    adapter trains (modules_to_save's copy of a Conv1D): like LoRA's, AdamW updates it in float32;
    its matmul then runs in float32 (a Conv1D casts its input to its weight's dtype) and the next
    half layer casts back."""
    trained = {id(v) for v in getattr(model, "lora_state_dict", dict)().values()}  # a LoRAGPT's adapter
    for m in model.modules():
        if isinstance(m, (Conv1D, LoRALinear)):
            params = (m.weight, m.bias)
        elif isinstance(m, nn.Embedding):
            params = (m.weight,)
        else:
            continue
        for p in params:
            if p.dtype != dtype and (dtype == "float32" or id(p) not in trained):
                p.assign(rounded(p, dtype))


def rounded(x, dtype):
    """x cast to `dtype`, rounded to nearest even as torch and CUDA round. Jittor's CPU
    conversion to bfloat16 truncates (src/type/fp16_compute.h: `x >> 16`), so bfloat16 is
    rounded here, in float32 bits, before the (then exact) cast."""
    if dtype != "bfloat16":
        return x.cast(dtype)
    bits = x.float32().numpy().view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return jt.array(bits.astype(np.uint32).view(np.float32)).cast(dtype)


def is_fused(model):
    """True when prepare() switched `model` to the fused kernels."""
    return any(isinstance(m, GPT) and m.fused for m in model.modules())


def dropout_keys(model, example_ids, attention_mask, seed):
    """A context for one training forward: its dropout masks are keyed by (seed, token)
    (token_dropout.py), the same however a batch is split, and the same masks on the fused
    and the plain path."""
    return token_dropout.token_keys(example_ids, attention_mask, seed)
def precision_of(model):
    """The precision `model` runs in, read back from its weights and Jittor's flags."""
    gpt = next(m for m in model.modules() if isinstance(m, GPT))
    half = {dtype: name for name, dtype in mixed_precision.HALF_DTYPES.items()}
    dtype = str(gpt.wte.weight.dtype)
    if dtype in half:
        return half[dtype]
    return "tf32" if jt.flags.use_cuda and jt.flags.use_tensorcore else "fp32"


def describe(model):
    """One line for the start of a run: device, precision and implementation."""
    precision = precision_of(model)
    if precision in mixed_precision.HALF_DTYPES:
        detail = (f"frozen base weights {mixed_precision.HALF_DTYPES[precision]}; LoRA weights, AdamW state, "
                  f"LayerNorm, softmax and loss float32")
    else:
        detail = "float32, matmuls on TF32 tensor cores" if precision == "tf32" else "float32"
    impl = "fused CPU kernels" if is_fused(model) else "plain Jittor"
    return f"device {'cuda' if jt.flags.use_cuda else 'cpu'}, precision {precision} ({detail}), {impl}"
