"""Segmentation networks chosen by name: MISSU and the MONAI baselines.

``build_network(name, in_channels, out_channels, roi_size, **kwargs)`` looks the name up in
:data:`NETWORKS`; a variant is a keyword argument, never a subclass. Every network maps
(B, in_channels, D, H, W) to logits (B, out_channels, D, H, W) in eval mode; MISSU in training
mode returns ``(logits, distillation)`` (see :mod:`bonemet.segmentation.missu`).

Input sizes each network accepts (D, H, W, voxels): MISSU any multiple of 8 x ``stem_stride``; UNet any multiple of
the product of its strides (16 by default); UNETR exactly ``roi_size`` (a multiple of its 16^3
patches); SwinUNETR any multiple of 32 with at least one dimension >= 64.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from bonemet.segmentation.missu import (
    MISSU,
    NetworkConfigError,
    NetworkInputError,
    check_roi_size,
)

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import PlannedSegmentSpec

__all__ = [
    "NETWORKS",
    "MISSU",
    "ExportedNetwork",
    "NetworkConfigError",
    "NetworkInputError",
    "activation_mb",
    "build_network",
    "count_parameters",
    "evaluable",
    "example_logits",
    "input_divisor",
    "network_from_spec",
    "network_kwargs",
    "seed_everything",
]

#: CT in, background and lesion out: the channels of every network here.
CT_CHANNELS = 1
N_CLASSES = 2
UNETR_PATCH = 16  # MONAI UNETR's ViT patch edge, voxels
SWINUNETR_DIVISOR = 32  # patch 2 x four merging stages: 2**5


def _checked_kwargs(
    network: str, cls: type, kwargs: dict[str, Any], reserved: Sequence[str]
) -> dict[str, Any]:
    """Refuse keywords the MONAI constructor does not take (a typo would otherwise be a TypeError)."""
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", *reserved}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(allowed), n=2, cutoff=0.6)
            hints.append(f"'{key}'" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise NetworkConfigError(
            f"segment.networks.{network}: unknown argument(s) {', '.join(hints)}; expected some of {sorted(allowed)}"
        )
    return kwargs


def _construct(network: str, cls: type, **kwargs: Any) -> nn.Module:
    try:
        return cls(**kwargs)
    except NetworkConfigError:
        raise
    except (ValueError, TypeError, AssertionError) as exc:
        raise NetworkConfigError(f"{network}: cannot build with {kwargs}: {exc}") from exc


def _check_channels(network: str, in_channels: int, out_channels: int) -> None:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NetworkConfigError(f"{network}: {name} must be an integer >= 1; found {value!r}")


def _build_missu(in_channels: int, out_channels: int, roi_size: Sequence[int], **kwargs: Any) -> nn.Module:
    _checked_kwargs("missu", MISSU, kwargs, ("in_channels", "out_channels", "roi_size"))
    return MISSU(in_channels=in_channels, out_channels=out_channels, roi_size=roi_size, **kwargs)


def _build_unet(in_channels: int, out_channels: int, roi_size: Sequence[int], **kwargs: Any) -> nn.Module:
    from monai.networks.nets import UNet

    _check_channels("unet", in_channels, out_channels)
    args = _checked_kwargs("unet", UNet, kwargs, ("spatial_dims", "in_channels", "out_channels"))
    check_roi_size(roi_size, _unet_divisor(args.get("strides")), "unet")
    return _construct(
        "unet", UNet, spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **args
    )


def _unet_divisor(strides: Sequence[int]) -> int:
    if isinstance(strides, (str, bytes)) or not isinstance(strides, Sequence) or not strides:
        raise NetworkConfigError(f"unet: strides must be a non-empty list of integers; found {strides!r}")
    return math.prod(int(s) for s in strides)


def _build_unetr(in_channels: int, out_channels: int, roi_size: Sequence[int], **kwargs: Any) -> nn.Module:
    from monai.networks.nets import UNETR

    _check_channels("unetr", in_channels, out_channels)
    args = _checked_kwargs("unetr", UNETR, kwargs, ("spatial_dims", "in_channels", "out_channels", "img_size"))
    roi = check_roi_size(roi_size, UNETR_PATCH, "unetr")
    return _construct(
        "unetr",
        UNETR,
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=roi,
        **args,
    )


def _build_swinunetr(
    in_channels: int, out_channels: int, roi_size: Sequence[int], **kwargs: Any
) -> nn.Module:
    # MONAI 1.6 removed SwinUNETR's img_size: the crop only has to be a multiple of 32.
    from monai.networks.nets import SwinUNETR

    _check_channels("swinunetr", in_channels, out_channels)
    args = _checked_kwargs("swinunetr", SwinUNETR, kwargs, ("spatial_dims", "in_channels", "out_channels"))
    roi = check_roi_size(roi_size, SWINUNETR_DIVISOR, "swinunetr")
    if math.prod(d // SWINUNETR_DIVISOR for d in roi) < 2:
        # Its bottleneck sits at 1/32 scale and is instance-normalised: a single voxel there cannot be.
        raise NetworkConfigError(
            f"swinunetr: roi_size must span more than one 32^3 block (one dimension >= 64); found {roi}"
        )
    return _construct(
        "swinunetr", SwinUNETR, spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **args
    )


#: name -> builder(in_channels, out_channels, roi_size, **kwargs)
NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "missu": _build_missu,
    "unet": _build_unet,
    "unetr": _build_unetr,
    "swinunetr": _build_swinunetr,
}


def build_network(
    name: str,
    *,
    in_channels: int,
    out_channels: int,
    roi_size: Sequence[int],
    **kwargs: Any,
) -> nn.Module:
    """Build the segmentation network ``name`` for crops of ``roi_size`` (D, H, W) voxels.

    Args:
        name: one of :data:`NETWORKS` ("missu", "unet", "unetr", "swinunetr").
        in_channels: image channels (1 for CT).
        out_channels: classes including background (2).
        roi_size: training / sliding-window crop in voxels; must suit the network (see module doc).
        **kwargs: the network's own size arguments (MISSU: widths, blocks, embed_dim, num_layers,
            num_heads, mlp_dim, groups, dropout, ...; MONAI baselines: their constructor keywords).

    Raises:
        NetworkConfigError (a ValueError): unknown name, unknown keyword, or arguments that cannot
        build the network, with what was expected and what was found.
    """
    builder = NETWORKS.get(name) if isinstance(name, str) else None
    if builder is None:
        raise NetworkConfigError(f"unknown segmentation network {name!r}; expected one of {sorted(NETWORKS)}")
    return builder(in_channels, out_channels, roi_size, **kwargs)


def network_kwargs(spec: PlannedSegmentSpec, name: str | None = None) -> dict[str, Any]:
    """The keyword arguments of network ``name`` (default ``spec.model``) from ``segment.networks``."""
    name = name or spec.model
    value = getattr(spec.networks, name)
    return value.model_dump(mode="python") if hasattr(value, "model_dump") else dict(value)


def network_from_spec(spec: PlannedSegmentSpec, name: str | None = None) -> nn.Module:
    """A fresh network ``name`` (default ``spec.model``) for CT crops of ``spec.roi_size`` voxels."""
    name = name or spec.model
    return build_network(name, in_channels=CT_CHANNELS, out_channels=N_CLASSES, roi_size=spec.roi_size,
                         **network_kwargs(spec, name))


def input_divisor(name: str, **kwargs: Any) -> int:
    """Each spatial input dimension (voxels) must be a multiple of this for network ``name``."""
    if name == "missu":
        if "stem_stride" not in kwargs:
            raise NetworkConfigError("missu: input_divisor needs stem_stride (segment.networks.missu.stem_stride)")
        stride = kwargs["stem_stride"]
        return 8 * (int(stride) if isinstance(stride, int) and not isinstance(stride, bool) else 1)
    if name == "unet":
        return _unet_divisor(kwargs.get("strides"))
    if name == "unetr":
        return UNETR_PATCH
    if name == "swinunetr":
        return SWINUNETR_DIVISOR
    raise NetworkConfigError(f"unknown segmentation network {name!r}; expected one of {sorted(NETWORKS)}")


def count_parameters(model: nn.Module, inference_only: bool = False) -> int:
    """Number of parameters (trainable or not) of the full training graph or of the inference path.

    With ``inference_only`` the parameters a network reports through ``training_only_parameters()``
    (MISSU's self-distillation teachers) are left out; networks without that method have one path.
    """
    params = {id(p): p for p in model.parameters()}
    if inference_only and hasattr(model, "training_only_parameters"):
        for p in model.training_only_parameters():
            params.pop(id(p), None)
    return sum(p.numel() for p in params.values())


# --- torch for the other layers ----------------------------------------------------------------
# bonemet.segmentation is the one home of torch and MONAI (tests/test_layers.py): planning,
# the registry and the stages call these functions instead of importing torch themselves.


def seed_everything(seed: int) -> None:
    """Seed Python and NumPy (:func:`bonemet.utils.seed_everything`) and torch."""
    import torch

    from bonemet.utils import seed_everything as seed_python_numpy

    seed_python_numpy(seed)
    torch.manual_seed(seed)


def activation_mb(network: str, kwargs: Mapping[str, Any], roi_size: Sequence[int]) -> tuple[float, int]:
    """``(MB of the outputs of every leaf module for one crop in training mode, parameter count)``:
    measured on torch's meta device (shapes only; the plan's memory estimate)."""
    import torch

    total = 0

    def count(_module: Any, _inputs: Any, output: Any) -> None:
        nonlocal total
        outputs = output if isinstance(output, tuple | list) else (output,)
        total += sum(o.numel() for o in outputs if isinstance(o, torch.Tensor))

    with torch.device("meta"):
        net = build_network(network, in_channels=CT_CHANNELS, out_channels=N_CLASSES, roi_size=tuple(roi_size),
                            **dict(kwargs))
        hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
        net.train()
        net(torch.zeros(1, CT_CHANNELS, *roi_size))
    for hook in hooks:
        hook.remove()
    return total * 4 / 2**20, sum(p.numel() for p in net.parameters())


def example_logits(network: nn.Module, example: Any) -> Any:
    """The logits (a NumPy array) of ``network`` for ``example`` (a float32 array ``(B, 1, D, H, W)``),
    without gradients; a ``(logits, distillation)`` answer gives its logits."""
    import numpy as np
    import torch

    with torch.no_grad():
        output = network(torch.from_numpy(np.asarray(example, dtype=np.float32)))
    output = output[0] if isinstance(output, tuple) else output
    return output.detach().cpu().numpy()


class ExportedNetwork(nn.Module):
    """A network that refuses ``eval()`` (a ``pt2``, torch.export, GraphModule) behind a module that
    takes it: the inner network is kept out of the module tree, so that ``eval()`` reaches only
    the wrapper."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self._inner = (inner,)  # a tuple: not a registered child, so eval() stays here

    def forward(self, x: Any) -> Any:
        return self._inner[0](x)


def evaluable(network: Any) -> nn.Module:
    """``network`` in eval mode; a ``pt2`` (torch.export) module, which refuses ``eval()``, is wrapped
    (:class:`ExportedNetwork`): the sliding-window inference calls ``model.eval()``."""
    try:
        network.eval()
        return network
    except (NotImplementedError, RuntimeError):
        pass
    return ExportedNetwork(network).eval()
