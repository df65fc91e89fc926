"""Timing, peak memory and FLOP counting for one training step (forward + backward + AdamW step).

- `warm_up`, then `interleaved_times`: every method is warmed up, then timed one step at a
  time in rounds (method order rotated each round), so a slow spell on a shared machine hits
  all methods alike. `paired_ratio` compares two methods round by round (median and quartiles
  of the per-round ratios), which cancels the machine's slow drift better than a ratio of two
  medians. Ratios are only meaningful within one run. A method that runs out of GPU memory is
  reported as such; the others go on.
- `step_peak_bytes`: the memory one step of one method needs, counted the same way on every
  device: the tensors that exist before the step (base model, inputs, this method's adapter
  and optimizer state; shared storage counted once) plus the step's peak of newly allocated
  tensor memory. On CUDA the latter is `max_memory_allocated - memory_allocated` around the
  step; on CPU it comes from `PeakTensorMemory`, a dispatcher-level tracker (every tensor an
  ATen op allocates, until it is freed), because process RSS on CPU mostly shows what the
  malloc arena keeps cached from earlier methods rather than what this step needs.
- `step_flops`: FLOPs of one step as counted by `torch.utils.flop_counter` (matmuls and
  attention, forward and backward), used as the model FLOPs for MFU.
"""
from __future__ import annotations

import statistics
import time
import weakref
from contextlib import nullcontext
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated by ATen ops while active: `current` and `peak`.

    A storage is new when no input of the op shares it (views and in-place results are not
    new); it stops counting when it is freed. Tensors that existed before are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}                   # data_ptr -> bytes
        self._finalizers: list[weakref.finalize] = []

    def _free(self, ptr: int) -> None:
        self.current -= self._live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self._live:
                continue
            self._live[ptr] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self._finalizers.append(weakref.finalize(st, self._free, ptr))
        return out

    def __exit__(self, *exc):
        for f in self._finalizers:                        # storages still alive stop reporting to us
            f.detach()
        return super().__exit__(*exc)


def make_step(params: list[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor], amp: torch.dtype | None,
              device: torch.device, inputs: tuple[torch.Tensor, ...] = ()) -> Callable[[], None]:
    """One training step: loss (under autocast when amp is set), backward, AdamW step, then every
    grad (of params and of `inputs`, e.g. a layer input that requires grad) set to None."""
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext

    def step() -> None:
        with ctx():
            loss = loss_fn()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None
    step.optimizer = opt
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(steps: dict[str, tuple[Callable[[], None], Callable[[], None]]], device: torch.device,
            warmup: int) -> dict[str, str]:
    """Run `warmup` steps of every method; methods that run out of memory are removed from `steps`
    and returned as name -> 'out of memory' (the others still run)."""
    failed = {}
    for name in list(steps):
        install, step = steps[name]
        try:
            install()
            for _ in range(warmup):
                step()
        except torch.OutOfMemoryError:
            failed[name] = "out of memory"
            del steps[name]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return failed


def interleaved_times(steps: dict[str, tuple[Callable[[], None], Callable[[], None]]], device: torch.device,
                      rounds: int) -> dict[str, list[float]]:
    """name -> step seconds of each of `rounds` rounds; each round times one step of every method
    (order rotated per round). steps: name -> (install, step); install runs untimed before each step."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            install, step = steps[name]
            install()
            _sync(device)
            t = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); all three equal the value for a single value."""
    if len(values) < 2:
        return (values[0],) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Quartiles (q1, median, q3) of the per-round ratios a[i] / b[i] of two methods timed in the same rounds."""
    return quartiles([x / y for x, y in zip(a, b, strict=True)])


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared weights counted once)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[(t.device, st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def resident_tensors(modules, inputs, step) -> list[torch.Tensor]:
    """Everything a method keeps between steps: module params and buffers, inputs, optimizer state."""
    out = [t for m in modules for t in list(m.parameters()) + list(m.buffers())] + list(inputs)
    opt = getattr(step, "optimizer", None)
    if opt is not None:
        out += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def step_peak_bytes(step: Callable[[], None], device: torch.device, resident: list[torch.Tensor]) -> int:
    """Resident bytes + the peak of new allocations during one (already warmed-up) step."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        transient = torch.cuda.max_memory_allocated(device) - before
    else:
        with PeakTensorMemory() as mem:
            step()
        transient = mem.peak
    return unique_bytes(resident) + transient


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one step counted by torch's FlopCounterMode (forward + backward matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        step()
    return int(fc.get_total_flops())


# Dense BF16 tensor-core peaks (NVIDIA datasheets), matched in order against the device name.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0)]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Peak TFLOP/s for MFU: --peak-tflops, else the table above for a known GPU, else None."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)
