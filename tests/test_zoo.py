"""The demo zoo trains itself from packaged data and reaches its stated accuracy."""

from __future__ import annotations

import pytest

from helpers import FAST
from tugboat.engine.io import zoo
from tugboat.engine.measuring.measure import measure


@pytest.mark.parametrize("name", list(zoo.ARCHITECTURES))
def test_demo_model_reaches_stated_accuracy(name, demo_models, demo_data):
    metrics, _ = measure(demo_models(name), demo_data, FAST)
    assert metrics["accuracy"] >= zoo.STATED_ACCURACY[name], (name, metrics["accuracy"])


def test_demo_splits_are_fixed_and_disjoint(demo_data):
    s = demo_data.splits
    assert set(s["train"]).isdisjoint(s["test"]) and set(s["val"]).isdisjoint(s["test"])
    assert set(s["calib"]) <= set(s["train"])
    again = zoo.digits_splits(len(demo_data))
    assert all((again[k] == s[k]).all() for k in s)


def test_cache_is_used_and_corrupt_cache_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("TUGBOAT_CACHE_DIR", str(tmp_path))
    first = zoo.pretrained("digits-mlp")
    path = tmp_path / "zoo" / f"digits-mlp-v{zoo.ZOO_VERSION}.pt"
    assert path.exists()
    path.write_bytes(b"garbage")
    again = zoo.pretrained("digits-mlp")
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert (a == b).all()  # seeded: retraining gives the same weights
