"""LoRA (Hu et al., 2021) for GPT-2's Conv1D projections, numerically identical to PEFT.

      x ──► W (frozen, (in, out)) ──────────────────┐
      │                                             (+) ──► y = x W + b + scaling · B A x
      └─► dropout ─► A (r, in) ─► B (out, r) ─► ·scaling

- A starts kaiming-uniform with a = sqrt(5) (PEFT's default, bound 1/sqrt(in)) or gaussian
  N(0, (1/r)^2) (PEFT's "gaussian", the seed's choice), drawn from NumPy by
  init_weights.lora_A(seed, name, ...), so the PyTorch reference starts from the same A;
  B starts at zero, so training starts from exactly the base model.
- scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023).
- A and B are stored exactly as PEFT stores lora_A.weight / lora_B.weight, so adapters move
  between PEFT and us without conversion.
- enable=(True, False, True) on the fused c_attn gives q and v their own rank-r adapter and
  k none (loralib's MergedLinear enable_lora, the seed's qv_only): A is (r*k, in) for k
  enabled slices, B holds k blocks of (out/3, r). B_full() is the equivalent (out, r*k)
  block matrix, which is also how such an adapter is expressed in PEFT's format.
- merge() folds scaling * (B A)^T into W; unmerge() takes it out. Both are idempotent, and
  nothing merges as a side effect of eval() (a loralib pitfall).

execute() is the plain formula; on CPU, runtime.py swaps in cpu_kernels' fused version of it
(the base product, bias and both LoRA products as one kernel). In mixed precision the frozen
W is stored in half and A, B stay float32 (they train): the input is cast to W's dtype and A,
B are cast to it for their products (as torch.autocast does), so their gradients arrive in
float32 through the casts.
"""
import math
from dataclasses import dataclass, field

from backend.jittor_env import jt
from jittor import nn
from GPT2_jittor import as_dtype
from training import init_weights


@dataclass
class LoRAConfig:
    r: int = 8                    # rank; 0 = no adapter
    alpha: float = 16             # scaling numerator (PEFT: lora_alpha)
    dropout: float = 0.1          # dropout on the adapter's input (PEFT: lora_dropout)
    # Which modules (PEFT's rules on PEFT's names, e.g. "transformer.h.0.attn.c_attn"; lora_models.py,
    # docs/lora_targets_and_adapters.md): a tuple of names by the suffix rule ("c_proj" = both c_proj)
    # or a str, a regular expression that must match a whole name.
    target_modules: tuple = ("c_attn", "c_proj", "c_fc")
    init: str = "kaiming"         # "kaiming" (PEFT default) or "gaussian" (the seed's)
    use_rslora: bool = False      # scaling alpha / sqrt(r) instead of alpha / r
    qkv: tuple = (True, True, True)  # which of c_attn's q, k, v slices get an adapter
    rank_pattern: dict = field(default_factory=dict)   # PEFT: per-module r, by name suffix
    alpha_pattern: dict = field(default_factory=dict)  # PEFT: per-module alpha, by name suffix
    exclude_modules: tuple = None      # never adapted: names (suffix rule) or a regex (full match)
    layers_to_transform: tuple = None  # only these block indices (a list target_modules only)
    layers_pattern: tuple = None       # the name before the index ("h"); unset: the first number
    modules_to_save: tuple = None      # whole modules trained and saved beside the adapter (e.g. ln_f)

    def __post_init__(self):
        # lists as tuples (a str stays: a regular expression); an int layers_to_transform is one layer
        for key in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
            if isinstance(getattr(self, key), (list, tuple, set)):
                setattr(self, key, tuple(getattr(self, key)))
        self.qkv = tuple(bool(q) for q in self.qkv)
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRA init must be 'kaiming' or 'gaussian', not {self.init!r}")
        if self.r < 0 or len(self.qkv) != 3 or not any(self.qkv):
            raise ValueError(f"bad LoRA config: r={self.r} (must be >= 0), qkv={self.qkv} (3 flags, one True)")


def lora_scaling(alpha, r, use_rslora):
    return alpha / (math.sqrt(r) if use_rslora else r)


class LoRALinear(nn.Module):
    """A frozen GPT-2 Conv1D projection plus a trainable low-rank update (see module doc)."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0, init="kaiming", use_rslora=False, enable=None,
                 seed=0, name=""):
        """seed and name (the module's name, e.g. "h.0.attn.c_attn") fix the initial A."""
        # Keep the base Conv1D's weight/bias under the same names, so the base key set
        # (and GPT.hf_state_dict) is unchanged by wrapping.
        self.weight, self.bias = base.weight, base.bias
        in_features, out_features = self.weight.shape
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.enable = tuple(enable) if enable is not None and not all(enable) else None
        self.merged = False
        self.lora_dropout = nn.Dropout(dropout)
        if r == 0:
            return
        k = sum(self.enable) if self.enable else 1
        if self.enable and out_features % len(self.enable):
            raise ValueError(f"cannot split {out_features} outputs into {len(self.enable)} equal slices")
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.lora_A = jt.array(init_weights.lora_A(seed, name, (r * k, in_features), r, init))
        b_rows = out_features // len(self.enable) * k if self.enable else out_features
        self.lora_B = jt.zeros((b_rows, r), "float32")

    def B_full(self):
        """B as one (out, r*k) matrix: for sliced adapters, block i of B sits in the rows of
        enabled slice i and the columns of that slice's rank-r piece of A; zeros elsewhere."""
        if not self.enable:
            return self.lora_B
        out_features, r, k = self.weight.shape[1], self.r, sum(self.enable)
        d = out_features // len(self.enable)
        rows, i = [], 0
        for on in self.enable:
            if on:
                block = self.lora_B[i * d:(i + 1) * d]
                parts = ([jt.zeros((d, r * i))] if i else []) + [block] + \
                        ([jt.zeros((d, r * (k - i - 1)))] if i < k - 1 else [])
                rows.append(jt.concat(parts, dim=1) if len(parts) > 1 else block)
                i += 1
            else:
                rows.append(jt.zeros((d, r * k)))
        return jt.concat(rows, dim=0)

    def delta_weight(self):
        """scaling * (B A)^T in the Conv1D layout (in, out)."""
        return jt.matmul(self.B_full(), self.lora_A).transpose(1, 0) * self.scaling

    def execute(self, x):
        # y = x W + b + scaling * dropout(x) A^T B^T   (Hu et al. eq. 3; PEFT's LoRA forward)
        x = as_dtype(x, self.weight.dtype)  # matmul inputs of one dtype: the frozen weight's
        if not self.r or self.merged:
            return x @ self.weight + self.bias
        A, B = as_dtype(self.lora_A, x.dtype), as_dtype(self.B_full(), x.dtype)
        return x @ self.weight + self.bias + (self.lora_dropout(x) @ A.t() @ B.t()) * self.scaling

    def merge(self):
        if self.r and not self.merged:
            with jt.no_grad():
                self.weight.update(as_dtype(self.weight + self.delta_weight(), self.weight.dtype).detach())
            self.merged = True

    def unmerge(self):
        if self.r and self.merged:
            with jt.no_grad():
                self.weight.update(as_dtype(self.weight - self.delta_weight(), self.weight.dtype).detach())
            self.merged = False
