"""Where and how the model runs: the one place that chooses the implementation.

    model = runtime.prepare(LoRAGPT(GPT.from_pretrained("gpt2"), LoRAConfig()))

The model files (GPT2_jittor.py, LoRA.py) hold the plain formulas, which run anywhere
Jittor runs and are the reference. On CPU with oneDNN, cpu_kernels.py computes the same
formulas as fused kernels; prepare() switches a model to them by

- swapping each module in FUSED below for its subclass here, whose execute() calls the
  kernel (the parameters and everything else about the module stay as they are), and
- setting `fused` on the attention layers (their one switch, as nanoGPT's `flash`) and on
  the GPT (packed training on the real tokens only, in-place KV cache, LM head).

prepare(model, fused=False) switches back; tests compare both on the same weights.
"""
import contextlib

from jittor_env import jt
from jittor import nn
import cpu_kernels
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
    by cpu_kernels' hashed mask, which the backward pass regenerates)."""

    def execute(self, x):
        lora = ()
        if self.r and not self.merged:
            drop = self.lora_dropout
            lora = (self.lora_A, self.B_full(), self.scaling, drop.p if drop.is_train else 0.0)
        return cpu_kernels.linear(_flat(x), self.weight, self.bias, *lora).reshape(*x.shape[:-1], -1)


class FusedLayerNorm(LayerNorm):
    """LayerNorm.execute in one threaded pass each way."""

    def execute(self, x):
        return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps)


class FusedNewGELU(NewGELU):
    """NewGELU.execute in one threaded pass each way."""

    def execute(self, x):
        return cpu_kernels.gelu_tanh(x)


class FusedDropout(nn.Dropout):
    """Inverted dropout with cpu_kernels' counter-hash mask (regenerated in backward, not stored)."""

    def execute(self, x):
        if self.is_train and 0 < self.p < 1:
            return cpu_kernels.dropout(x, self.p)
        return super().execute(x)


# plain module class -> the subclass above that computes the same formula with cpu_kernels
FUSED = {Conv1D: FusedConv1D, LoRALinear: FusedLoRALinear, LayerNorm: FusedLayerNorm,
         NewGELU: FusedNewGELU, nn.Dropout: FusedDropout}
PLAIN = {fused: plain for plain, fused in FUSED.items()}


def fused_kernels_available():
    """cpu_kernels run here: Jittor on the CPU with oneDNN loaded (they are float32 only)."""
    return cpu_kernels.available()


def prepare(model, fused=None):
    """Switch `model` (a GPT or LoRAGPT) to the fused CPU kernels where they run (fused=None),
    or to the plain Jittor code (fused=False). Returns the model."""
    if fused is None:
        fused = fused_kernels_available()
    if fused and not fused_kernels_available():
        raise RuntimeError("fused CPU kernels need Jittor on the CPU with oneDNN "
                           "(install Debian's libdnnl-dev: `make setup` does it)")
    table = FUSED if fused else PLAIN
    for m in model.modules():
        if type(m) in table:
            m.__class__ = table[type(m)]
        if isinstance(m, (GPT, CausalSelfAttention)):
            m.fused = fused
    return model


def is_fused(model):
    """True when prepare() switched `model` to the fused kernels."""
    return any(isinstance(m, GPT) and m.fused for m in model.modules())


def dropout_keys(model, example_ids, attention_mask, seed):
    """A context for one training forward: where the fused kernels run, its dropout masks are
    keyed by (seed, token) (cpu_kernels.token_keys), the same however a batch is split; the
    plain path draws them from Jittor's generator in the batch's layout."""
    if is_fused(model):
        return cpu_kernels.token_keys(example_ids, attention_mask, seed)
    return contextlib.nullcontext()
