"""Segmentation networks: shapes, gradients, self-distillation train/eval paths, argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bonemet.config import load_specs
from bonemet.segmentation.missu import MISSU, feature_kl
from bonemet.segmentation.networks import (
    CT_CHANNELS,
    N_CLASSES,
    NETWORKS,
    NetworkConfigError,
    NetworkInputError,
    build_network,
    count_parameters,
    input_divisor,
    network_from_spec,
    network_kwargs,
)

#: MISSU's reference sizes: params.yaml's segment.networks.missu, which the ``paper`` profile keeps
#: (dropouts, groups 8, fusion dilations, all four teachers, stem stride 1)
REFERENCE_MISSU = load_specs(
    Path(__file__).resolve().parents[1] / "params.yaml", segment_profile="paper"
).segment.networks.missu.model_dump()
TINY_MISSU = {
    **REFERENCE_MISSU,
    **dict(widths=(8, 8, 16, 16), blocks=(1, 1, 1, 2), embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64),
}
TINY = {
    "missu": TINY_MISSU,
    "unet": dict(channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1),
    "unetr": dict(feature_size=4, hidden_size=32, mlp_dim=64, num_heads=4),
    "swinunetr": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
}


def _tiny(name: str, roi, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(name, in_channels=1, out_channels=2, roi_size=roi, **{**TINY[name], **extra})


@pytest.mark.parametrize(
    ("name", "roi", "size"),
    [
        ("missu", (32, 32, 32), (16, 16, 16)),
        ("missu", (32, 32, 32), (32, 32, 32)),
        ("missu", (32, 32, 32), (32, 48, 16)),  # positional embedding resampled to the 4x6x2 grid
        ("missu", (32, 48, 16), (32, 48, 16)),
        ("unet", (32, 32, 32), (16, 16, 16)),
        ("unet", (32, 32, 32), (32, 32, 32)),
        ("unet", (32, 32, 32), (32, 48, 16)),
        ("unetr", (32, 32, 32), (32, 32, 32)),
        ("unetr", (32, 48, 16), (32, 48, 16)),
        ("swinunetr", (64, 32, 32), (64, 32, 32)),
        ("swinunetr", (64, 32, 32), (32, 64, 96)),
    ],
)
def test_eval_output_is_logits_of_input_size(name, roi, size):
    net = _tiny(name, roi).eval()
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 2, *size)
    assert torch.isfinite(out).all()


def test_missu_out_channels_and_in_channels_follow_arguments():
    net = build_network("missu", in_channels=3, out_channels=4, roi_size=(16, 16, 16), **TINY_MISSU).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 16, 16, 16)).shape == (1, 4, 16, 16, 16)


@pytest.mark.parametrize("name", ["unet", "unetr"])
def test_baselines_return_a_tensor_in_training_mode(name):
    net = _tiny(name, (32, 32, 32)).train()
    out = net(torch.randn(2, 1, 32, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 32, 32, 32)


def test_missu_training_returns_logits_and_positive_distillation_term():
    net = _tiny("missu", (16, 16, 16)).train()
    out = net(torch.randn(2, 1, 16, 16, 16))
    assert isinstance(out, tuple) and len(out) == 2
    logits, distill = out
    assert logits.shape == (2, 2, 16, 16, 16)
    assert distill.ndim == 0 and torch.isfinite(distill) and distill.item() > 0


def test_gradients_reach_every_trainable_parameter_of_missu():
    net = _tiny("missu", (16, 16, 16)).train()
    logits, distill = net(torch.randn(2, 1, 16, 16, 16))
    (logits.sum() + distill).backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    not_finite = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not not_finite, f"non-finite gradient for {not_finite}"
    # The teachers (fusion blocks) learn from the distillation term alone.
    assert any(p.grad.abs().sum() > 0 for p in net.fusion.parameters())


def test_distillation_term_does_not_reach_backbone_through_the_teacher():
    """The teacher's inputs are detached: the term reaches the encoder only via the student."""
    net = _tiny("missu", (16, 16, 16)).train()
    _, distill = net(torch.randn(1, 1, 16, 16, 16))
    distill.backward()
    # The head is not used by the student features (it comes after them): no gradient at all.
    assert net.head.weight.grad is None or net.head.weight.grad.abs().sum() == 0
    assert net.stem[0].weight.grad is not None and net.stem[0].weight.grad.abs().sum() > 0


def test_eval_mode_never_calls_the_fusion_blocks():
    net = _tiny("missu", (16, 16, 16))
    calls: list[str] = []
    for key, block in net.fusion.items():
        block.register_forward_hook(lambda *_, key=key: calls.append(key))
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor)
    assert calls == []
    net.train()
    net(x)
    assert calls == ["8", "4", "2", "1"]  # the hooks do fire when the branch runs, coarsest first


def test_without_self_distillation_no_fusion_is_built_and_term_is_zero():
    net = _tiny("missu", (16, 16, 16), self_distillation=False)
    assert net.fusion is None
    assert count_parameters(net) == count_parameters(net, inference_only=True)
    logits, distill = net.train()(torch.randn(1, 1, 16, 16, 16))
    assert distill.item() == 0.0
    assert logits.shape == (1, 2, 16, 16, 16)


def test_distill_scales_choose_the_teachers_and_blocks_may_be_zero():
    net = _tiny("missu", (16, 16, 16), distill_scales=(2, 8), blocks=(0, 1, 1, 1)).train()
    assert sorted(net.fusion) == ["2", "8"]
    full = _tiny("missu", (16, 16, 16), blocks=(0, 1, 1, 1))
    assert count_parameters(net, inference_only=True) == count_parameters(full, inference_only=True)
    assert count_parameters(net) < count_parameters(full)
    logits, distill = net(torch.randn(1, 1, 16, 16, 16))
    (logits.sum() + distill).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_frozen_teacher_matches_the_release():
    net = _tiny("missu", (16, 16, 16), teacher_trainable=False).train()
    assert not any(p.requires_grad for p in net.fusion.parameters())
    logits, distill = net(torch.randn(1, 1, 16, 16, 16))
    assert distill.item() > 0
    (logits.sum() + distill).backward()
    assert all(p.grad is None for p in net.fusion.parameters())


def test_inference_weights_load_into_a_network_without_teachers():
    full = _tiny("missu", (16, 16, 16)).eval()
    lean = _tiny("missu", (16, 16, 16), self_distillation=False).eval()
    lean.load_inference_state_dict(full.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(lean(x), full(x))
    other = _tiny("missu", (16, 16, 16), embed_dim=64)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_inference_state_dict(full.state_dict())


def test_count_parameters_inference_path_is_smaller_for_missu_only():
    missu = _tiny("missu", (16, 16, 16))
    n_fusion = sum(p.numel() for p in missu.fusion.parameters())
    assert n_fusion > 0
    assert count_parameters(missu) - count_parameters(missu, inference_only=True) == n_fusion
    unet = _tiny("unet", (16, 16, 16))
    assert (
        count_parameters(unet)
        == count_parameters(unet, inference_only=True)
        == sum(p.numel() for p in unet.parameters())
    )


def test_feature_kl_is_zero_for_equal_features_and_normalised_by_batch_and_voxels():
    torch.manual_seed(0)
    a = torch.randn(2, 4, 3, 3, 3)
    b = torch.randn(2, 4, 3, 3, 3)
    assert feature_kl(a, a).item() == pytest.approx(0.0, abs=1e-6)
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(b, 1), torch.log_softmax(a, 1), log_target=True, reduction="sum"
    ) / (2 * 27)
    assert feature_kl(a, b).item() == pytest.approx(expected.item(), rel=1e-5)
    # Doubling the batch with the same content keeps the value: it is a per-voxel mean.
    assert feature_kl(torch.cat([a, a]), torch.cat([b, b])).item() == pytest.approx(expected.item(), rel=1e-5)


def test_same_seed_same_network_and_output():
    x = torch.randn(1, 1, 16, 16, 16)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        net = build_network("missu", in_channels=1, out_channels=2, roi_size=(16, 16, 16), **TINY_MISSU).eval()
        with torch.no_grad():
            outs.append(net(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])


def test_unknown_network_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown segmentation network 'vnet'.*missu.*swinunetr.*unet.*unetr"
    ):
        build_network("vnet", in_channels=1, out_channels=2, roi_size=(32, 32, 32))
    assert set(NETWORKS) == {"missu", "unet", "unetr", "swinunetr"}


def test_missu_has_no_defaults_of_its_own():
    """Every MISSU size comes from params (segment.networks.missu): a missing one is an error."""
    for key in ("groups", "dropout", "stem_stride", "self_distillation"):
        kwargs = {k: v for k, v in TINY_MISSU.items() if k != key}
        with pytest.raises(TypeError, match=f"missing 1 required keyword-only argument: '{key}'"):
            build_network("missu", in_channels=1, out_channels=2, roi_size=(16, 16, 16), **kwargs)
    with pytest.raises(TypeError):
        build_network("missu", roi_size=(16, 16, 16), **TINY_MISSU)  # channels are required too


def test_network_from_spec_builds_the_params_network(params):
    seg = params.segment  # the default (cpu) profile: its own small MISSU with stem stride 2
    assert network_kwargs(seg) == seg.networks.missu.model_dump()
    assert network_kwargs(seg, "unet") == dict(seg.networks.unet)
    torch.manual_seed(0)
    net = network_from_spec(seg)
    assert isinstance(net, MISSU) and net.stem_stride == seg.networks.missu.stem_stride == 2
    assert net.in_channels == CT_CHANNELS == 1 and net.out_channels == N_CLASSES == 2
    assert tuple(net.roi_size) == tuple(seg.roi_size)
    torch.manual_seed(0)
    same = build_network("missu", in_channels=1, out_channels=2, roi_size=seg.roi_size, **network_kwargs(seg))
    for (name, a), b in zip(net.state_dict().items(), same.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # spec.model picks the network; a name overrides it, with that network's params keywords
    unet = network_from_spec(seg.updated({"model": "unet"}))
    assert type(unet) is type(network_from_spec(seg, "unet")) and not isinstance(unet, MISSU)
    with torch.no_grad():
        for model in (net, unet):
            assert model.eval()(torch.zeros(1, 1, *seg.roi_size)).shape == (1, 2, *seg.roi_size)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("missu", dict(roi_size=(30, 32, 32)), r"divisible by 8.*\(30, 32, 32\)"),
        ("missu", dict(roi_size=(32, 32)), "three integers"),
        ("missu", dict(roi_size=(32, 0, 32)), "positive integers"),
        ("missu", dict(roi_size="32"), "three integers"),
        ("missu", dict(num_heads=5), "embed_dim must be divisible by num_heads.*num_heads=5"),
        ("missu", dict(embed_dim=36, num_heads=4), "divisible by 4 and embed_dim/4 by groups"),
        ("missu", dict(dropout=-0.1), r"dropout must be a probability in \[0, 1\); found -0.1"),
        ("missu", dict(attn_dropout=1.5), "attn_dropout must be a probability"),
        ("missu", dict(widths=(8, 16, 32)), "widths must list 4 integers"),
        ("missu", dict(blocks=(1, 2, 2, 2, 4)), "blocks must list 4 integers"),
        ("missu", dict(blocks=(1, -1, 2, 4)), r"blocks\[1\] must be an integer >= 0"),
        ("missu", dict(distill_scales=(8, 3)), r"distill_scales must be distinct downsampling factors"),
        ("missu", dict(distill_scales=(8, 8)), r"distill_scales must be distinct"),
        ("missu", dict(distill_scales=()), r"distill_scales"),
        ("missu", dict(widths=(8, 12, 16, 16)), "divisible by groups=8"),
        ("missu", dict(in_channels=0), "in_channels must be an integer >= 1; found 0"),
        ("missu", dict(out_channels=0), "out_channels must be an integer >= 1"),
        ("missu", dict(num_layers=0), "num_layers must be an integer >= 1"),
        ("missu", dict(fusion_dilations=()), "fusion_dilations"),
        ("missu", dict(stem_stride=3), r"stem_stride must be one of \(1, 2\); found 3"),
        ("missu", dict(stem_stride=0), "stem_stride must be one of"),
        ("missu", dict(stem_stride=True), "stem_stride must be one of"),
        ("missu", dict(stem_stride=2, roi_size=(32, 32, 24)), r"divisible by 16.*\(32, 32, 24\)"),
        ("missu", dict(depth=3), r"segment.networks.missu: unknown argument\(s\) 'depth'; expected some of"),
        ("missu", dict(embed_dims=64), r"'embed_dims' \(did you mean embed_dim or embed_dropout\?\)"),
        ("unet", dict(roi_size=(20, 32, 32)), "divisible by 8"),  # tiny strides (2, 2, 2)
        ("unet", dict(out_channels=0), "out_channels must be an integer >= 1"),
        ("unet", dict(chanels=(4, 8)), r"segment.networks.unet: unknown argument\(s\) 'chanels' \(did you mean channels\?\)"),
        ("unetr", dict(roi_size=(32, 32, 24)), "divisible by 16"),
        ("unetr", dict(hidden_size=30), "unetr: cannot build"),
        ("unetr", dict(img_size=(32, 32, 32)), "unknown argument"),
        ("swinunetr", dict(roi_size=(32, 32, 32)), "one dimension >= 64"),
        ("swinunetr", dict(roi_size=(64, 48, 32)), "divisible by 32"),
    ],
)
def test_bad_arguments_raise_value_error_with_clear_message(name, kwargs, message):
    args = {"in_channels": 1, "out_channels": 2, **TINY[name],
            "roi_size": (32, 32, 32) if name != "swinunetr" else (64, 32, 32), **kwargs}
    with pytest.raises(NetworkConfigError, match=message) as info:
        build_network(name, **args)
    assert isinstance(info.value, ValueError)


def test_missu_refuses_inputs_it_cannot_take():
    net = _tiny("missu", (16, 16, 16)).eval()
    with pytest.raises(NetworkInputError, match=r"divisible by 8; found \(16, 12, 16\)"):
        net(torch.randn(1, 1, 16, 12, 16))
    with pytest.raises(NetworkInputError, match=r"\(B, 1, D, H, W\); found shape \(1, 2, 16, 16, 16\)"):
        net(torch.randn(1, 2, 16, 16, 16))


def test_stem_stride_two_runs_level_one_at_half_size_and_returns_full_size_logits():
    ref = _tiny("missu", (32, 32, 32))
    net = _tiny("missu", (32, 32, 32), stem_stride=2)
    assert ref.stem[0].stride == (1, 1, 1) and isinstance(ref.final_up, torch.nn.Identity)
    assert net.stem[0].stride == (2, 2, 2)
    assert tuple(net.pos_embed.shape[2:]) == (2, 2, 2)  # tokens at 1/16 of the crop
    seen = {}

    def record(module, inputs, output):
        seen["level1"] = tuple(output.shape)

    net.encoder_blocks[0].register_forward_hook(record)
    net.train()
    logits, distill = net(torch.randn(2, 1, 32, 32, 32))
    assert seen["level1"][2:] == (16, 16, 16)
    assert logits.shape == (2, 2, 32, 32, 32)
    assert distill.item() > 0
    (logits.sum() + distill).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 48, 32, 16))  # other multiples of 16: embedding resampled
    assert out.shape == (1, 2, 48, 32, 16)
    with pytest.raises(NetworkInputError, match=r"divisible by 16; found \(24, 32, 32\)"):
        net(torch.randn(1, 1, 24, 32, 32))
    assert input_divisor("missu", stem_stride=2) == 16


def test_input_divisor_matches_what_each_network_needs():
    assert input_divisor("missu", stem_stride=1) == 8
    assert input_divisor("unet", strides=(2, 2, 2, 2)) == 16
    assert input_divisor("unet", strides=(2, 2, 2)) == 8
    assert input_divisor("unetr") == 16
    assert input_divisor("swinunetr") == 32
    with pytest.raises(ValueError, match="unknown"):
        input_divisor("nope")
