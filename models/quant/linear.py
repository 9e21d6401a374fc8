"""`Int8Linear`, the per-channel quantizer, and the swap that puts Int8Linears in a model.

Quantization is a swap, not a branch: build the model as usual, then

    quantize(model, predicate)          # fp32 weights in memory -> int8 (offline quantizer)
    swap_int8(model, predicate)         # empty Int8Linears of the same shapes, then
    model.load_state_dict(int8_state)   #   load an int8 checkpoint into them,
    prepare_int8(model)                 #   and pack weights for the kernel (quant/fusion.py)

State dict of an `Int8Linear` named `<name>`: `<name>.weight` int8 (out, in), `<name>.scales`
float32 (out,), and `<name>.bias` float32 (out,) only when the Linear had a bias;
w ~= weight * scales[:, None].

Blocks (`group=32`): a GGUF's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 weights kept exactly as the file has
them, one float16 scale (and for Q4_1/Q5_1 one float16 min) per 32 inputs of a row:
`<name>.scales` float16 (out, in / 32) and `<name>.mins` float16 (in / 32, out), stored
transposed as the kernel reads them; w[o, i] = weight[o, i] * scales[o, i // 32]
+ mins[i // 32, o]. Only "w8a16" (else "dequant") runs them: fbgemm and int8pack take
per-channel scales. Why: rounding SmolLM2's Q4_1 GGUF weights again to per-channel int8
flips ~3% of top-1 tokens; kept as they are, none (tests/test_quant.py). Where a layer's
values fit 4 bits, Store.load also packs them as `Nibbles`, which w8a16 reads with the same
bits at half the bytes.

A forward runs the kernel `prepare()` chose (models/kernels/backends.py); a forward on an
unprepared layer prepares it under a lock. Loading a state dict or moving the module drops
the prepared state, so packed weights never go stale.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import torch
from torch import nn

from llm_shard.models.kernels import w8a16
from llm_shard.models.kernels.backends import Kernel, Nibbles, check_name, choose_kernel

QMAX = 127  # symmetric int8: [-127, 127], -128 unused
GROUPS = (0, w8a16.BLOCK)  # inputs per scale: 0 = one scale per output row

_PLAN_SERIALS = itertools.count(1)  # Int8Linear.plan_serial: never reused in a process
_LAST_SERIAL = [0]  # the latest plan_serial given out: plan_epoch()
PREPARE_LOCK = threading.Lock()  # packing weights: one layer at a time


def plan_epoch() -> int:
    """Changes whenever any Int8Linear's plan changes (prepared, dropped, fused)."""
    return _LAST_SERIAL[0]


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q int8 (out, in), scales float32 (out,)).

    w ~= q * scales[:, None]; an all-zero row gets scale 1.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T + bias, with int8 weight and per-row scales;
    or with `group` (32) inputs per scale, blocks as the module docstring says (`mins`:
    with a float16 min per block).

    `kernel` names the preferred kernel (None: the device's preference list).
    `nibbles` (a `Nibbles`, set by Store.load's `weights_to_huge_pages`) gives w8a16 the
    weight at 4 bits a value where it fits.
    """

    nibbles: Nibbles | None = None

    def nibbles_now(self) -> Nibbles | None:
        """`nibbles` while they still stand for the weight (a load or a move drops them)."""
        nib = self.__dict__.get("nibbles")
        return nib if nib is not None and nib.weight is self._buffers["weight"] else None

    @property
    def device(self) -> torch.device:
        """Where the layer computes: its weight's device, or its nibbles' (a fused layer's
        weight is a meta tensor)."""
        nib = self.nibbles_now()
        return nib.packed.device if nib is not None else self.weight.device

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, kernel: str | None = None,
                 group: int = 0, mins: bool = False) -> None:
        super().__init__()
        check_name(kernel)
        if group not in GROUPS or (group and in_features % group):
            raise ValueError(f"group={group} with in_features={in_features}: the group must be "
                             f"one of {GROUPS} and divide in_features")
        if mins and not group:
            raise ValueError("mins come with blocks: give group as well")
        self.in_features, self.out_features = in_features, out_features
        self.group = group
        self.preferred_kernel = kernel
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(
            *self._shapes()["scales"], dtype=self._dtypes()["scales"], device=device))
        self.register_buffer("mins", torch.zeros(*self._shapes()["mins"], dtype=torch.float16,
                                                 device=device) if mins else None)
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float32, device=device)
            if bias else None)
        self._plan = None

    @property
    def _plan(self) -> tuple[Kernel, object] | None:
        """The kernel and its packed state (None: not prepared). Every assignment stamps
        a new `plan_serial`, unique in the process: what was built from a plan (decode.py's
        block specs) is still valid while the serial is the same."""
        return self.__dict__["_plan_state"]

    @_plan.setter
    def _plan(self, plan: tuple[Kernel, object] | None) -> None:
        self.__dict__["_plan_state"] = plan
        self.__dict__["plan_serial"] = _LAST_SERIAL[0] = next(_PLAN_SERIALS)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str | None = None) -> Int8Linear:
        q, scales = quantize_weight(linear.weight)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=linear.weight.device, kernel=kernel)
        m.weight.copy_(q)
        m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    @property
    def kernel(self) -> str | None:
        """The kernel the layer runs with, or None before it is prepared."""
        return None if self._plan is None else self._plan[0].name

    @property
    def running(self) -> str | None:
        """The kernel that computes this layer, "auto" and "fused" resolved (None before
        it is prepared)."""
        if self._plan is None:
            return None
        kernel, state = self._plan
        if kernel.name == "fused":  # a member of a fused layer (quant/fusion.py)
            return state.fused.running
        return state[0].name if kernel.name == "auto" else kernel.name

    def prepare(self, kernel: str | None = None) -> str:
        """Chooses this layer's kernel and packs weights for it; returns the kernel's name.

        `kernel` (if given) becomes the layer's preferred kernel, kept across reloads.
        """
        if kernel is not None:
            self.preferred_kernel = kernel
        self._check_buffers()
        with PREPARE_LOCK:
            chosen = choose_kernel(self, self.preferred_kernel)
            with torch.no_grad():
                self._plan = (chosen, chosen.pack(self))
        return chosen.name

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        out_f, in_f, g = self.out_features, self.in_features, self.group
        return {"weight": (out_f, in_f), "scales": (out_f, in_f // g) if g else (out_f,),
                "mins": (in_f // g, out_f) if g else (), "bias": (out_f,)}

    def _dtypes(self) -> dict[str, torch.dtype]:
        return {"weight": torch.int8, "scales": torch.float16 if self.group else torch.float32,
                "mins": torch.float16, "bias": torch.float32}

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) these int8 values stand for."""
        if not self.group:
            return self.weight.to(dtype) * self.scales.to(dtype)[:, None]
        out_f, nb = self.out_features, self.in_features // self.group
        w = self.weight.view(out_f, nb, self.group).to(dtype) * self.scales.to(dtype)[..., None]
        if self.mins is not None:
            w += self.mins.t().to(dtype)[..., None]
        return w.view(out_f, self.in_features)

    def _check_buffers(self) -> None:
        """A state dict loaded with assign=True may bring other dtypes or shapes."""
        shapes, dtypes = self._shapes(), self._dtypes()
        for name in ("weight", "scales", "mins", "bias"):
            dtype, shape = dtypes[name], shapes[name]
            t = getattr(self, name)
            if t is not None and (t.dtype != dtype or tuple(t.shape) != shape):
                raise ValueError(f"Int8Linear.{name} must be {dtype} {shape}, "
                                 f"got {t.dtype} {tuple(t.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if plan is None:
            self.prepare()
            plan = self._plan
        kernel, state = plan
        if x.dim() == 2:
            return kernel.run(self, state, x)
        y = kernel.run(self, state, x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    # Packed weights are derived from the buffers: drop them whenever the buffers change.
    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._plan = None
        super()._load_from_state_dict(*args, **kwargs)
        self._keep_dtypes()  # load_state_dict(assign=True) may bring others

    def _apply(self, fn, recurse: bool = True):
        self._plan = None
        before = {n: self._buffers[n] for n in ("scales", "mins", "bias")
                  if self._buffers[n] is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():  # module.to(torch.bfloat16) must not round them:
            new = self._buffers[name]     # a cast takes the new device only
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _keep_dtypes(self) -> None:
        dtypes = self._dtypes()
        for name in ("scales", "mins", "bias"):
            buf = self._buffers[name]
            if buf is not None and buf.is_floating_point() and buf.dtype != dtypes[name]:
                self._buffers[name] = buf.to(dtypes[name])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plan_state": None, "plan_serial": next(_PLAN_SERIALS),
                "nibbles": None}

    def extra_repr(self) -> str:
        blocks = (f", group={self.group}, mins={self.mins is not None}" if self.group else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{blocks}, "
                f"kernel={self.kernel or self.preferred_kernel}")


Predicate = Callable[[str, nn.Module], bool]


def replace_linears(module: nn.Module, predicate: Predicate | None,
                    make: Callable[[str, nn.Linear], nn.Module]) -> list[tuple[str, nn.Module]]:
    """Sets `make(name, linear)` in place of every nn.Linear of `module` with
    predicate(name, linear) true (default: all); returns [(name, new module)]."""
    chosen = [(name, mod) for name, mod in module.named_modules()
              if isinstance(mod, nn.Linear) and (predicate is None or predicate(name, mod))]
    out = []
    for name, linear in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, attr, made := make(name, linear))
        out.append((name, made))
    return out


def quantize(module: nn.Module, predicate: Predicate | None = None,
             kernel: str | None = None) -> nn.Module:
    """Replaces, in place, every nn.Linear with predicate(name, linear) true (default: all)
    by an Int8Linear quantized from its weights; returns `module`."""
    if isinstance(module, nn.Linear):
        raise TypeError("quantize() swaps children in place; use Int8Linear.from_linear")
    replace_linears(module, predicate,
                    lambda name, lin: Int8Linear.from_linear(lin, kernel=kernel))
    return module


def int8_formats(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, bool]]:
    """{layer name: (group, has mins)} of the Int8Linears whose tensors `state` holds."""
    out = {}
    for key, scales in state.items():
        if key.endswith(".scales"):
            name = key[: -len(".scales")]
            group = state[f"{name}.weight"].shape[1] // scales.shape[1] if scales.dim() == 2 else 0
            out[name] = (group, f"{name}.mins" in state)
    return out


def keeps_dtype(key: str, t: torch.Tensor) -> bool:
    """Whether a stored tensor keeps its dtype whatever the compute dtype: int8 weights and
    their scales and mins."""
    return t.dtype == torch.int8 or key.endswith((".scales", ".mins"))


def swap_int8(module: nn.Module, predicate: Predicate | None = None,
              kernel: str | None = None,
              formats: dict[str, tuple[int, bool]] | None = None) -> nn.Module:
    """Like quantize(), but the Int8Linears are empty (zero weights) and the Linears' own
    weights are never read, so they may be uninitialized or on the meta device: for
    loading an int8 state dict next. `formats` ({name: (group, mins)}, as `int8_formats`
    reads them from a state dict) gives layers in blocks; without a predicate, exactly its
    layers are swapped. Returns `module`."""
    if isinstance(module, nn.Linear):
        raise TypeError("swap_int8() swaps children in place; build an Int8Linear instead")
    formats = formats or {}
    if predicate is None and formats:
        def predicate(name, _m):
            return name in formats

    def make(name: str, lin: nn.Linear) -> Int8Linear:
        device = None if lin.weight.device.type == "meta" else lin.weight.device
        group, mins = formats.get(name, (0, False))
        return Int8Linear(lin.in_features, lin.out_features, lin.bias is not None,
                          device=device, kernel=kernel, group=group, mins=mins)

    replace_linears(module, predicate, make)
    return module


def int8_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of every Int8Linear in `module`: `<name>.weight` (int8), `<name>.scales`,
    `<name>.mins` (blocks with mins) and `<name>.bias` (float32) where the layer has one."""
    return {k: v for name, mod in module.named_modules() if isinstance(mod, Int8Linear)
            for k, v in mod.state_dict(prefix=f"{name}." if name else "").items()}
