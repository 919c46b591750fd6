"""Measurement is honest: sizes match files, FLOPs and latency track the real work."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from helpers import FAST, Wide
from tugboat.engine.io.export import write_onnx
from tugboat.engine.io.loading import load_model
from tugboat.engine.io.models import ModelHandle, TensorSpec
from tugboat.engine.io.onnx_graph import onnx_param_count
from tugboat.engine.measuring.measure import MeasureConfig, fidelity, measure, onnx_flops, slower_than


def _handle(module) -> ModelHandle:
    return ModelHandle(module.eval(), [TensorSpec("input", ("batch", 1, 8, 8))],
                       [TensorSpec("logits", ("batch", 10))], "test", "torch")


def test_size_bytes_equals_the_artifact_file(tmp_path, demo_models, demo_data):
    handle = demo_models("digits-cnn")
    path = write_onnx(handle, tmp_path / "cnn.onnx")
    metrics, _ = measure(handle, demo_data, FAST, artifact=path.read_bytes())
    assert metrics["size_bytes"] == path.stat().st_size
    assert 0 < metrics["compressed_bytes"] < metrics["size_bytes"]
    # parameters of the deployed artifact, the file written: its BatchNorms are folded into the
    # convolutions, so it holds fewer than the torch module (448 = 2 x 224 BatchNorm channels)
    assert metrics["params"] == onnx_param_count(onnx.load(str(path)))[0] == handle.param_count()[0]
    assert metrics["params"] == sum(p.numel() for p in handle.module.parameters()) - 448
    assert metrics["nonzero_params"] <= metrics["params"]


def test_flops_match_the_architecture():
    torch.manual_seed(0)
    handle = _handle(Wide(128))
    total, rows = onnx_flops(handle.to_onnx())
    expected = 2 * (64 * 128 + 4 * 128 * 128 + 128 * 10)
    assert total == expected
    assert len(rows) == 6


def test_ten_times_the_flops_measures_slower():
    torch.manual_seed(0)
    small, big = _handle(Wide(64)), _handle(Wide(232))
    f_small, f_big = onnx_flops(small.to_onnx())[0], onnx_flops(big.to_onnx())[0]
    assert 9 <= f_big / f_small <= 12
    cfg = MeasureConfig(batch=64, threads=1, min_runs=30, min_seconds=0.2, also_batch1=False, both_runtimes=True)
    m_small, _ = measure(small, None, cfg)
    m_big, _ = measure(big, None, cfg)
    for runtime in ("onnxruntime", "torch"):
        fast = m_small["latency"][runtime]["b64"]["median"]
        slow = m_big["latency"][runtime]["b64"]["median"]
        assert slow > 2 * fast, (runtime, fast, slow)


def test_latency_records_how_it_was_measured(demo_models, demo_data):
    cfg = MeasureConfig(batch=16, threads=1, min_runs=5, min_seconds=0.0, also_batch1=True, both_runtimes=True)
    metrics, _ = measure(demo_models("digits-mlp"), demo_data, cfg)
    lat = metrics["latency_ms"]
    assert lat["batch"] == 16 and lat["threads"] == 1 and lat["runtime"] == "onnxruntime"
    assert 0 < lat["median"] <= lat["p90"]
    assert set(metrics["latency"]) == {"onnxruntime", "torch"}
    assert set(metrics["latency"]["torch"]) == {"b16", "b1"}


def test_accuracy_and_fidelity(demo_models, demo_data):
    handle = demo_models("digits-cnn")
    base, ref = measure(handle, demo_data, FAST)
    same, _ = measure(handle, demo_data, FAST, reference=ref)
    assert same["accuracy"] == pytest.approx(base["accuracy"])
    assert same["fidelity"]["top1_agreement"] == 1.0
    assert same["fidelity"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["fidelity"]["rel_error"] < 1e-5
    noisy = [r + np.random.default_rng(0).normal(0, 3.0, r.shape).astype(np.float32) for r in ref]
    fid = fidelity(noisy, ref)
    assert fid["top1_agreement"] < 1.0 and fid["cosine"] < 1.0 and fid["rel_error"] > 0.1


def _paired(median, low, high, noisy=False, runtime="onnxruntime", batch=64):
    return {"latency_ms": {"median": 3.0, "batch": batch, "threads": 2, "runtime": runtime, "load": 3.0,
                           "speedup": {"median": median, "low": low, "high": high, "blocks": 8,
                                       "baseline_median": 1.0, "noisy": noisy}}}


def test_slower_verdict_needs_the_whole_interval_below_the_threshold():
    assert "slower than the original in onnxruntime at batch 64" in slower_than(_paired(0.3, 0.28, 0.33))[0]
    assert slower_than(_paired(0.9, 0.85, 0.94)) != []  # 1/1.05 = 0.952: the whole interval is below
    assert slower_than(_paired(0.93, 0.90, 0.96)) == []  # reaches above 1/1.05: no verdict
    assert slower_than(_paired(2.0, 1.9, 2.1)) == []
    noisy = slower_than(_paired(0.8, 0.4, 1.6, noisy=True))
    assert len(noisy) == 1 and noisy[0].startswith("timing too noisy: re-measure")
    assert "slower" not in noisy[0]
    # a noisy interval that still lies wholly below the threshold is a real verdict
    assert "slower than" in slower_than(_paired(0.1, 0.05, 0.2, noisy=True))[0]


def test_unpaired_and_other_runtimes_give_information_not_verdicts():
    from tugboat.engine.measuring.measure import timing_notes

    base = {"latency": {"onnxruntime": {"b64": {"median": 1.0, "batch": 64, "threads": 2}},
                        "torch": {"b1": {"median": 0.1, "batch": 1, "threads": 2}}}}
    variant = {"latency_ms": {"median": 3.0, "batch": 64, "threads": 2, "runtime": "onnxruntime"},
               "latency": {"onnxruntime": {"b64": {"median": 3.0, "batch": 64, "threads": 2}},
                           "torch": {"b1": {"median": 50.0, "batch": 1, "threads": 2}}}}
    assert slower_than(variant, base) == []  # unpaired: two medians taken apart decide nothing
    notes = timing_notes(variant, base)
    assert len(notes) == 1 and "torch at batch 1" in notes[0] and "no verdict" in notes[0]


def test_layer_table_lists_weighted_layers(demo_models):
    from tugboat.engine.measuring.measure import layer_table

    rows = layer_table(demo_models("digits-cnn"))
    convs = [r for r in rows if r["type"] == "Conv2d"]
    assert len(convs) == 3
    assert convs[1]["flops"] == 2 * (64 * 8 * 8) * (32 * 9)  # out elements x (in channels x kernel)
    # the rows add up to the deployed artifact's count; BatchNorms fold into their convolutions
    assert sum(r["params"] for r in rows) == demo_models("digits-cnn").param_count()[0]
    norms = [r for r in rows if r["type"] == "BatchNorm2d"]
    assert len(norms) == 3 and all(r["params"] == 0 and r["folded"] for r in norms)
    assert convs[0]["params"] == 32 * 9 + 32  # weight and the bias the folded BatchNorm gives it


def test_onnx_only_model_measures(tmp_path, demo_models, demo_data):
    path = write_onnx(demo_models("digits-mlp"), tmp_path / "mlp.onnx")
    handle = load_model(path)
    handle.module = None  # as if onnx2torch had failed
    metrics, _ = measure(handle, demo_data, FAST)
    assert metrics["params"] == demo_models("digits-mlp").param_count()[0]
    assert metrics["params"] == sum(p.numel() for p in demo_models("digits-mlp").module.parameters())  # no BatchNorm
    assert metrics["accuracy"] > 0.9
    assert "torch" not in metrics["latency"]


def test_attention_flops_are_counted(demo_models):
    from tugboat.engine.measuring.measure import layer_table

    handle = demo_models("digits-vit")
    total, _ = onnx_flops(handle.to_onnx())
    linear_and_conv = sum(r["flops"] for r in layer_table(handle))  # torch's own count, per module
    # ONNX adds the attention products (q @ k, attn @ v) on top of the Linear/Conv layers
    assert linear_and_conv <= total <= 1.25 * linear_and_conv
