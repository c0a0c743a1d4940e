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

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from bonemet.segmentation.missu import (
    MISSU,
    NetworkConfigError,
    NetworkInputError,
    check_roi_size,
)

__all__ = [
    "NETWORKS",
    "MISSU",
    "NetworkConfigError",
    "NetworkInputError",
    "build_network",
    "count_parameters",
    "input_divisor",
]

# Defaults for the MONAI baselines (overridable by keyword).
UNET_DEFAULTS: dict[str, Any] = {
    "channels": (16, 32, 64, 128, 256),
    "strides": (2, 2, 2, 2),
    "num_res_units": 2,
}
UNETR_DEFAULTS: dict[str, Any] = {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12}
UNETR_PATCH = 16  # MONAI UNETR's ViT patch edge, voxels
SWINUNETR_DEFAULTS: dict[str, Any] = {"feature_size": 24}
SWINUNETR_DIVISOR = 32  # patch 2 x four merging stages: 2**5


def _checked_kwargs(
    network: str, cls: type, kwargs: dict[str, Any], reserved: Sequence[str]
) -> dict[str, Any]:
    """Refuse keywords the MONAI constructor does not take (a typo would otherwise be a TypeError)."""
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", *reserved}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise NetworkConfigError(
            f"{network}: unknown argument(s) {unknown}; expected some of {sorted(allowed)}"
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
    args = {
        **UNET_DEFAULTS,
        **_checked_kwargs("unet", UNet, kwargs, ("spatial_dims", "in_channels", "out_channels")),
    }
    check_roi_size(roi_size, _unet_divisor(args["strides"]), "unet")
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
    args = {
        **UNETR_DEFAULTS,
        **_checked_kwargs(
            "unetr", UNETR, kwargs, ("spatial_dims", "in_channels", "out_channels", "img_size")
        ),
    }
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
    args = {
        **SWINUNETR_DEFAULTS,
        **_checked_kwargs("swinunetr", SwinUNETR, kwargs, ("spatial_dims", "in_channels", "out_channels")),
    }
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
    in_channels: int = 1,
    out_channels: int = 2,
    roi_size: Sequence[int] = (64, 64, 64),
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


def input_divisor(name: str, **kwargs: Any) -> int:
    """Each spatial input dimension (voxels) must be a multiple of this for network ``name``."""
    if name == "missu":
        stride = kwargs.get("stem_stride", 1)
        return 8 * (int(stride) if isinstance(stride, int) and not isinstance(stride, bool) else 1)
    if name == "unet":
        return _unet_divisor(kwargs.get("strides", UNET_DEFAULTS["strides"]))
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
