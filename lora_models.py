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

Which modules (PEFT 0.21's check_target_module_exists, on the names PEFT sees in
GPT2LMHeadModel: "transformer.h.0.attn.c_attn", ..., "transformer.ln_f", "lm_head"):
target_modules as a list (a name or a "."-suffix of it) or a regex (a full match),
exclude_modules, layers_to_transform / layers_pattern, rank_pattern / alpha_pattern keys
(the first key matching a suffix), and modules_to_save (PEFT's `name.endswith(entry)`:
whole modules trained beside the adapter, saved under their own keys, e.g.
base_model.model.transformer.ln_f.weight). docs/lora_targets_and_adapters.md has examples.

Several adapters (PEFT's PeftModel API): add_adapter / load_adapter under a name,
set_adapter, disable_adapter() as a context, delete_adapter, add_weighted_adapter ("linear",
"cat"); save_lora_weights writes PEFT's layout (the "default" adapter at the root, others in
subfolders named after them). One LoRALinear per adapted module runs the ACTIVE adapter:
each adapter keeps its own state for every layer it adapts (the layer's attributes that
LoRALinear's constructor sets beside the base weight: r, scaling, lora_A, lora_B, and any
other lora_* tensor), and set_adapter puts that state into the layers; the fused CPU layers
read the same attributes, so both paths switch alike.
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
from contextlib import contextmanager
from dataclasses import replace
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
PEFT_UNSUPPORTED = {"bias": "none", "target_parameters": None,
                    "layer_replication": None, "trainable_token_indices": None}
# adapter_config.json init_lora_weights -> our LoRAConfig.init. An adapter's A and B are in the
# file, so a plain init only names how training started; "pissa" / "olora" also say that the
# base must be the residual (recomputed from the base here, as PEFT recomputes it on loading).
# Other PEFT inits (loftq, eva, corda, orthogonal, lora_ga, mica, and the random
# "pissa_niter_N", whose residual cannot be recomputed) are refused by name.
PEFT_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


# --- which modules: PEFT 0.21's rules, on PEFT's module names --------------------

def pattern_value(patterns, key, default):
    """PEFT's rank_pattern / alpha_pattern lookup (utils/other.py get_pattern_key): the first
    key matching a "."-suffix of the module's PEFT name `key` (transformer.h.0.attn.c_attn)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def peft_names(gpt):
    """{PEFT module name: our module} for every module PEFT sees in GPT2LMHeadModel: ours
    under "transformer." (the same attribute names as transformers'), the LoRA layers' own
    children left out, and "lm_head" (tied to wte here: no module of its own, None)."""
    names, lora = {}, []
    for name, module in gpt.named_modules():
        if any(name.startswith(p + ".") for p in lora):
            continue
        names["transformer" + ("." + name if name else "")] = module
        if isinstance(module, LoRALinear):
            lora.append(name)
    names["lm_head"] = None
    return names


def check_target_module_exists(cfg, key):
    """PEFT 0.21's check_target_module_exists (tuners/tuners_utils.py) for the module named
    `key`: None when exclude_modules or modules_to_save rule it out, else whether it is a target."""
    ex = cfg.exclude_modules
    if ex and (re.fullmatch(ex, key) if isinstance(ex, str) else key in ex or any(key.endswith("." + e) for e in ex)):
        return None
    # adapters never go inside a module to save (PEFT: the two would conflict)
    if cfg.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.modules_to_save):
        return None
    targets = cfg.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:  # a whole name is taken as it is (PEFT: before the layer filter)
        return True
    found = any(key.endswith("." + t) for t in targets)
    layers = cfg.layers_to_transform
    if not found or layers is None or (isinstance(layers, tuple) and not layers):
        return found
    match = None
    if not cfg.layers_pattern:  # the first numbered segment ("transformer.h.<idx>.")
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    for pattern in ([cfg.layers_pattern] if isinstance(cfg.layers_pattern, str) else cfg.layers_pattern or ()):
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
        if match:
            break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def select_modules(cfg, names, where="LoRA config"):
    """(LoRA targets, modules to save): {our name: module} each, chosen from `names`
    (peft_names) by PEFT's rules. A choice we cannot run is a ValueError that names it."""
    if isinstance(cfg.target_modules, str) and (cfg.layers_to_transform is not None or cfg.layers_pattern):
        raise ValueError(f"{where}: layers_to_transform / layers_pattern need a list target_modules, not the "
                         f"regular expression {cfg.target_modules!r:.80} (as in PEFT)")
    if cfg.layers_pattern and cfg.layers_to_transform is None:
        raise ValueError(f"{where}: layers_pattern {cfg.layers_pattern!r} needs layers_to_transform (as in PEFT)")
    targets = {}
    for key, module in names.items():
        try:
            if key == "transformer" or not check_target_module_exists(cfg, key):
                continue
        except (re.error, RecursionError, OverflowError) as e:  # a pattern that is no regular expression
            raise ValueError(f"{where}: a target_modules / exclude_modules / modules_to_save / layers_pattern entry "
                             f"is not a valid regular expression here ({e})") from None
        if not isinstance(module, (Conv1D, LoRALinear)):
            kind = "the LM head (tied to wte)" if module is None else type(module).__name__
            raise ValueError(f"{where}: target_modules {cfg.target_modules!r:.80} selects {key}, {kind}; LoRA here "
                             f"adapts GPT-2's Conv1D projections only (c_attn, c_proj, c_fc)")
        targets[key[len("transformer."):]] = module
    if isinstance(cfg.target_modules, str):
        if not targets:
            raise ValueError(f"{where}: target_modules {cfg.target_modules!r:.80} matches no module of GPT-2 "
                             f"(it must match whole names such as transformer.h.0.attn.c_attn)")
    else:  # every listed name must name a projection somewhere (a typo is an error, not a no-op)
        projections = [k for k, m in names.items() if isinstance(m, (Conv1D, LoRALinear))]
        missing = [t for t in cfg.target_modules if not any(k == t or k.endswith("." + t) for k in projections)]
        if missing:
            raise ValueError(f"{where}: LoRA target modules {missing} not found in GPT-2 "
                             f"(its projections: c_attn, attn.c_proj, c_fc, mlp.c_proj)")
        if not targets:
            raise ValueError(f"{where}: target_modules {list(cfg.target_modules)} with exclude_modules "
                             f"{cfg.exclude_modules!r}, layers_to_transform {cfg.layers_to_transform!r} leave no module")
    return targets, modules_to_save(cfg, names, targets, where)


def modules_to_save(cfg, names, targets, where):
    """{our name: module} for cfg.modules_to_save by PEFT's rule (utils/other.py _set_trainable:
    every module whose name ends with an entry)."""
    chosen = {}
    for entry in cfg.modules_to_save or ():
        hits = [k for k in names if k.endswith(entry)]
        if not hits:
            raise ValueError(f"{where}: modules_to_save {entry!r} matches no module of GPT-2")
        for key in hits:
            if key in ("transformer", "lm_head", "transformer.wte"):
                raise ValueError(f"{where}: modules_to_save {entry!r} selects {key}, which holds wte, the embedding "
                                 f"tied to the LM head; a trained copy of it is not supported here")
            if key[len("transformer."):] in targets or any(t.startswith(key[len("transformer."):] + ".") for t in targets):
                raise ValueError(f"{where}: modules_to_save {entry!r} selects {key}, which is (or holds) a LoRA target")
            chosen[key[len("transformer."):]] = names[key]
    nested = [(a, b) for a in chosen for b in chosen if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"{where}: modules_to_save selects {nested[0][1]} inside {nested[0][0]}; choose one")
    return chosen


# --- one adapter's state in a LoRALinear -------------------------------------------

# A LoRALinear's own attributes that no adapter sets: the base layer's weights and its flags.
LAYER_OWN = ("weight", "bias", "merged", "is_train")


def layer_state(layer):
    """What an adapter sets in a LoRALinear: every attribute its constructor set beside the
    base weights (r, alpha, scaling, enable, lora_A, lora_B, and whatever else a variant
    adds); a submodule (the dropout) by its rate only, so the module itself, whose class
    runtime.prepare chose, stays."""
    state = {}
    for key, value in vars(layer).items():
        if key not in LAYER_OWN:
            state[key + ".p" if isinstance(value, nn.Module) else key] = value.p if isinstance(value, nn.Module) else value
    return state


def put_state(layer, state, known):
    """Make `layer` run the adapter whose layer_state is `state`; `known`: every key some
    adapter sets here (those `state` lacks are removed)."""
    for key in known - set(state):
        if "." not in key and key in vars(layer):
            delattr(layer, key)
    for key, value in state.items():
        if key.endswith(".p"):
            getattr(layer, key[:-2]).p = value
        else:
            setattr(layer, key, value)


def state_view(layer, state):
    """A copy of `layer` (sharing its tensors) running `state`: for reading an adapter that is
    not active (its B_full(), its scaling) without switching the model."""
    view = object.__new__(type(layer))
    view.__dict__.update({k: v for k, v in vars(layer).items() if k in LAYER_OWN})
    view.__dict__.update({k: v for k, v in state.items() if not k.endswith(".p")})
    return view


def lora_tensors(state):
    """{"lora_A": Var, ...}: an adapter's trained tensors in one layer (its lora_* Vars)."""
    return {k: v for k, v in state.items() if k.startswith("lora_") and isinstance(v, jt.Var)}


def module_params(module):
    """{"weight": Var, ...}: a module's own parameters, LoRA layers' tensors left out."""
    return {k: v for k, v in module.state_dict().items() if "lora_" not in k}


def set_param(module, dotted, var):
    *path, leaf = dotted.split(".")
    for part in path:
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    setattr(module, leaf, var)


class LoRAGPT(nn.Module):
    def __init__(self, base_model, lora_config=None, seed=0, adapter_name="default"):
        """seed: the initial A matrices (init_weights.lora_A; the same for the same seed on every MPI rank)."""
        self._start(base_model, seed)
        self.add_adapter(adapter_name, lora_config or LoRAConfig())
        self.set_adapter(adapter_name)

    def _start(self, base_model, seed):
        self.model, self.seed = base_model, seed
        self.peft_config = {}      # adapter name -> LoRAConfig (PEFT's attribute name)
        self._states = {}          # adapter -> {module name: layer_state}
        self._saved = {}           # adapter -> {module name: {param: Var}}: its trained copies (modules_to_save)
        self._layers = {}          # module name -> LoRALinear, for every module some adapter adapts
        self._empty = {}           # module name -> the layer_state of no adapter (r = 0)
        self._originals = {}       # module name -> {param: Var}: the base weights of modules some adapter saves
        self.active_adapter = None

    @property
    def lora_config(self):
        return self.peft_config[self.active_adapter]

    @property
    def lora_modules(self):
        """{module name: LoRALinear} for the modules the active adapter adapts."""
        return {name: self._layers[name] for name in self._states.get(self.active_adapter, {})}

    def _projections(self):
        return gpt_projections(self.model)

    # --- several adapters (PEFT's PeftModel API) --------------------------------

    def add_adapter(self, adapter_name, lora_config):
        """A new adapter (not made active: set_adapter), initialised as LoRAConfig says."""
        self._build(adapter_name, lora_config)

    def _select(self, adapter_name, cfg, where="LoRA config"):
        if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name):
            raise ValueError(f"adapter name {adapter_name!r}: letters, digits, '_' and '-' only (it names a folder)")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already (delete_adapter first)")
        if any(m.merged for m in self._layers.values()):
            raise ValueError("unmerge() before adding an adapter: its layers would start from merged weights")
        return select_modules(cfg, peft_names(self.model), where)

    def _build(self, adapter_name, cfg):
        others = [n for n in self.peft_config if n != adapter_name]
        if others and (is_residual_init(cfg.init) or any(is_residual_init(self.peft_config[n].init) for n in others)):
            # PiSSA / OLoRA replace the shared base weight by their residual: no other adapter could run on it
            raise ValueError(f"adapter {adapter_name!r}: a PiSSA / OLoRA adapter (init_lora_weights) cannot share "
                             f"a model with other adapters ({', '.join(others)}); load it alone")
        targets, saved = self._select(adapter_name, cfg)
        states, new_layers = {}, False
        for name in targets:
            key = "transformer." + name
            r = pattern_value(cfg.rank_pattern, key, cfg.r)
            if r == 0:
                continue  # r = 0: no adapter on this module
            new_layers |= name not in self._layers
            layer = self._layers.get(name) or self._wrap(name)
            # A drawn from (seed, module name): the default adapter's A is the one the training scripts share
            fresh = LoRALinear(layer, r, pattern_value(cfg.alpha_pattern, key, cfg.alpha), cfg.dropout, cfg.init,
                               cfg.use_rslora, enable=cfg.qkv if name.endswith("c_attn") else None, seed=self.seed,
                               name=name if adapter_name == "default" else f"{name}.{adapter_name}",
                               use_dora=cfg.use_dora)
            states[name] = layer_state(fresh)
        if new_layers and self.model.fused:  # the new layers run like the rest of the model
            runtime.prepare(self, precision=runtime.precision_of(self), fused=True)
        copies = {}
        for name, module in saved.items():
            originals = self._originals.setdefault(name, module_params(module))
            copies[name] = {k: v.clone().detach() for k, v in originals.items()}  # PEFT: a copy of the original
        self.peft_config[adapter_name], self._states[adapter_name] = cfg, states
        self._saved[adapter_name] = copies
        if self.active_adapter is not None:
            self._put(self.active_adapter)  # the new layers run the active adapter (or nothing)

    def _wrap(self, name):
        """Put a LoRALinear with no adapter (r = 0) in place of the projection `name`."""
        parent, attr, module = next((p, a, m) for n, p, a, m in self._projections() if n == name)
        layer = LoRALinear(module, 0, dropout=0.0)
        setattr(parent, attr, layer)
        self._layers[name], self._empty[name] = layer, layer_state(layer)
        return layer

    def _put(self, adapter):
        """Make every layer and saved module run `adapter` (None: the base model)."""
        for name, layer in self._layers.items():
            known = set().union(*(s[name].keys() for s in self._states.values() if name in s))
            put_state(layer, self._states.get(adapter, {}).get(name, self._empty[name]), known)
        modules = peft_names(self.model)
        for name, originals in self._originals.items():
            for param, var in self._saved.get(adapter, {}).get(name, originals).items():
                set_param(modules["transformer." + name], param, var)

    def set_adapter(self, adapter_name):
        """Run and train `adapter_name` (PEFT: set_adapter; a merged model is unmerged first)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(self.peft_config)}")
        self.unmerge()
        self.active_adapter = adapter_name
        self._put(adapter_name)
        self.mark_only_lora_as_trainable()

    @property
    def active_adapters(self):
        return [self.active_adapter] if self.active_adapter else []

    @contextmanager
    def disable_adapter(self):
        """with model.disable_adapter(): ... runs the base model (PEFT's context manager)."""
        self.unmerge()
        self._put(None)
        try:
            yield
        finally:
            self._put(self.active_adapter)

    def delete_adapter(self, adapter_name):
        """Remove an adapter; if it was active, the first remaining one becomes active (PEFT)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(self.peft_config)}")
        if adapter_name == self.active_adapter:
            self.unmerge()
        for store in (self.peft_config, self._states, self._saved):
            del store[adapter_name]
        if adapter_name == self.active_adapter:
            self.active_adapter = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))
            else:
                self._put(None)
        else:
            self._put(self.active_adapter)

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="linear"):
        """A new adapter combining `adapters` with `weights`, as PEFT's LoraModel.add_weighted_adapter
        builds it: the config of adapters[0] with r = lora_alpha = the new rank, the union of
        their target_modules, no rank/alpha patterns; per module, from each adapter i present
        there with scaling s_i:
          "linear" (equal ranks): A = sum sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum sqrt|w_i s_i| B_i
          "cat" (rank = sum of ranks): A = [w_i s_i A_i] stacked, B = [B_i] side by side.
        PEFT's svd / ties / dare / magnitude_prune combinations are not implemented (refused)."""
        if combination_type not in ("linear", "cat"):
            raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} is not supported here "
                             f"(linear and cat are; PEFT also has svd, ties, dare_*, magnitude_prune)")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing or len(weights) != len(adapters) or not adapters:
            raise ValueError(f"add_weighted_adapter: adapters {adapters} (unknown: {missing}), weights {weights}")
        configs = [self.peft_config[a] for a in adapters]
        if any(not all(c.qkv) for c in configs):
            raise ValueError("add_weighted_adapter: q/v-only adapters are not supported")
        saved = [n for a in adapters for n in self._saved[a]]
        if len(saved) != len(set(saved)):
            raise ValueError("add_weighted_adapter: two of the adapters save the same module (modules_to_save; "
                             "PEFT refuses this too)")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
        if combination_type == "linear" and len(set(ranks)) != 1:
            raise ValueError(f"add_weighted_adapter: 'linear' needs adapters of one rank, not {ranks}")
        new_rank = ranks[0] if combination_type == "linear" else sum(ranks)
        kinds = {isinstance(c.target_modules, str) for c in configs}
        if len(kinds) > 1:
            raise ValueError("add_weighted_adapter: target_modules of the adapters mix lists and regular expressions")
        if kinds == {True}:
            union = "|".join(f"({c.target_modules})" for c in configs)
        else:
            union = tuple(dict.fromkeys(t for c in configs for t in c.target_modules))
        self.add_adapter(adapter_name, replace(configs[0], r=new_rank, alpha=new_rank, target_modules=union,
                                               rank_pattern={}, alpha_pattern={}))
        for name, state in self._states[adapter_name].items():
            layer = self._layers[name]
            parts = [(w, state_view(layer, self._states[a][name])) for a, w in zip(adapters, weights)
                     if name in self._states[a]]
            A, B = np.zeros(tuple(state["lora_A"].shape), np.float32), np.zeros(tuple(state["lora_B"].shape), np.float32)
            if combination_type == "cat":
                As = np.concatenate([w * v.scaling * v.lora_A.numpy() for w, v in parts]) if parts else A[:0]
                Bs = np.concatenate([v.B_full().numpy() for _, v in parts], axis=1) if parts else B[:, :0]
                A[:As.shape[0]], B[:, :Bs.shape[1]] = As, Bs
            else:
                for w, v in parts:
                    ws = w * v.scaling
                    A += math.copysign(math.sqrt(abs(ws)), ws) * v.lora_A.numpy()
                    B += math.sqrt(abs(ws)) * v.B_full().numpy()
            state["lora_A"].update(jt.array(A))
            state["lora_B"].update(jt.array(B))

    # --- what trains ------------------------------------------------------------

    def mark_only_lora_as_trainable(self):
        """Freeze every base weight, train the active adapter's tensors (and its saved modules).

        Per-Var stop_grad, not Module.requires_grad_(False): the latter runs the whole
        module under no_grad and would cut the gradient to the adapters inside it too.
        GPT.train()/eval() never touch these flags (see GPT2_jittor.py).
        """
        originals = [p for params in self._originals.values() for p in params.values()]
        for p in list(self.model.hf_state_dict().values()) + originals:
            p.stop_grad()
        for adapter in self.peft_config:
            for p in self._adapter_tensors(adapter).values():
                p.stop_grad()
        for p in self.trainable_parameters():
            p.start_grad()

    def _adapter_tensors(self, adapter):
        """{"h.0.attn.c_attn.lora_A": Var, ..., "modules_to_save.ln_f.weight": Var}: what the adapter trains."""
        out = {f"{name}.{k}": v for name, state in self._states[adapter].items() for k, v in lora_tensors(state).items()}
        for name, params in self._saved[adapter].items():
            out.update({f"modules_to_save.{name}.{k}": v for k, v in params.items()})
        return out

    def lora_state_dict(self):
        """{"h.0.attn.c_attn.lora_A": Var, ...}: the active adapter's trainable tensors, our names
        (its modules_to_save copies as "modules_to_save.ln_f.weight")."""
        return self._adapter_tensors(self.active_adapter) if self.active_adapter else {}

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
        # a saved module's copy replaces its original in hf_state_dict: counted once each, as PEFT counts
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
        """Fold the active adapter into the base weights (set_adapter / disable_adapter unmerge first)."""
        for m in self.lora_modules.values():
            m.merge()

    def unmerge(self):
        for m in self._layers.values():
            m.unmerge()

    def export_merged(self, path):
        """A plain Hugging Face GPT-2 checkpoint with the active adapter folded in (its saved modules too)."""
        was_merged = [m.merged for m in self.lora_modules.values()]
        self.merge()
        self.model.save_pretrained(path)
        for m, merged in zip(self.lora_modules.values(), was_merged):
            if not merged:
                m.unmerge()

    # --- PEFT-format adapters ---------------------------------------------------

    def peft_adapter(self, adapter_name=None):
        """(tensors, adapter_config) of one adapter (default: the active one) exactly as PEFT's
        save_pretrained writes them (PiSSA / OLoRA: with path_initial_model_for_weight_conversion,
        see the module doc)."""
        adapter_name = adapter_name or self.active_adapter
        cfg = self.peft_config[adapter_name]
        tensors, rank_pattern, alpha_pattern = {}, dict(cfg.rank_pattern), dict(cfg.alpha_pattern)
        converted = is_residual_init(cfg.init)
        for name, state in self._states[adapter_name].items():
            m = state_view(self._layers[name], state)
            A, B = m.lora_A.numpy(), m.B_full().numpy()
            if converted:  # W_res + s B A = W + s [B, -B0] [A; A0]: a plain LoRA on the original W
                A, B = np.concatenate([A, m.initial[0]], 0), np.concatenate([B, -m.initial[1]], 1)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
            if getattr(m, "use_dora", False):
                tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.numpy()
            if A.shape[0] != m.r * (2 if converted else 1):  # a q/v-style adapter, exported as its rank-(r*k) equivalent
                r_out = A.shape[0]
                rank_pattern[name] = r_out
                alpha_pattern[name] = m.scaling * (np.sqrt(r_out) if cfg.use_rslora else r_out)
        for name, params in self._saved[adapter_name].items():
            tensors.update({f"{PEFT_PREFIX}{name}.{k}": v.numpy() for k, v in params.items()})
        listed = lambda v: v if v is None or isinstance(v, (str, int)) else list(v)  # noqa: E731
        r, alpha, init = cfg.r, cfg.alpha, True if cfg.init == "kaiming" else cfg.init
        if converted:  # PEFT's conversion: rank x 2 and alpha x 2 (rsLoRA: x sqrt 2), the same scaling
            grow = math.sqrt(2) if cfg.use_rslora else 2
            r, alpha, init = 2 * r, alpha * grow, True
            rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
            alpha_pattern = {k: v * grow for k, v in alpha_pattern.items()}
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "lora_dropout": cfg.dropout, "target_modules": listed(cfg.target_modules),
            "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
            "use_rslora": cfg.use_rslora, "bias": "none", "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "init_lora_weights": init,
            "base_model_name_or_path": getattr(self, "base_model_name_or_path", None),
            "inference_mode": True, "modules_to_save": listed(cfg.modules_to_save),
            "exclude_modules": listed(cfg.exclude_modules), "layers_to_transform": listed(cfg.layers_to_transform),
            "layers_pattern": listed(cfg.layers_pattern), "use_dora": cfg.use_dora, "revision": None,
        }
        return tensors, config

    def save_lora_weights(self, path, adapter_names=None):
        """Every adapter (or those named) in PEFT's layout, each adapter_model.safetensors +
        adapter_config.json written atomically: "default" in `path`, another in path/<name>
        (PEFT's save_pretrained)."""
        for name in adapter_names or list(self.peft_config):
            tensors, config = self.peft_adapter(name)
            folder = Path(path) if name == "default" else Path(path) / name
            atomic_save_safetensors(folder / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
            atomic_write_json(folder / ADAPTER_CONFIG, config)

    save_pretrained = save_lora_weights

    def load_lora_weights(self, path, adapter_name=None):
        """Load adapter weights saved by PEFT or by us into an adapter of this model (default:
        the active one) built for them, strictly checked."""
        path, adapter_name = Path(path), adapter_name or self.active_adapter
        config = read_adapter_config(path)
        cfg = self.peft_config[adapter_name]
        if float(config["lora_alpha"]) != float(cfg.alpha) or int(config["r"]) != cfg.r:
            raise ValueError(f"{path / ADAPTER_CONFIG}: r={config['r']}, lora_alpha={config['lora_alpha']} "
                             f"but this model has r={cfg.r}, alpha={cfg.alpha}")
        tensors = read_adapter_tensors(path)
        want = {}
        for name, state in self._states[adapter_name].items():
            if state.get("enable"):
                raise ValueError("load_lora_weights needs a model with full c_attn adapters; "
                                 "use LoRAGPT.from_pretrained, which builds one from the adapter config")
            want.update({f"{name}.{k}": v for k, v in lora_tensors(state).items()})
        for name, params in self._saved[adapter_name].items():
            want.update({f"{name}.{k}": v for k, v in params.items()})
        missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or unexpected:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: does not match the LoRA layers of this model "
                             f"(targets {cfg.target_modules!r:.80}, {self.model.config.n_layer} layers): "
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

    def load_adapter(self, path, adapter_name, dropout=None):
        """An adapter folder saved by PEFT or by us, added under `adapter_name` (not made active:
        set_adapter; PEFT's PeftModel.load_adapter)."""
        path = Path(path)
        config = read_adapter_config(path)  # the cheap checks first
        try:
            lora_config = lora_config_from_peft(config, dropout)
        except ValueError as e:
            raise ValueError(f"{path / ADAPTER_CONFIG}: {e}") from None
        targets, _ = self._select(adapter_name, lora_config, where=str(path / ADAPTER_CONFIG))
        # Every adapter's rank in the config must be the rank of its tensors before anything is
        # built, so no config can make the model larger than the weight file (load_lora_weights
        # then checks every key and shape).
        tensors, file = read_adapter_tensors(path), path / ADAPTER_WEIGHTS
        for name in targets:
            r = pattern_value(lora_config.rank_pattern, "transformer." + name, lora_config.r)
            A = tensors.get(f"{name}.lora_A")
            if A is None or A.ndim != 2 or A.shape[0] != r:
                raise ValueError(f"{file}: {name}.lora_A is {'missing' if A is None else tuple(A.shape)}, "
                                 f"expected rank {r} from {ADAPTER_CONFIG}")
        self._build(adapter_name, lora_config)
        return self.load_lora_weights(path, adapter_name)

    @classmethod
    def from_pretrained(cls, base, adapter_dir, dropout=None, adapter_name="default", revision=None):
        """Base GPT-2 (a folder, a hub id such as "gpt2-medium" at `revision`, or a GPT) + an
        adapter folder saved by PEFT or by us. A folder of several adapters (PEFT's layout): the
        one at its root, or adapter_name's subfolder."""
        adapter_dir = Path(adapter_dir)
        if adapter_name != "default":  # PEFT's layout: the others in subfolders named after them
            if not (adapter_dir / adapter_name / ADAPTER_CONFIG).is_file():
                found = sorted(p.parent.name for p in adapter_dir.glob(f"*/{ADAPTER_CONFIG}"))
                raise FileNotFoundError(f"{adapter_dir / adapter_name / ADAPTER_CONFIG}: missing; the adapters in "
                                        f"{adapter_dir} are {(['default'] if (adapter_dir / ADAPTER_CONFIG).is_file() else []) + found}")
            adapter_dir = adapter_dir / adapter_name
        config = read_adapter_config(adapter_dir)  # the cheap checks first
        base_model = base if isinstance(base, GPT) else GPT.from_pretrained(base, revision)
        model = object.__new__(cls)
        model._start(base_model, 0)
        model.load_adapter(adapter_dir, adapter_name, dropout)
        model.base_model_name_or_path = config.get("base_model_name_or_path")
        model.set_adapter(adapter_name)
        return model


def gpt_projections(gpt):
    """(name, parent module, attribute, module) for every Conv1D/LoRALinear projection of a GPT."""
    for i, block in enumerate(gpt.h):
        for sub_name, sub in (("attn", block.attn), ("mlp", block.mlp)):
            for attr in ("c_attn", "c_proj", "c_fc"):
                module = getattr(sub, attr, None)
                if isinstance(module, (Conv1D, LoRALinear)):
                    yield f"h.{i}.{sub_name}.{attr}", sub, attr, module


def lora_config_from_peft(config, dropout=None):
    """Our LoRAConfig for a checked adapter_config.json (read_adapter_config)."""
    listed = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    return LoRAConfig(
        r=config["r"], alpha=config["lora_alpha"],
        dropout=(config.get("lora_dropout") or 0.0) if dropout is None else dropout,
        target_modules=listed(config["target_modules"]), use_rslora=config.get("use_rslora", False),
        init=PEFT_INITS[config.get("init_lora_weights", True)], use_dora=config.get("use_dora", False),
        rank_pattern=dict(config.get("rank_pattern") or {}), alpha_pattern=dict(config.get("alpha_pattern") or {}),
        exclude_modules=listed(config.get("exclude_modules")), layers_to_transform=listed(config.get("layers_to_transform")),
        layers_pattern=listed(config.get("layers_pattern")), modules_to_save=listed(config.get("modules_to_save")))


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

    def names(v, regex_ok=True):  # a list of names, or a regular expression
        return (regex_ok and isinstance(v, str) and compiles_as_regex(v)) or (isinstance(v, list) and all(isinstance(t, str) and t for t in v))
    if not (names(config["target_modules"]) and config["target_modules"]):
        bad("target_modules", "a non-empty list of module names or a regular expression")
    for key, ok, words in (("exclude_modules", names, "a list of module names or a regular expression"),
                           ("modules_to_save", lambda v: names(v, False), "a list of module names"),
                           ("layers_pattern", lambda v: isinstance(v, str) or names(v, False), "a name or a list of names"),
                           ("layers_to_transform", lambda v: type(v) is int or (isinstance(v, list) and all(type(i) is int for i in v)),
                            "a layer index or a list of them")):
        if config.get(key) is not None and not ok(config[key]):
            bad(key, words)
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


def compiles_as_regex(text):
    try:
        re.compile(text)
        return True
    except (re.error, RecursionError, OverflowError):
        return False


def is_rank(v):
    return type(v) is int and v >= 1


def is_number(v):
    """A JSON number that is a finite float (a huge integer would overflow the float maths)."""
    return (type(v) is int and abs(v) <= 2 ** 53) or (type(v) is float and math.isfinite(v))


def read_adapter_tensors(path):
    """{"h.0.attn.c_attn.lora_A": array, ..., "ln_f.weight": array} from a PEFT adapter file (ours or PEFT's)."""
    file = path / ADAPTER_WEIGHTS
    raw = load_safetensors(file)
    out = {}
    for key, value in raw.items():
        name = key.replace(".default.", ".")  # an adapter name inside keys (older PEFT files)
        for prefix in ("base_model.model.", "transformer."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector.weight")):
            name = name[:-len(".weight")]  # (older PEFT files name DoRA's m ...lora_magnitude_vector.weight)
        # anything else is a modules_to_save tensor under its module's name (ln_f.weight), which
        # load_lora_weights checks against the adapter's modules_to_save
        out[name.replace(".modules_to_save.", ".")] = value
    return out
