"""bonemet-segmenter in the registry: signature, input example, its own code and requirements, and the gate."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bonemet.registry.gate import decide_segmenter_promotion


def test_segmenter_gate():
    assert decide_segmenter_promotion(0.82, min_dice=0.7, n_cases=178).promote
    held = decide_segmenter_promotion(0.65, min_dice=0.7, n_cases=178)
    assert not held.promote and held.reason == "held: out-of-fold mean Dice 0.650 over 178 cases < 0.700"
    assert not decide_segmenter_promotion(None, min_dice=0.0, n_cases=0).promote
    assert not decide_segmenter_promotion(float("nan"), min_dice=0.0, n_cases=3).promote


def test_input_example_is_the_centre_of_a_case_padded_to_the_window():
    from bonemet.segmentation.pipeline import input_example

    image = np.arange(10 * 20 * 6, dtype=np.float32).reshape(1, 10, 20, 6)
    out = input_example({"image": image}, (8, 8, 8))
    assert out.shape == (1, 1, 8, 8, 8) and out.dtype == np.float32
    assert np.array_equal(out[0, 0, :, :, 1:7], image[0, 1:9, 6:14, :])  # centred; W padded with zeros
    assert not out[0, 0, :, :, 0].any() and not out[0, 0, :, :, 7].any()


@pytest.mark.parametrize("promote", [True, False])
def test_final_model_is_logged_with_signature_and_gated(tmp_path, monkeypatch, params, promote):
    import mlflow
    import torch

    from bonemet.registry.registration import register_segmenter
    from bonemet.registry.store import MlflowTracker, alias_version, model_versions
    from bonemet.segmentation.inference import InferenceSettings
    from bonemet.segmentation.networks import network_from_spec
    from bonemet.segmentation.pipeline import SegmentationResult

    monkeypatch.chdir(tmp_path)
    seg = params.segment.updated({"roi_size": [16, 16, 16]})
    torch.manual_seed(0)
    network = network_from_spec(seg)
    example = np.random.default_rng(0).random((1, 1, 16, 16, 16), dtype=np.float32)
    decision = decide_segmenter_promotion(0.8 if promote else 0.5, min_dice=seg.gate.min_dice, n_cases=10)
    tracker = MlflowTracker("seg-test", system_metrics=False, system_metrics_interval_s=None, tracking_uri=None,
                            store_dir=tmp_path / "mlruns", default_tags={"dvc_exp": "exp-1", "git_commit": "abc"})
    result = SegmentationResult(summary={}, case_table=None, spec=seg,
                                cv=SimpleNamespace(best_model=network, best_fold=3, best_run_id=""),
                                settings=InferenceSettings.from_params(params.preprocess, seg))
    with tracker.run("segment") as parent:
        version_id = register_segmenter(result, parent_id=parent, decision=decision, example=example, register=True,
                                        tracker=tracker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)  # MLflow's own API below reads the store from it
    [version] = model_versions(tracker.client, seg.model_name)
    assert version_id == "1" and version["tags"]["dvc_exp"] == "exp-1"  # the DVC experiment that registered it
    assert version["tags"]["gate_decision"] == ("promote" if promote else "hold")
    assert version["tags"]["gate_reason"] == decision.reason and decision.reason in version["description"]
    assert alias_version(tracker.client, seg.model_name, seg.alias) == ("1" if promote else None)
    info = mlflow.models.get_model_info(f"models:/{seg.model_name}/1")
    inputs = info.signature.inputs.to_dict()[0]
    assert list(inputs["tensor-spec"]["shape"]) == [-1, 1, 16, 16, 16] and inputs["tensor-spec"]["dtype"] == "float32"
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 2, 16, 16, 16]
    assert info.saved_input_example_info["type"] == "ndarray"
    assert info.metadata["source_fold"] == 3 and "preprocess" in info.metadata
    requirements = open(mlflow.pyfunc.get_model_dependencies(f"models:/{seg.model_name}/1")).read().split()
    assert "torch==2.13.0" in requirements and not any(r.startswith("bonemet") for r in requirements)
    assert all("==" in r for r in requirements)
    assert tracker.client.get_run(version["run_id"]).info.run_id == parent
