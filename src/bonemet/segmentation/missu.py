"""MISSU: a self-distilling TransUNet for 3D segmentation, built from its description.

References:
    Wang N, Lin S, Li X, et al. "MISSU: 3D Medical Image Segmentation via Self-distilling
    TransUNet." IEEE Transactions on Medical Imaging 42(9):2740-2750, 2023 (arXiv 2206.00902).
    Wang W, Chen C, Ding M, et al. "TransBTS: Multimodal Brain Tumor Segmentation Using
    Transformer." MICCAI 2021 (arXiv 2103.04430): the encoder / bottleneck transformer /
    decoder layout MISSU grows out of.

The public release of MISSU is incomplete (missing modules; the distillation loss is computed but
never added to the training loss), so this is our own implementation of the described network:

* encoder: a 3D CNN of GroupNorm pre-activation residual blocks at four scales (1, 1/2, 1/4, 1/8);
* bridge: GroupNorm + ReLU + 3^3 conv to the embedding size ``E``, flattened to tokens
  (one per voxel at 1/8 scale) with a learned positional embedding;
* transformer: ``num_layers`` pre-norm encoder layers over those tokens (global context);
* decoder: tokens back to a 1/8-scale volume, three up-steps with skip connections to the
  encoder (TransBTS ``DeUp_Cat``), 1x1 conv to the class logits;
* self-distillation (training only): at each of the four decoder scales a local multi-scale
  fusion block (:class:`LocalMultiScaleFusion`) fuses the decoder features at that scale with the
  local CNN encoder features at the same scale and the upsampled coarser decoder features, through
  parallel dilated 3^3 convolutions. Its output is the *teacher*; the decoder features themselves
  are the *student*. The term is the KL divergence between the channel-wise softmax of the
  teacher and the log-softmax of the student, summed over voxels, divided by batch x voxels at
  that scale, and summed over scales. The network returns it unweighted: the weight belongs to the
  training loop.

Teacher gradients. The teacher's *inputs* are detached, so the distillation term shapes the shared
network only through the student (as in the release, where the teacher is detached). With
``teacher_trainable=True`` (default) the fusion block's own weights still learn from the same term
(they fit the student's feature distribution from local multi-scale context, so the student is
pulled towards what its neighbourhood and coarser context predict). With
``teacher_trainable=False`` the teacher output is detached as well and the fusion weights are frozen
at their seeded random initialisation, which is what the release does.

Stem stride (a CPU variant; default 1 = the reference architecture). With ``stem_stride=2`` the
stem conv has stride 2, so the four levels run at 1/2, 1/4, 1/8, 1/16 of the input (tokens at
1/16) and the decoder ends with one more learned x2 upsampling (2^3 transposed conv, GroupNorm,
ReLU) back to full size before the 1x1 head. No 3^3 convolution then runs at full resolution,
which makes a training step several times cheaper on a CPU. ``distill_scales`` still name
*levels* by their factor relative to level 1 (8, 4, 2, 1), so the teacher at "1" sits at 1/2 of
the input with ``stem_stride=2``.

The inference path (eval mode) never calls the fusion blocks; ``self_distillation=False`` does not
even build them (the state dict then lacks their weights: load with ``strict=False`` or use
:meth:`MISSU.load_inference_state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bonemet.errors import BonemetError, UserError

DOWNSAMPLE_FACTOR = 8  # three stride-2 stages: tokens live at 1/8 of level 1 (stem_stride x 1/8 of the input)
N_SCALES = 4  # encoder / decoder scales: 1, 1/2, 1/4, 1/8 of level 1
STEM_STRIDES = (1, 2)  # 1: reference (level 1 at full size); 2: level 1 at half size


class NetworkConfigError(UserError, ValueError):
    """A network was asked for with arguments that cannot build it."""


class NetworkInputError(BonemetError, ValueError):
    """A tensor passed to a network has the wrong shape for it."""


class ResidualBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, ReLU, 3^3 conv) x 2 plus the identity."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpStep(nn.Module):
    """One decoder up-step (TransBTS ``DeUp_Cat`` + ``DeBlock``).

    1x1 conv (in -> out), 2^3 transposed conv (x2 upsampling), concatenation with the encoder
    skip (``out`` channels), 1x1 conv (2 out -> out), residual block.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.reduce = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        self.up = nn.ConvTranspose3d(out_channels, out_channels, kernel_size=2, stride=2)
        self.merge = nn.Conv3d(2 * out_channels, out_channels, kernel_size=1)
        self.block = ResidualBlock(out_channels, groups)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = self.up(self.reduce(x))
        y = self.merge(torch.cat([skip, y], dim=1))
        return self.block(y)


class LocalMultiScaleFusion(nn.Module):
    """Teacher of the self-distillation: local multi-scale fusion at one decoder scale.

    Every input is resized (trilinear) to the first input's grid and projected by a 1x1 conv to
    ``channels``; their sum passes through parallel 3^3 convolutions with the given dilation rates
    (receptive fields 3, 5, 7 voxels for rates 1, 2, 3), each followed by GroupNorm + ReLU; the
    branches are concatenated and fused by a 1x1 conv back to ``channels``.
    """

    def __init__(
        self, channels: int, input_channels: Sequence[int], dilations: Sequence[int], groups: int
    ) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Conv3d(c, channels, kernel_size=1) for c in input_channels)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(channels, channels, kernel_size=3, padding=r, dilation=r, bias=False),
                nn.GroupNorm(groups, channels),
                nn.ReLU(),
            )
            for r in dilations
        )
        self.fuse = nn.Conv3d(channels * len(dilations), channels, kernel_size=1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        size = inputs[0].shape[2:]
        fused = None
        for proj, feat in zip(self.project, inputs, strict=True):
            if feat.shape[2:] != size:
                feat = F.interpolate(feat, size=size, mode="trilinear", align_corners=False)
            fused = proj(feat) if fused is None else fused + proj(feat)
        return self.fuse(torch.cat([branch(fused) for branch in self.branches], dim=1))


def feature_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) over channels, summed over voxels / (batch x voxels).

    Both tensors are (B, C, D, H, W); computed in float32 (safe under autocast).
    """
    log_t = F.log_softmax(teacher.float(), dim=1)
    log_s = F.log_softmax(student.float(), dim=1)
    n = student.shape[0] * math.prod(student.shape[2:])
    return (log_t.exp() * (log_t - log_s)).sum() / n


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise NetworkConfigError(f"MISSU: {name} must be an integer >= {minimum}; found {value!r}")
    return value


def _check_rate(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise NetworkConfigError(f"MISSU: {name} must be a probability in [0, 1); found {value!r}")
    return float(value)


def check_roi_size(roi_size: object, divisor: int, network: str) -> tuple[int, int, int]:
    """Validate a (D, H, W) crop size in voxels; every dimension must be divisible by ``divisor``."""
    if isinstance(roi_size, int) and not isinstance(roi_size, bool):
        roi_size = (roi_size,) * 3
    if not isinstance(roi_size, Sequence) or isinstance(roi_size, str) or len(roi_size) != 3:
        raise NetworkConfigError(
            f"{network}: roi_size must be three integers (D, H, W) in voxels; found {roi_size!r}"
        )
    dims = []
    for d in roi_size:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise NetworkConfigError(
                f"{network}: roi_size must be three positive integers (D, H, W); found {tuple(roi_size)!r}"
            )
        dims.append(int(d))
    bad = [d for d in dims if d % divisor]
    if bad:
        raise NetworkConfigError(
            f"{network}: every roi_size dimension must be divisible by {divisor}; found {tuple(dims)} "
            f"({', '.join(map(str, bad))} not divisible)"
        )
    return dims[0], dims[1], dims[2]


class MISSU(nn.Module):
    """MISSU (Wang et al., IEEE TMI 2023, arXiv 2206.00902), a self-distilling TransBTS-style UNet.

    See the module docstring for the architecture. Sizes are arguments so a CPU profile can be tiny
    and the paper profile is the reference size.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: classes, background included (2: background, lesion).
        roi_size: training crop (D, H, W) in voxels; each divisible by 8 x ``stem_stride``. Sizes
            the learned positional embedding (one token per voxel at 1/8 of level 1). Other inputs
            divisible by 8 x ``stem_stride`` are accepted: the embedding is then resampled
            trilinearly.
        widths: channels of the encoder at scales 1, 1/2, 1/4, 1/8 (paper: 16, 32, 64, 128).
        blocks: residual blocks at those scales (paper: 1, 2, 2, 4; 0 allowed, e.g. to spare
            full-size convolutions on a CPU).
        embed_dim: transformer width E (paper 512); divisible by ``num_heads`` and by 4, and E/4
            by ``groups``.
        num_layers: transformer layers (paper 4).
        num_heads: attention heads (paper 8).
        mlp_dim: width of the transformer MLP (paper 1024; TransBTS 4096).
        groups: GroupNorm groups (8); must divide every width.
        dropout: 3D dropout after the first conv (0.2).
        embed_dropout: dropout on the tokens after the positional embedding (0.1).
        attn_dropout: dropout inside the transformer layers (0.1).
        self_distillation: build the fusion (teacher) blocks; without them training mode returns a
            zero distillation term.
        fusion_dilations: dilation rates of the fusion block's parallel 3^3 convs (1, 2, 3).
        teacher_trainable: whether the fusion blocks learn (see module docstring).
        distill_scales: decoder scales that get a teacher, as downsampling factors relative to
            level 1 (8, 4, 2, 1: all four, the default). Leaving out 1 spares the costliest,
            level-1 teacher.
        stem_stride: stride of the stem conv, 1 (reference: level 1 at full size) or 2 (level 1
            at half size, one extra learned x2 upsampling before the head; see module docstring).

    Forward:
        ``x`` (B, in_channels, D, H, W) with D, H, W divisible by 8 x ``stem_stride``. Eval mode returns logits
        (B, out_channels, D, H, W). Training mode returns ``(logits, distillation)``, the second an
        unweighted scalar tensor (0 without self-distillation).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        roi_size: Sequence[int],
        widths: Sequence[int],
        blocks: Sequence[int],
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
        groups: int,
        dropout: float,
        embed_dropout: float,
        attn_dropout: float,
        self_distillation: bool,
        fusion_dilations: Sequence[int],
        teacher_trainable: bool,
        distill_scales: Sequence[int],
        stem_stride: int,
    ) -> None:
        super().__init__()
        in_channels = _check_positive_int("in_channels", in_channels)
        out_channels = _check_positive_int("out_channels", out_channels)
        if isinstance(stem_stride, bool) or stem_stride not in STEM_STRIDES:
            raise NetworkConfigError(f"MISSU: stem_stride must be one of {STEM_STRIDES}; found {stem_stride!r}")
        self.stem_stride = int(stem_stride)
        self.divisor = DOWNSAMPLE_FACTOR * self.stem_stride
        self.roi_size = check_roi_size(roi_size, self.divisor, "MISSU")
        groups = _check_positive_int("groups", groups)
        widths = self._check_levels("widths", widths, groups)
        blocks = self._check_levels("blocks", blocks, None, minimum=0)
        self._check_transformer(embed_dim, num_heads, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.embed_dim = embed_dim
        self.self_distillation = bool(self_distillation)
        self.teacher_trainable = bool(teacher_trainable)
        self.distill_scales = self._check_distill_scales(distill_scales)
        # The build order below is the order of parameter initialisation: keep it for seeded runs.
        self._build_encoder(widths, blocks, groups, _check_rate("dropout", dropout))
        self._build_transformer(
            widths[-1], groups, _check_positive_int("num_layers", num_layers), num_heads,
            _check_positive_int("mlp_dim", mlp_dim), _check_rate("embed_dropout", embed_dropout),
            _check_rate("attn_dropout", attn_dropout),
        )
        dec_widths = self._build_decoder(widths, groups)
        self.fusion: nn.ModuleDict | None = None
        if self.self_distillation:
            self._build_teachers(widths, dec_widths, self._check_dilations(fusion_dilations), groups)

    @staticmethod
    def _check_transformer(embed_dim: object, num_heads: object, groups: int) -> None:
        embed_dim = _check_positive_int("embed_dim", embed_dim)
        num_heads = _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise NetworkConfigError(
                f"MISSU: embed_dim must be divisible by num_heads; found embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if embed_dim % 4 or (embed_dim // 4) % groups:
            raise NetworkConfigError(
                f"MISSU: embed_dim must be divisible by 4 and embed_dim/4 by groups={groups} "
                f"(the decoder starts at embed_dim/4 channels); found embed_dim={embed_dim}"
            )

    @staticmethod
    def _check_dilations(fusion_dilations: object) -> list[int]:
        if (
            isinstance(fusion_dilations, (str, bytes))
            or not isinstance(fusion_dilations, Sequence)
            or not fusion_dilations
        ):
            raise NetworkConfigError(
                f"MISSU: fusion_dilations must be a non-empty list of rates; found {fusion_dilations!r}"
            )
        return [_check_positive_int("fusion_dilations[]", r) for r in fusion_dilations]

    @staticmethod
    def _check_distill_scales(distill_scales: object) -> tuple[int, ...]:
        valid_scales = tuple(DOWNSAMPLE_FACTOR >> i for i in range(N_SCALES))  # 8, 4, 2, 1
        if (
            isinstance(distill_scales, (str, bytes))
            or not isinstance(distill_scales, Sequence)
            or not distill_scales
            or any(isinstance(f, bool) or f not in valid_scales for f in distill_scales)
            or len(set(distill_scales)) != len(distill_scales)
        ):
            raise NetworkConfigError(
                f"MISSU: distill_scales must be distinct downsampling factors from {valid_scales}; "
                f"found {distill_scales!r}"
            )
        return tuple(sorted((int(f) for f in distill_scales), reverse=True))

    def _build_encoder(self, widths: list[int], blocks: list[int], groups: int, dropout: float) -> None:
        """Stem (full size, or half size with stem_stride 2), then three stride-2 stages."""
        self.stem = nn.Sequential(
            nn.Conv3d(self.in_channels, widths[0], kernel_size=3, stride=self.stem_stride, padding=1),
            nn.Dropout3d(dropout),
        )
        self.downs = nn.ModuleList(
            [nn.Identity()]
            + [
                nn.Conv3d(widths[i - 1], widths[i], kernel_size=3, stride=2, padding=1)
                for i in range(1, N_SCALES)
            ]
        )
        self.encoder_blocks = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(widths[i], groups) for _ in range(blocks[i])])
            for i in range(N_SCALES)
        )

    def _build_transformer(self, width: int, groups: int, num_layers: int, num_heads: int, mlp_dim: int,
                           embed_dropout: float, attn_dropout: float) -> None:
        """Bridge to tokens at 1/8 scale, learned positional embedding, pre-norm transformer."""
        embed_dim = self.embed_dim
        self.bridge = nn.Sequential(
            nn.GroupNorm(groups, width),
            nn.ReLU(),
            nn.Conv3d(width, embed_dim, kernel_size=3, padding=1),
        )
        grid = tuple(d // self.divisor for d in self.roi_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.embed_dropout = nn.Dropout(embed_dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=embed_dim,
            nhead=num_heads,
            dim_feedforward=mlp_dim,
            dropout=attn_dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, num_layers=num_layers, norm=nn.LayerNorm(embed_dim), enable_nested_tensor=False
        )

    def _build_decoder(self, widths: list[int], groups: int) -> list[int]:
        """Tokens back to E/4 channels, three up-steps with skips, the head; returns the decoder
        widths at 1/8, 1/4, 1/2 and 1."""
        e4 = self.embed_dim // 4
        self.decoder_in = nn.Sequential(
            nn.Conv3d(self.embed_dim, e4, kernel_size=3, padding=1),
            nn.GroupNorm(groups, e4),
            nn.ReLU(),
            ResidualBlock(e4, groups),
        )
        dec_widths = [e4, widths[2], widths[1], widths[0]]
        self.up_steps = nn.ModuleList(
            UpStep(dec_widths[i], dec_widths[i + 1], groups) for i in range(N_SCALES - 1)
        )
        # stem_stride 2: level 1 is at half size; one learned x2 upsampling back to the input grid.
        self.final_up: nn.Module = nn.Identity()
        if self.stem_stride > 1:
            self.final_up = nn.Sequential(
                nn.ConvTranspose3d(
                    widths[0], widths[0], kernel_size=self.stem_stride, stride=self.stem_stride
                ),
                nn.GroupNorm(groups, widths[0]),
                nn.ReLU(),
            )
        self.head = nn.Conv3d(widths[0], self.out_channels, kernel_size=1)
        return dec_widths

    def _build_teachers(self, widths: list[int], dec_widths: list[int], dilations: list[int], groups: int) -> None:
        """Self-distillation teachers, keyed by the downsampling factor of their decoder scale
        ("8" coarsest ... "1" full size). Inputs: the decoder features at that scale, the encoder
        features at that scale, the coarser decoder features (none at 1/8)."""
        enc_widths = [widths[3], widths[2], widths[1], widths[0]]
        self.fusion = nn.ModuleDict(
            {
                str(DOWNSAMPLE_FACTOR >> i): LocalMultiScaleFusion(
                    dec_widths[i],
                    [dec_widths[i], enc_widths[i]] + ([dec_widths[i - 1]] if i else []),
                    dilations,
                    groups,
                )
                for i in range(N_SCALES)
                if DOWNSAMPLE_FACTOR >> i in self.distill_scales
            }
        )
        if not self.teacher_trainable:
            self.fusion.requires_grad_(False)

    @staticmethod
    def _check_levels(name: str, values: object, groups: int | None, minimum: int = 1) -> list[int]:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != N_SCALES:
            raise NetworkConfigError(
                f"MISSU: {name} must list {N_SCALES} integers (scales 1, 1/2, 1/4, 1/8); found {values!r}"
            )
        out = [_check_positive_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(values)]
        if groups is not None and any(v % groups for v in out):
            raise NetworkConfigError(
                f"MISSU: every entry of {name} must be divisible by groups={groups}; found {tuple(out)}"
            )
        return out

    def training_only_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters used only by the self-distillation branch (absent from the inference path)."""
        if self.fusion is not None:
            yield from self.fusion.parameters()

    def load_inference_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load weights, ignoring the fusion (teacher) weights present or missing on either side."""
        own = {k for k in self.state_dict() if not k.startswith("fusion.")}
        given = {k: v for k, v in state.items() if not k.startswith("fusion.")}
        missing = sorted(own - given.keys())
        unexpected = sorted(given.keys() - own)
        if missing or unexpected:
            raise NetworkConfigError(
                f"MISSU: state dict does not fit this network; missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        try:
            self.load_state_dict(given, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise NetworkConfigError(
                f"MISSU: state dict does not fit this network: {str(exc)[:500]}"
            ) from exc

    def _positional(self, grid: Sequence[int]) -> torch.Tensor:
        pos = self.pos_embed
        if tuple(pos.shape[2:]) != tuple(grid):
            pos = F.interpolate(pos, size=tuple(grid), mode="trilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)  # (1, N, E)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise NetworkInputError(
                f"MISSU: input must be (B, {self.in_channels}, D, H, W); found shape {tuple(x.shape)}"
            )
        if any(d % self.divisor for d in x.shape[2:]):
            raise NetworkInputError(
                f"MISSU: input D, H, W must be divisible by {self.divisor}; found {tuple(x.shape[2:])} "
                f"(8 x stem_stride {self.stem_stride})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        # Encoder: skips at scales 1, 1/2, 1/4, 1/8.
        skips = []
        h = self.stem(x)
        for down, block in zip(self.downs, self.encoder_blocks, strict=True):
            h = block(down(h))
            skips.append(h)

        # Bridge and transformer over the 1/8-scale tokens.
        h = self.bridge(h)
        b, e, *grid = h.shape
        tokens = self.embed_dropout(h.flatten(2).transpose(1, 2) + self._positional(grid))
        tokens = self.transformer(tokens)
        h = tokens.transpose(1, 2).reshape(b, e, *grid)

        # Decoder, coarsest first; in training keep the per-scale features (the students).
        h = self.decoder_in(h)
        decoded = [h]
        for up, skip in zip(self.up_steps, reversed(skips[:-1]), strict=True):
            h = up(h, skip)
            if self.training:
                decoded.append(h)
        logits = self.head(self.final_up(h))

        if not self.training:
            return logits
        return logits, self._distillation(decoded, list(reversed(skips)))

    def _distillation(self, decoded: list[torch.Tensor], skips: list[torch.Tensor]) -> torch.Tensor:
        """Sum over decoder scales of KL(teacher || student); teacher = local multi-scale fusion."""
        total = decoded[-1].new_zeros((), dtype=torch.float32)
        if self.fusion is None:
            return total
        for i in range(N_SCALES):
            key = str(DOWNSAMPLE_FACTOR >> i)
            if key not in self.fusion:
                continue
            fusion = self.fusion[key]
            inputs = [decoded[i].detach(), skips[i].detach()]
            if i:
                inputs.append(decoded[i - 1].detach())
            if self.teacher_trainable:
                teacher = fusion(*inputs)
            else:
                with torch.no_grad():
                    teacher = fusion(*inputs)
            total = total + feature_kl(teacher, decoded[i])
        return total
