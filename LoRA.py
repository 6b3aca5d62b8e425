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

Variants (PEFT 0.21's semantics; docs/lora_variants.md):
- DoRA (Liu et al., 2024; use_dora): the output columns are rescaled by a trained magnitude
  m (lora_magnitude_vector, (out,), PEFT's name and key) over the column norm of the
  adapted weight, n_j = ||W[:, j] + scaling (B A)^T[:, j]|| in the Conv1D layout, detached
  from the graph (the paper's section 4.3, as PEFT does):
      y = x W + b + (m/n - 1) * (x' W) + (m/n) * scaling * x' A^T B^T,   x' = dropout(x)
  with x' = x when dropout is off (then y = (m/n) (x W + scaling x A^T B^T) + b). With
  dropout on, the base output is on the undropped x and the DoRA correction on the dropped
  x' (PEFT's DoraLinearVariant.forward). m starts at n, so training starts from the base.
- PiSSA / OLoRA (init "pissa", "pissa_niter_<N>", "olora"): A and B start as the top-r
  part of W (init_weights.residual_init) and the frozen base becomes the residual
  W - scaling (B0 A0)^T. `initial` keeps (A0, B0) so that lora_models saves the run as
  PEFT's path_initial_model_for_weight_conversion does: a plain LoRA for the original W.

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
    init: str = "kaiming"         # "kaiming" (PEFT default), "gaussian" (the seed's), "pissa",
                                  # "pissa_niter_<N>" or "olora" (these three change the base)
    use_rslora: bool = False      # scaling alpha / sqrt(r) instead of alpha / r
    qkv: tuple = (True, True, True)  # which of c_attn's q, k, v slices get an adapter
    rank_pattern: dict = field(default_factory=dict)   # PEFT: per-module r, by name suffix
    alpha_pattern: dict = field(default_factory=dict)  # PEFT: per-module alpha, by name suffix
    exclude_modules: tuple = None      # never adapted: names (suffix rule) or a regex (full match)
    layers_to_transform: tuple = None  # only these block indices (a list target_modules only)
    layers_pattern: tuple = None       # the name before the index ("h"); unset: the first number
    modules_to_save: tuple = None      # whole modules trained and saved beside the adapter (e.g. ln_f)
    use_dora: bool = False        # DoRA: a trained magnitude per output column (PEFT: use_dora)

    def __post_init__(self):
        # lists as tuples (a str stays: a regular expression); an int layers_to_transform is one layer
        for key in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
            if isinstance(getattr(self, key), (list, tuple, set)):
                setattr(self, key, tuple(getattr(self, key)))
        self.qkv = tuple(bool(q) for q in self.qkv)
        if self.init not in ("kaiming", "gaussian"):
            if self.init != "olora":
                init_weights.pissa_niter(self.init)  # a ValueError naming the accepted inits
            if not all(self.qkv):
                raise ValueError(f"LoRA init {self.init!r} decomposes the whole c_attn weight; it has no q/v-only form")
            if self.use_dora:
                # PEFT's conversion to a plain LoRA (save_pretrained with
                # path_initial_model_for_weight_conversion) drops the magnitude vector
                raise ValueError(f"LoRA init {self.init!r} with use_dora: PEFT cannot save this pair as an adapter "
                                 f"for the original base; choose one")
        if self.r < 0 or len(self.qkv) != 3 or not any(self.qkv):
            raise ValueError(f"bad LoRA config: r={self.r} (must be >= 0), qkv={self.qkv} (3 flags, one True)")


def lora_scaling(alpha, r, use_rslora):
    return alpha / (math.sqrt(r) if use_rslora else r)


class LoRALinear(nn.Module):
    """A frozen GPT-2 Conv1D projection plus a trainable low-rank update (see module doc)."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0, init="kaiming", use_rslora=False, enable=None,
                 seed=0, name="", use_dora=False):
        """seed and name (the module's name, e.g. "h.0.attn.c_attn") fix the initial A."""
        # Keep the base Conv1D's weight/bias under the same names, so the base key set
        # (and GPT.hf_state_dict) is unchanged by wrapping.
        self.weight, self.bias = base.weight, base.bias
        in_features, out_features = self.weight.shape
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.enable = tuple(enable) if enable is not None and not all(enable) else None
        self.merged = False
        self.initial = None  # (A0, B0) as NumPy for the inits that change the base
        self.lora_dropout = nn.Dropout(dropout)
        if r == 0:
            return
        k = sum(self.enable) if self.enable else 1
        if self.enable and out_features % len(self.enable):
            raise ValueError(f"cannot split {out_features} outputs into {len(self.enable)} equal slices")
        self.scaling = lora_scaling(alpha, r, use_rslora)
        b_rows = out_features // len(self.enable) * k if self.enable else out_features
        if init in ("kaiming", "gaussian"):
            self.lora_A = jt.array(init_weights.lora_A(seed, name, (r * k, in_features), r, init))
            self.lora_B = jt.zeros((b_rows, r), "float32")
        else:  # PiSSA / OLoRA: the adapter takes the top-r part of W, the base keeps the rest
            A0, B0, residual = init_weights.residual_init(self.weight.numpy(), r, self.scaling, init, seed, name)
            self.initial = (A0, B0)
            self.lora_A, self.lora_B = jt.array(A0), jt.array(B0)
            self.weight.update(jt.array(residual).cast(self.weight.dtype))
        if use_dora:  # m starts at the column norm: DoRA starts from the base model
            self.lora_magnitude_vector = self.weight_norm().detach()

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

    def weight_norm(self):
        """DoRA's n: the column norms of W + scaling (B A)^T, (out,), float32, no gradient
        (PEFT: DoraLinearLayer.get_weight_norm on the lora weight detached, then .detach())."""
        with jt.no_grad():
            W = self.weight.float32() + self.delta_weight().detach()
            return jt.sqrt((W * W).sum(0)).detach()

    def dora_scale(self):
        """m / n, (out,): the factor of each output column (gradient to m only)."""
        return self.lora_magnitude_vector / self.weight_norm()

    def dropout_on(self):
        """Whether lora_dropout changes its input now (PEFT: not nn.Identity and training)."""
        return self.lora_dropout.is_train and self.lora_dropout.p > 0

    def execute(self, x):
        # y = x W + b + scaling * dropout(x) A^T B^T   (Hu et al. eq. 3; PEFT's LoRA forward)
        x = as_dtype(x, self.weight.dtype)  # matmul inputs of one dtype: the frozen weight's
        if not self.r or self.merged:
            return x @ self.weight + self.bias
        A, B = as_dtype(self.lora_A, x.dtype), as_dtype(self.B_full(), x.dtype)
        if not self.use_dora:
            return x @ self.weight + self.bias + (self.lora_dropout(x) @ A.t() @ B.t()) * self.scaling
        base = x @ self.weight
        if self.dropout_on():  # PEFT: the correction on the dropped input, the base on x
            x = self.lora_dropout(x)
            base_dropped = x @ self.weight
        else:
            base_dropped = base
        scale = as_dtype(self.dora_scale(), x.dtype)
        return base + self.bias + (scale - 1) * base_dropped + scale * ((x @ A.t() @ B.t()) * self.scaling)

    def merge(self):
        """W <- W + scaling (B A)^T; DoRA: W <- (m/n) (W + scaling (B A)^T), n from the unmerged
        weight and kept for unmerge (PEFT's DoraLinearVariant.merge_unsafe / unmerge)."""
        if self.r and not self.merged:
            with jt.no_grad():
                merged = self.weight + self.delta_weight()
                if self.use_dora:  # NumPy, not a Var: a Var attribute would count as a parameter
                    self.merged_scale = self.dora_scale().numpy()
                    merged = merged * jt.array(self.merged_scale)
                self.weight.update(as_dtype(merged, self.weight.dtype).detach())
            self.merged = True

    def unmerge(self):
        if self.r and self.merged:
            with jt.no_grad():
                weight = self.weight / jt.array(self.merged_scale) if self.use_dora else self.weight
                self.weight.update(as_dtype(weight - self.delta_weight(), self.weight.dtype).detach())
            self.merged = False
