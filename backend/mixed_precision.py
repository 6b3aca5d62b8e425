"""Device and precision choices, and dynamic loss scaling for fp16 training.

Plain Python (no Jittor, no PyTorch import), so that runtime.py (which applies the choice to
Jittor) and the PyTorch side of benchmark.py / gpu_check.py read the same names, defaults
and rules.

--device   auto (CUDA when a usable GPU is there, else the CPU), cpu, cuda
--precision
  fp32   float32 everywhere; on CUDA the matmuls are strict fp32 (tensor cores off)
  tf32   CUDA only: float32 tensors, matmuls on tensor cores in TF32 (inputs rounded to a
         10-bit mantissa, fp32 accumulation); on the CPU it is refused, not silently fp32
  bf16   mixed precision: the frozen GPT-2 weights (projections and embeddings) are stored
  fp16   in half and the matmuls run in half (fp32 accumulation); the LoRA A/B weights, their
         gradients and AdamW's moments stay float32, and so do LayerNorm, the residual
         stream, the attention softmax and the cross-entropy: the split torch.autocast makes.
         fp16 training adds dynamic loss scaling (LossScaler) for gradients that would
         underflow float16; bf16 has float32's exponent range and needs none.
  auto   fp32 on the CPU: the fused CPU kernels are float32 only, and half on the CPU runs
         the plain Jittor code (slower; it exists so that the CPU test suite runs the
         mixed-precision path for real). bf16 on CUDA: tensor-core speed, half the weight
         memory and traffic, no loss scaling (what PyTorch users get with
         autocast(dtype=torch.bfloat16)); on a GPU without bf16 (compute capability < 8.0) fp32.
"""
import numpy as np

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
HALF_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # precision -> dtype of the frozen base weights


def resolve(device, precision, cuda_available, why_not="", bf16_supported=True):
    """(device, precision) with "auto" replaced by this machine's choice.

    cuda_available: whether the framework can run on a GPU here (why_not says why not);
    bf16_supported: whether that GPU has bf16 tensor cores. Raises ValueError for an unknown
    name or tf32 on the CPU, RuntimeError for --device cuda without a usable GPU.
    """
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise RuntimeError(f"--device cuda: no usable CUDA GPU ({why_not or 'none found'}); "
                           f"use --device cpu or --device auto")
    if precision == "auto":
        precision = "fp32" if device == "cpu" or not bf16_supported else "bf16"
    if precision == "tf32" and device == "cpu":
        raise ValueError("--precision tf32 is a CUDA tensor-core mode; on the CPU use fp32")
    return device, precision


# ----------------------------------------------------------------------------
# Dynamic loss scaling

class LossScaler:
    """torch.amp.GradScaler's dynamic loss scaling, for Jittor optimizers (fp16 training).

    Per optimizer step, as with GradScaler:
        opt.backward(scaler.scale_loss(loss))      # gradients of loss * scale
        scaler.unscale_(opt)                       # gradients / scale; notes any inf/NaN
        clip_grad_norm(opt, ...)                   # optional, on the true gradients
        scaler.step(opt)                           # opt.step(), or skipped on inf/NaN
        scaler.update()                            # the new scale
    update(): after a step with a non-finite gradient the scale is multiplied by
    backoff_factor and the count of good steps restarts; after growth_interval good steps
    in a row it is multiplied by growth_factor (when the result is finite in float32).
    Defaults, state_dict keys and the float32 arithmetic of the scale are torch's.
    skipped_steps counts the steps skipped so far: AdamW's bias correction counts only the
    steps taken, as torch's does.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale = float(np.float32(init_scale))
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.growth_tracker = 0   # good steps in a row since the last change of the scale
        self.skipped_steps = 0
        self.found_inf = None     # set by unscale_, used by step and update

    def scale_loss(self, loss):
        return loss * self.scale

    def unscale_(self, opt):
        """Divide the gradients of `opt` (a jittor.optim optimizer) by the scale, in place, and
        note whether any is inf or NaN. Returns True when all are finite."""
        # torch multiplies by the reciprocal, computed in float64 and rounded to float32
        inv = float(np.float32(1.0 / np.float64(self.scale)))
        counts = [g.isfinite().logical_not().sum() for g in self._grads(opt, inv)]
        self.found_inf = bool(counts) and sum(counts).item() > 0
        return not self.found_inf

    @staticmethod
    def _grads(opt, factor):
        """The gradients of opt's trainable parameters, each multiplied by factor in place."""
        for pg in opt.param_groups:
            for p, g in zip(pg["params"], pg.get("grads", ())):
                if not p.is_stop_grad():
                    g.update(g * factor)
                    yield g

    def step(self, opt):
        """opt.step() on the unscaled gradients, or nothing (gradients dropped) when one of them
        was not finite. Returns True when the step was taken."""
        if self.found_inf is None:
            self.unscale_(opt)
        if self.found_inf:
            opt.zero_grad()  # the next backward() starts from zero
            self.skipped_steps += 1
            return False
        opt.step()
        return True

    def update(self):
        if self.found_inf is None:
            raise RuntimeError("LossScaler.update() without unscale_() or step() since the last update")
        if self.found_inf:
            self.scale = float(np.float32(self.scale * self.backoff_factor))
            self.growth_tracker = 0
        elif self.growth_tracker + 1 == self.growth_interval:
            with np.errstate(over="ignore"):
                grown = np.float32(self.scale * self.growth_factor)
            if np.isfinite(grown):
                self.scale = float(grown)
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
        self.found_inf = None

    def state_dict(self):
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self.growth_tracker,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state):
        self.scale, self.growth_tracker = float(state["scale"]), int(state["_growth_tracker"])
        self.growth_factor, self.backoff_factor = float(state["growth_factor"]), float(state["backoff_factor"])
        self.growth_interval, self.skipped_steps = int(state["growth_interval"]), int(state["skipped_steps"])
        self.found_inf = None
