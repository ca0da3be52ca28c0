"""A second device with real values, for device-placement tests on a machine without a GPU.

Inside :class:`OtherDevice`, a tensor moved or created ``device="meta"`` becomes a
:class:`Remote`: it reports the ``meta`` device but carries real CPU values, so a method's
clustering step (k-means, argmax, ``.item()``) runs to the end. Every op is first run on
``meta`` stand-ins of its Remote arguments beside its CPU arguments as they are; that is the
dispatcher's own same-device rule (CUDA's: meta and CUDA reject a CPU tensor in the same
places, "Tensor on device cpu is not on the expected device meta"), so an op that mixes the
model's device with a CPU tensor raises here as it would on a GPU. Then the op runs on the
CPU values and each output the meta run placed on ``meta`` is wrapped again.

Ops with data-dependent shapes (``nonzero``, boolean masks, ``bincount``) have no meta
kernel: for those, any CPU tensor of one or more dimensions beside a Remote one is an error
(0-dim CPU tensors pass, as CUDA allows CPU scalars in elementwise ops).

``mode.syncs`` counts host reads of Remote values (``.item()``, ``bool()``, ``float()``):
device-to-host syncs on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

META = torch.device("meta")
CPU = torch.device("cpu")


class DeviceMismatch(RuntimeError):
    """An op mixed the model's device with CPU tensors."""


class Remote(torch.Tensor):
    """A tensor on the emulated device: ``.device`` is ``meta``, ``value`` the CPU data."""

    value: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, value: torch.Tensor) -> Remote:
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            value.shape,
            strides=value.stride(),
            dtype=value.dtype,
            device=META,
            requires_grad=value.requires_grad,
        )
        out.value = value.detach()
        return out

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Remote({self.value!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        raise DeviceMismatch(f"{func} on a Remote tensor outside OtherDevice")


def _is_meta_device(d: Any) -> bool:
    return d is not None and torch.device(d).type == "meta"


class OtherDevice(TorchDispatchMode):
    """``with OtherDevice() as mode:`` ``meta`` is a device with values (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        flat = [*args, *kwargs.values()]
        leaves: list[Any] = []
        tree_map(leaves.append, flat)
        remote = any(isinstance(t, Remote) for t in leaves)
        if not remote and not _is_meta_device(kwargs.get("device")):
            return func(*args, **kwargs)  # plain CPU: untouched
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
            return func(args[0].value)
        if func is torch.ops.aten._to_copy.default:  # .to(device): the one way across
            src = args[0]
            to = kwargs.get("device") or (META if isinstance(src, Remote) else CPU)
            out = func(self._value(src), **{**kwargs, "device": CPU})
            return Remote(out) if _is_meta_device(to) else out
        if func is torch.ops.aten.copy_.default:  # copy_ may cross devices too
            dst = args[0].value if isinstance(args[0], Remote) else args[0]
            dst.copy_(self._value(args[1]), *args[2:], **kwargs)
            return args[0]
        on_meta = self._meta_devices(func, args, kwargs, leaves)
        real_args, real_kwargs = tree_map(self._value, (args, kwargs))
        if _is_meta_device(real_kwargs.get("device")):
            real_kwargs["device"] = CPU
        out = func(*real_args, **real_kwargs)
        return self._wrap(out, on_meta, leaves)

    @staticmethod
    def _value(t: Any) -> Any:
        return t.value if isinstance(t, Remote) else t

    def _meta_devices(self, func, args, kwargs, leaves) -> Any:  # type: ignore[no-untyped-def]
        """The device pattern of the outputs from a run on meta stand-ins (or None where the
        op has no meta kernel: then a manual check, every output on meta)."""

        def stand_in(t: Any) -> Any:
            if isinstance(t, Remote):
                return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=META)
            return t

        margs, mkwargs = tree_map(stand_in, (args, kwargs))
        try:
            with torch.utils._python_dispatch._disable_current_modes():
                out = func(*margs, **mkwargs)
        except NotImplementedError:
            cpu = [t for t in leaves if type(t) is torch.Tensor and t.dim() > 0]
            if cpu and not _is_meta_device(kwargs.get("device")):
                raise DeviceMismatch(
                    f"{func}: CPU tensor(s) {[tuple(t.shape) for t in cpu]} beside the "
                    "model's device"
                ) from None
            return None
        except RuntimeError as e:
            if "device" in str(e):
                raise DeviceMismatch(f"{func}: {e}") from None
            raise
        return tree_map(lambda t: isinstance(t, torch.Tensor) and t.device.type == "meta", out)

    @staticmethod
    def _wrap(out: Any, on_meta: Any, leaves: list[Any]) -> Any:
        # in-place and out= ops return their argument: hand back the Remote itself
        by_value = {id(t.value): t for t in leaves if isinstance(t, Remote)}

        def wrap(t: Any, meta: bool) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in by_value:
                return by_value[id(t)]
            return Remote(t) if meta else t

        if on_meta is None:
            return tree_map(lambda t: wrap(t, True), out)
        if isinstance(out, torch.Tensor):
            return wrap(out, bool(on_meta))
        if isinstance(out, tuple | list):
            return type(out)(wrap(t, bool(m)) for t, m in zip(out, on_meta, strict=True))
        return out
