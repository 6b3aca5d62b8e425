"""How the model runs: Jittor's import (jittor_env), the choice of device, precision and
implementation (runtime.prepare), the fused CPU kernels (cpu_kernels, csrc/), the token-keyed
dropout, mixed precision, several processes under MPI, and the measurements the benchmark
reports. The model and LoRA themselves live at the top level (GPT2_jittor.py, LoRA.py).

Nothing is imported here on purpose: `from backend import runtime` loads only what it needs."""
