"""What a training run is made of: its configuration and command line (train_config), its
state on disk (checkpoints, locks, signals: train_state) and the random-initialised base
model and LoRA A matrices that both training scripts build alike (init_weights). The
training loops themselves are the top-level scripts train_default_lora.py and
train_pytorch_lora.py.

Nothing is imported here on purpose: `from training import train_state` loads only that."""
