"""GPT-2's configuration (GPTConfig, the fields of a Hugging Face GPT-2 config.json) and the
--random-base shape parser. No Jittor and no PyTorch here: the Jittor model (GPT2_jittor.py)
and the PyTorch reference script (train_pytorch_lora.py) both read it.
"""
from dataclasses import dataclass, fields

# The activation_function values GPT2_jittor.ACTIVATIONS implements (checked there).
ACTIVATION_FUNCTIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")


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
        """Build from a Hugging Face GPT-2 config.json dict; errors name `source`."""
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{source}: model_type is {cfg.get('model_type')!r}, expected 'gpt2'")
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"{source}: activation_function {act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATION_FUNCTIONS)})")
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in cfg.items() if k in known})
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
    """'n_layer=2,n_embd=128' -> {"n_layer": 2, "n_embd": 128}, checked against GPTConfig."""
    known = {f.name: f.type for f in fields(GPTConfig)}
    shape = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known or not value:
            raise ValueError(f"--random-base: {item!r} is not a GPTConfig field=value "
                             f"(fields: {', '.join(known)})")
        shape[key] = known[key](value)
    return shape
