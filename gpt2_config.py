"""GPT-2's configuration (GPTConfig, the fields of a Hugging Face GPT-2 config.json) and the
--random-base shape parser. No Jittor and no PyTorch here: the Jittor model (GPT2_jittor.py)
and the PyTorch reference script (train_pytorch_lora.py) both read it.
"""
import math
from dataclasses import dataclass, fields

# The activation_function values GPT2_jittor.ACTIVATIONS implements (checked there).
ACTIVATION_FUNCTIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")

# config.json field -> (type, accepted?, the range in words). The upper bounds are far above any
# GPT-2 and keep a hostile config from building an absurd model; from_pretrained also checks
# the config's sizes against the weight file before it builds anything.
_SIZE = (int, lambda v: 1 <= v <= 2 ** 24, "an integer in [1, 2^24]")
_PROB = ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)")
CONFIG_RANGES = {
    "n_layer": (int, lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"),
    "n_head": (int, lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"),
    "n_embd": _SIZE, "n_positions": _SIZE, "vocab_size": _SIZE,
    "layer_norm_epsilon": ((int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
    "resid_pdrop": _PROB, "embd_pdrop": _PROB, "attn_pdrop": _PROB,
    "initializer_range": ((int, float), lambda v: 0 <= v <= 100, "a number in [0, 100]"),
    "bos_token_id": (int, lambda v: v >= 0, "a token id >= 0"),
    "eos_token_id": (int, lambda v: v >= 0, "a token id >= 0"),
}


@dataclass
class GPTConfig:
    n_layer: int = 12            # transformer blocks
    n_head: int = 12             # attention heads per block
    n_embd: int = 768            # model width; head size is n_embd // n_head
    n_positions: int = 1024      # longest sequence the position table covers
    vocab_size: int = 50257      # GPT-2's BPE vocabulary
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"   # the tanh approximation GPT-2 was trained with
    resid_pdrop: float = 0.1     # dropout after attention / MLP output projections
    embd_pdrop: float = 0.1      # dropout on token + position embeddings
    attn_pdrop: float = 0.1      # dropout on attention probabilities
    initializer_range: float = 0.02  # std of the random init (weights are usually loaded instead)
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @classmethod
    def from_hf_config(cls, cfg, source="config.json"):
        """Build from a Hugging Face GPT-2 config.json dict; every value checked (CONFIG_RANGES),
        errors are ValueError naming `source`."""
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{source}: model_type is {cfg.get('model_type')!r:.80}, expected 'gpt2'")
        act = cfg.get("activation_function", "gelu_new")
        if not isinstance(act, str) or act not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"{source}: activation_function {act!r:.80} is not supported "
                             f"(supported: {', '.join(ACTIVATION_FUNCTIONS)})")
        values = {}
        for f in fields(cls):
            if f.name not in cfg or f.name == "activation_function":
                continue
            v = cfg[f.name]
            if v is None and f.name.endswith("_token_id"):
                continue  # transformers writes null for an unset token id: keep GPT-2's
            kind, accepted, words = CONFIG_RANGES[f.name]
            if isinstance(v, bool) or not isinstance(v, kind) or (isinstance(v, float) and not math.isfinite(v)) \
                    or not accepted(v):
                raise ValueError(f"{source}: {f.name} must be {words}, not {v!r:.80}")
            values[f.name] = v
        config = cls(**values, activation_function=act)
        if config.n_embd % config.n_head:
            raise ValueError(f"{source}: n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        return config

    def to_hf_config(self):
        """The config.json transformers writes for a GPT2LMHeadModel."""
        cfg = {f.name: getattr(self, f.name) for f in fields(self)}
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions,
                   n_inner=None, scale_attn_weights=True,
                   tie_word_embeddings=True, use_cache=True)
        return cfg


def parse_shape(text):
    """'n_layer=2,n_embd=128' -> {"n_layer": 2, "n_embd": 128}, checked as a config.json would be
    (GPTConfig.from_hf_config); ValueError naming --random-base otherwise."""
    known = {f.name: f.type for f in fields(GPTConfig)}
    shape = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known or not value:
            raise ValueError(f"--random-base: {item!r} is not a GPTConfig field=value "
                             f"(fields: {', '.join(known)})")
        try:
            shape[key] = known[key](value)
        except ValueError:
            raise ValueError(f"--random-base: {item!r}: {value!r} is not of type {known[key].__name__}") from None
    GPTConfig.from_hf_config(shape, source="--random-base")  # the same checks as a config.json
    return shape
