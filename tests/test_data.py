"""Data loading: every format, and one clear message for every mismatch."""

from __future__ import annotations

import numpy as np
import pytest

from tugboat.engine.errors import DataError
from tugboat.engine.io.data import load_data


def test_demo_digits(demo_data):
    assert len(demo_data) == 1797 and demo_data.has_labels
    assert demo_data.inputs["input"].shape[1:] == (1, 8, 8)


def test_npz_with_and_without_labels(tmp_path, demo_models):
    model = demo_models("digits-cnn")
    x = np.random.default_rng(0).random((50, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "a.npz", input=x, labels=np.arange(50) % 10)
    ds = load_data(tmp_path / "a.npz", model)
    assert ds.has_labels and len(ds) == 50 and sum(len(ds.splits[k]) for k in ("train", "val", "test")) == 50
    np.savez(tmp_path / "b.npz", input=x)
    assert not load_data(tmp_path / "b.npz", model).has_labels


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"pixels": np.zeros((4, 1, 8, 8), np.float32), "other": np.zeros((4, 2))}, "no array named 'input'"),
        ({"input": np.zeros((4, 1, 9, 9), np.float32)}, "shape (1, 9, 9)"),
        ({"input": np.zeros((4, 1, 8, 8), np.int64)}, "dtype int64"),
        ({"input": np.zeros((4, 1, 8, 8), np.float32), "labels": np.zeros(3, np.int64)}, "3 labels for 4 samples"),
        ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "no samples"),
        ({"input": np.zeros((1, 1, 8, 8), np.float32)}, "at least 2"),
        ({"input": np.full((4, 1, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"input": np.zeros((4, 1, 8, 8), np.float32), "labels": np.full(4, 12)}, "label 12"),
    ],
)
def test_npz_mismatches_name_the_file_and_the_array(tmp_path, demo_models, arrays, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        load_data(path, demo_models("digits-cnn"))
    assert str(path) in str(err.value)
    assert fragment in str(err.value)


def test_npz_with_object_arrays_is_not_unpickled(tmp_path, demo_models):
    path = tmp_path / "obj.npz"
    np.savez(path, input=np.array([{"a": 1}] * 3, dtype=object))
    with pytest.raises(DataError, match="pickled"):
        load_data(path, demo_models("digits-cnn"))


def test_csv_with_label_column(tmp_path, demo_models):
    rng = np.random.default_rng(0)
    rows = ["label," + ",".join(f"p{i}" for i in range(64))]
    for i in range(20):
        rows.append(f"{i % 10}," + ",".join(f"{v:.3f}" for v in rng.random(64)))
    path = tmp_path / "d.csv"
    path.write_text("\n".join(rows))
    ds = load_data(path, demo_models("digits-cnn"))
    assert ds.inputs["input"].shape == (20, 1, 8, 8) and ds.labels.tolist()[:3] == [0, 1, 2]


def test_image_folder(tmp_path, demo_models):
    from PIL import Image

    for cls in ("0", "1"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    ds = load_data(tmp_path / "imgs", demo_models("digits-cnn"))
    assert ds.inputs["input"].shape == (6, 1, 8, 8) and ds.classes == ["0", "1"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_missing_and_unknown(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "nothing.npz")
    (tmp_path / "x.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="unknown data format"):
        load_data(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="demo:digits"):
        load_data("demo:cifar")
