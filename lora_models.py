"""LoRAGPT: GPT-2 with LoRA adapters, file-compatible with Hugging Face PEFT both ways.

    base = GPT.from_pretrained("gpt2")
    model = LoRAGPT(base, LoRAConfig(r=8, alpha=16))      # same call signature as GPT
    model.print_trainable_parameters()
    model.save_lora_weights("out/")                       # adapter_model.safetensors + adapter_config.json
    model = LoRAGPT.from_pretrained("gpt2", "out/")       # ours or PEFT's adapter
    model.export_merged("merged/")                        # plain GPT-2 checkpoint for transformers

PEFT interchange (peft.PeftModel.from_pretrained(GPT2LMHeadModel, "out/") loads our
adapters, and we load PEFT's): keys `base_model.model.transformer.<module>.lora_A.weight`,
A (r, in), B (out, r), config fields as PEFT writes them. A q/v-only c_attn adapter (one
rank-r adapter per enabled slice, which PEFT cannot express directly) is written as the
exactly equivalent rank-(r*k) adapter on the whole c_attn: A stacked, B block-structured,
and rank_pattern / alpha_pattern entries for c_attn so its scaling is unchanged. It loads
back as that (equivalent) full-c_attn adapter.

Variants (docs/lora_variants.md): DoRA adds `<module>.lora_magnitude_vector` (out,) and
"use_dora": true, as PEFT writes them. A PiSSA / OLoRA run (whose base is the residual) is
saved as PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) saves it: the
plain rank-2r LoRA A' = [A; A0], B' = [B, -B0] with alpha doubled (scaling unchanged),
which applies to the ORIGINAL base: W_res + s B A = W + s (B A - B0 A0). An unconverted
PEFT PiSSA adapter (init_lora_weights "pissa") loads as PEFT loads it: the residual is
recomputed from the base it is given.
"""
import json
import math
import re
from pathlib import Path

import numpy as np

from backend.jittor_env import jt
from jittor import nn
from GPT2_jittor import GPT, Conv1D
from LoRA import LoRAConfig, LoRALinear
from model_utils import atomic_save_safetensors, atomic_write_json, load_safetensors
from backend import runtime
from training.init_weights import is_residual_init

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model.transformer."   # PeftModel -> LoraModel -> GPT2LMHeadModel
# adapter_config.json fields with values we do not implement; anything else there is ignored.
PEFT_UNSUPPORTED = {"bias": "none", "modules_to_save": None,
                    "layers_to_transform": None, "target_parameters": None}
# adapter_config.json init_lora_weights -> our LoRAConfig.init. An adapter's A and B are in the
# file, so a plain init only names how training started; "pissa" / "olora" also say that the
# base must be the residual (recomputed from the base here, as PEFT recomputes it on loading).
# Other PEFT inits (loftq, eva, corda, orthogonal, lora_ga, mica, and the random
# "pissa_niter_N", whose residual cannot be recomputed) are refused by name.
PEFT_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def pattern_value(patterns, name, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a suffix of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def gpt_projections(gpt):
    """(name, parent module, attribute, module) for every Conv1D/LoRALinear projection of a GPT."""
    for i, block in enumerate(gpt.h):
        for sub_name, sub in (("attn", block.attn), ("mlp", block.mlp)):
            for attr in ("c_attn", "c_proj", "c_fc"):
                module = getattr(sub, attr, None)
                if isinstance(module, (Conv1D, LoRALinear)):
                    yield f"h.{i}.{sub_name}.{attr}", sub, attr, module


def target_matches(name, targets):
    """PEFT's target_modules rule for a list: the full name, or a '.'-separated suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


class LoRAGPT(nn.Module):
    def __init__(self, base_model, lora_config=None, seed=0):
        """seed: the initial A matrices (init_weights.lora_A; the same for the same seed on every MPI rank)."""
        self.model = base_model
        self.lora_config = lora_config = lora_config or LoRAConfig()
        self.lora_modules = {}  # module name (as in GPT, e.g. "h.0.attn.c_attn") -> LoRALinear
        for name, parent, attr, module in self._projections():
            if not target_matches(name, lora_config.target_modules):
                continue
            r = pattern_value(lora_config.rank_pattern, name, lora_config.r)
            alpha = pattern_value(lora_config.alpha_pattern, name, lora_config.alpha)
            if r == 0:
                continue  # r = 0: no adapter on this module
            wrapped = LoRALinear(module, r, alpha, lora_config.dropout, lora_config.init,
                                 lora_config.use_rslora,
                                 enable=lora_config.qkv if attr == "c_attn" else None, seed=seed, name=name,
                                 use_dora=lora_config.use_dora)
            setattr(parent, attr, wrapped)
            self.lora_modules[name] = wrapped
        found = {t for t in lora_config.target_modules
                 if any(target_matches(n, [t]) for n, *_ in self._projections())}
        missing = [t for t in lora_config.target_modules if t not in found]
        if missing:
            raise ValueError(f"LoRA target modules {missing} not found in GPT-2 "
                             f"(its projections: c_attn, attn.c_proj, c_fc, mlp.c_proj)")
        self.mark_only_lora_as_trainable()
        if base_model.fused:  # the new LoRA layers run like the rest of the model
            runtime.prepare(self)

    def _projections(self):
        return gpt_projections(self.model)

    # --- what trains ------------------------------------------------------------

    def mark_only_lora_as_trainable(self):
        """Freeze every base weight, train every lora_A / lora_B.

        Per-Var stop_grad, not Module.requires_grad_(False): the latter runs the whole
        module under no_grad and would cut the gradient to the adapters inside it too.
        GPT.train()/eval() never touch these flags (see GPT2_jittor.py).
        """
        for p in self.model.hf_state_dict().values():
            p.stop_grad()
        for p in self.trainable_parameters():
            p.start_grad()

    def lora_state_dict(self):
        """{"h.0.attn.c_attn.lora_A": Var, ...}: the trainable adapter tensors, our names
        (lora_A, lora_B, and DoRA's lora_magnitude_vector)."""
        return {f"{name}.{key}": p for name, m in self.lora_modules.items() for key, p in m.lora_parameters().items()}

    def trainable_parameters(self):
        return list(self.lora_state_dict().values())

    def loraplus_param_groups(self, lr, loraplus_lr_ratio, weight_decay):
        """LoRA+ (Hayou et al., 2024): PEFT's create_loraplus_optimizer groups for GPT-2, as
        optimizer param groups: A at lr, B and every 1-D tensor (DoRA's magnitude) at
        lr x loraplus_lr_ratio, both with weight_decay (PEFT's loraplus_weight_decay; the
        training scripts pass --weight-decay). "lr_ratio" lets a schedule scale both."""
        groups = [{"params": [], "lr": lr, "lr_ratio": 1.0, "weight_decay": weight_decay},
                  {"params": [], "lr": lr * loraplus_lr_ratio, "lr_ratio": loraplus_lr_ratio,
                   "weight_decay": weight_decay}]
        for name, p in self.lora_state_dict().items():
            groups[name.endswith(".lora_B") or len(p.shape) == 1]["params"].append(p)
        return groups

    def print_trainable_parameters(self):
        """PEFT's line: trainable params: N || all params: M || trainable%: P."""
        trainable = sum(int(np.prod(p.shape)) for p in self.trainable_parameters())
        total = trainable + sum(int(np.prod(p.shape)) for p in self.model.hf_state_dict().values())
        line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        print(line)
        return line

    # --- same interface as GPT --------------------------------------------------

    def execute(self, idx, targets=None, attention_mask=None):
        return self.model(idx, targets, attention_mask=attention_mask)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def config(self):
        return self.model.config

    # --- merge ------------------------------------------------------------------

    def merge(self):
        for m in self.lora_modules.values():
            m.merge()

    def unmerge(self):
        for m in self.lora_modules.values():
            m.unmerge()

    def export_merged(self, path):
        """A plain Hugging Face GPT-2 checkpoint with the adapters folded in."""
        was_merged = [m.merged for m in self.lora_modules.values()]
        self.merge()
        self.model.save_pretrained(path)
        for m, merged in zip(self.lora_modules.values(), was_merged):
            if not merged:
                m.unmerge()

    # --- PEFT-format adapters ---------------------------------------------------

    def peft_adapter(self):
        """(tensors, adapter_config) exactly as PEFT's save_pretrained writes them (PiSSA /
        OLoRA: with path_initial_model_for_weight_conversion, see the module doc)."""
        cfg = self.lora_config
        tensors, rank_pattern, alpha_pattern = {}, dict(cfg.rank_pattern), dict(cfg.alpha_pattern)
        converted = is_residual_init(cfg.init)
        for name, m in self.lora_modules.items():
            A, B = m.lora_A.numpy(), m.B_full().numpy()
            if converted:  # W_res + s B A = W + s [B, -B0] [A; A0]: a plain LoRA on the original W
                A, B = np.concatenate([A, m.initial[0]], 0), np.concatenate([B, -m.initial[1]], 1)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
            if m.use_dora:
                tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.numpy()
            if A.shape[0] != m.r * (2 if converted else 1):  # a q/v-style adapter, exported as its rank-(r*k) equivalent
                r_out = A.shape[0]
                rank_pattern[name] = r_out
                alpha_pattern[name] = m.scaling * (np.sqrt(r_out) if cfg.use_rslora else r_out)
        r, alpha, init = cfg.r, cfg.alpha, True if cfg.init == "kaiming" else cfg.init
        if converted:  # PEFT's conversion: rank x 2 and alpha x 2 (rsLoRA: x sqrt 2), the same scaling
            grow = math.sqrt(2) if cfg.use_rslora else 2
            r, alpha, init = 2 * r, alpha * grow, True
            rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
            alpha_pattern = {k: v * grow for k, v in alpha_pattern.items()}
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_modules),
            "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
            "use_rslora": cfg.use_rslora, "bias": "none", "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "init_lora_weights": init,
            "base_model_name_or_path": getattr(self, "base_model_name_or_path", None),
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "use_dora": cfg.use_dora, "revision": None,
        }
        return tensors, config

    def save_lora_weights(self, path):
        """adapter_model.safetensors + adapter_config.json in PEFT's layout, written atomically."""
        tensors, config = self.peft_adapter()
        path = Path(path)
        atomic_save_safetensors(path / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
        atomic_write_json(path / ADAPTER_CONFIG, config)

    def load_lora_weights(self, path):
        """Load adapter weights saved by PEFT or by us into this model, strictly checked."""
        path = Path(path)
        config = read_adapter_config(path)
        cfg = self.lora_config
        if float(config["lora_alpha"]) != float(cfg.alpha) or int(config["r"]) != cfg.r:
            raise ValueError(f"{path / ADAPTER_CONFIG}: r={config['r']}, lora_alpha={config['lora_alpha']} "
                             f"but this model has r={cfg.r}, alpha={cfg.alpha}")
        tensors = read_adapter_tensors(path)
        want = {}
        for name, m in self.lora_modules.items():
            if m.enable:
                raise ValueError("load_lora_weights needs a model with full c_attn adapters; "
                                 "use LoRAGPT.from_pretrained, which builds one from the adapter config")
            want.update({f"{name}.{key}": p for key, p in m.lora_parameters().items()})
        missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or unexpected:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: does not match the LoRA layers of this model "
                             f"(targets {list(cfg.target_modules)}, {self.model.config.n_layer} layers): "
                             f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                             f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        for key, var in want.items():
            if tuple(tensors[key].shape) != tuple(var.shape):
                raise ValueError(f"{path / ADAPTER_WEIGHTS}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"expected {tuple(var.shape)}: the adapter was made for a different "
                                 f"base model (n_embd={self.model.config.n_embd}) or rank")
        for key, var in want.items():
            var.update(jt.array(tensors[key].astype(np.float32)))
        return self

    @classmethod
    def from_pretrained(cls, base, adapter_dir, dropout=None):
        """Base GPT-2 (a folder or a GPT) + an adapter folder saved by PEFT or by us."""
        config = read_adapter_config(Path(adapter_dir))  # the cheap checks first
        base_model = base if isinstance(base, GPT) else GPT.from_pretrained(base)
        # Every adapter's rank in the config must be the rank of its tensors before anything is
        # built, so no config can make the model larger than the weight file (load_lora_weights
        # then checks every key and shape).
        tensors, file = read_adapter_tensors(Path(adapter_dir)), Path(adapter_dir) / ADAPTER_WEIGHTS
        for name, *_ in gpt_projections(base_model):
            if target_matches(name, config["target_modules"]):
                r = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
                A = tensors.get(f"{name}.lora_A")
                if A is None or A.ndim != 2 or A.shape[0] != r:
                    raise ValueError(f"{file}: {name}.lora_A is {'missing' if A is None else tuple(A.shape)}, "
                                     f"expected rank {r} from {ADAPTER_CONFIG}")
        try:
            lora_config = LoRAConfig(
                r=config["r"], alpha=config["lora_alpha"],
                dropout=(config.get("lora_dropout") or 0.0) if dropout is None else dropout,
                target_modules=tuple(config["target_modules"]), use_rslora=config.get("use_rslora", False),
                init=PEFT_INITS[config.get("init_lora_weights", True)], use_dora=config.get("use_dora", False),
                rank_pattern=dict(config.get("rank_pattern") or {}),
                alpha_pattern=dict(config.get("alpha_pattern") or {}))
            model = cls(base_model, lora_config)
        except ValueError as e:  # e.g. target modules this base does not have
            raise ValueError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: {e}") from None
        model.base_model_name_or_path = config.get("base_model_name_or_path")
        return model.load_lora_weights(adapter_dir)


def read_adapter_config(path):
    """adapter_config.json as a dict, checked to be a LoRA adapter we can run."""
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; an adapter folder holds {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise ValueError(f"{file}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {config.get('peft_type')!r:.80}; only LoRA adapters (\"LORA\") "
                         f"are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{file}: no {key!r} field")
    if isinstance(config["target_modules"], str):
        raise ValueError(f"{file}: target_modules is a regular expression ({config['target_modules']!r:.80}); "
                         f"only a list of module names is supported")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, (bool, str)) and init in PEFT_INITS):
        raise ValueError(f"{file}: init_lora_weights={init!r:.80} is not supported (supported: true, false, "
                         f"\"gaussian\", \"pissa\", \"olora\"; a PiSSA / OLoRA adapter saved with "
                         f"path_initial_model_for_weight_conversion is a plain LoRA and loads too)")
    for key, default in PEFT_UNSUPPORTED.items():
        if config.get(key, default) not in (default, [], {}):
            raise ValueError(f"{file}: {key}={config[key]!r:.80} is not supported (only plain LoRA, {key}={default!r})")

    def bad(key, words):
        raise ValueError(f"{file}: {key} must be {words}, not {config[key]!r:.80}")
    if not is_rank(config["r"]):
        bad("r", "an integer >= 1")
    if not is_number(config["lora_alpha"]):
        bad("lora_alpha", "a finite number")
    if config.get("lora_dropout") is not None and not (is_number(config["lora_dropout"]) and 0 <= config["lora_dropout"] < 1):
        bad("lora_dropout", "a number in [0, 1)")
    if not (isinstance(config["target_modules"], list) and config["target_modules"]
            and all(isinstance(t, str) and t for t in config["target_modules"])):
        bad("target_modules", "a non-empty list of module names")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            bad(key, "true or false")
    for key, value_ok, words in (("rank_pattern", is_rank, "integers >= 1"), ("alpha_pattern", is_number, "finite numbers")):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(value_ok(v) for v in patterns.values()):
            bad(key, f"an object of module-name patterns to {words}")
        for pattern in patterns:
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except (re.error, RecursionError, OverflowError) as e:
                raise ValueError(f"{file}: {key} key {pattern!r:.80} is not a regular expression ({e})") from None
    return config


def is_rank(v):
    return type(v) is int and v >= 1


def is_number(v):
    """A JSON number that is a finite float (a huge integer would overflow the float maths)."""
    return (type(v) is int and abs(v) <= 2 ** 53) or (type(v) is float and math.isfinite(v))


def read_adapter_tensors(path):
    """{"h.0.attn.c_attn.lora_A": array, ...} from a PEFT adapter file (ours or PEFT's)."""
    file = path / ADAPTER_WEIGHTS
    raw = load_safetensors(file)
    out = {}
    for key, value in raw.items():
        name = key.replace(".default.", ".")  # an adapter name inside keys (older PEFT files)
        for prefix in ("base_model.model.", "transformer."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.endswith(".lora_magnitude_vector.weight"):  # older PEFT files name DoRA's m so
            name = name[:-len(".weight")]
        if not name.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")):
            raise ValueError(f"{file}: unexpected tensor {key!r} (only lora_A / lora_B weights and DoRA's "
                             f"lora_magnitude_vector are supported)")
        out[name.removesuffix(".weight")] = value
    return out
