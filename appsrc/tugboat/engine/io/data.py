"""Datasets: the demo set, ``.npz`` arrays, image folders and CSV files, with fixed splits.

A :class:`Dataset` holds every sample as numpy arrays keyed by the model's input names, optional
integer labels, and index arrays for the ``train`` / ``val`` / ``calib`` / ``test`` splits. Without
labels, quality is measured as fidelity to the original model.
"""

from __future__ import annotations

import csv
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError
from ..lazy import torch

if TYPE_CHECKING:  # pragma: no cover
    from .models import ModelHandle

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "val", "calib", "test")


@dataclass
class Dataset:
    ref: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    splits: dict[str, np.ndarray]
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def split(self, name: str, limit: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        idx = self.splits[name]
        if limit is not None:
            idx = idx[:limit]
        xs = {k: v[idx] for k, v in self.inputs.items()}
        return xs, (self.labels[idx] if self.labels is not None else None)

    def split_sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}

    def batches(self, split: str, batch_size: int, *, names: list[str], shuffle: bool = False,
                seed: int = 0, extra: list[np.ndarray] | None = None, training: bool = False,
                ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]]:
        """Yield (inputs in ``names`` order, labels or None, rows of ``extra`` arrays) per batch.

        ``extra`` arrays are aligned with the split (e.g. cached teacher outputs). With
        ``training`` no batch holds a single sample (BatchNorm cannot train on one): a last batch
        of one joins the batch before it, and a batch size of 1 becomes 2."""
        idx = self.splits[split]
        order = np.random.default_rng(seed).permutation(len(idx)) if shuffle else np.arange(len(idx))
        if training:
            batch_size = max(2, batch_size)
        starts = list(range(0, len(idx), batch_size))
        if training and len(starts) > 1 and len(idx) - starts[-1] == 1:
            starts.pop()
        for k, i in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else len(idx)
            local = order[i:end]
            rows = idx[local]
            xs = [torch.from_numpy(np.ascontiguousarray(self.inputs[n][rows])) for n in names]
            ys = torch.from_numpy(self.labels[rows]) if self.labels is not None else None
            ex = [torch.from_numpy(np.ascontiguousarray(e[local])) for e in (extra or [])]
            yield xs, ys, ex

    def summary(self) -> dict:
        return {"ref": self.ref, "samples": len(self), "labels": self.has_labels,
                "classes": len(self.classes) if self.classes else None,
                "splits": self.split_sizes(),
                "inputs": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)}
                           for k, v in self.inputs.items()}}


def default_splits(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    if n < 2:
        raise DataError(f"has {n} sample{'s' if n != 1 else ''}; at least 2 are needed to measure anything")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * 0.2))
    n_val = max(1, round(n * 0.1)) if n >= 10 else 0
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    if len(train) == 0:
        train = test
    if len(val) == 0:
        val = test
    return {"train": np.sort(train), "val": np.sort(val), "calib": np.sort(train[:256]),
            "test": np.sort(test)}


def load_data(ref: str | os.PathLike, model: ModelHandle | None = None, *,
              label_column: str = "label") -> Dataset:
    """Load a data reference and check it against the model's inputs (when given)."""
    if model is not None and getattr(model, "pending", None) is not None:
        # a model file that records no input shapes (TorchScript, a user architecture): the data's
        # arrays give them, then the model is converted (engine.formats)
        from .formats import complete_from_data

        ds = load_data(ref, None, label_column=label_column)
        complete_from_data(model, ds)
        check_against(ds, model)
        return ds
    ref = str(ref)
    if ref.startswith("demo:"):
        ds = _load_demo(ref)
    else:
        path = Path(ref)
        if not path.exists():
            raise DataError("file or folder not found", path=ref)
        if path.is_dir() and path.suffix.lower() in (".npz", ".csv"):
            raise DataError(f"is a folder, not a {path.suffix.lower()} file", path=ref)
        if path.is_dir():
            ds = _load_image_folder(path, model)
        elif path.suffix.lower() == ".npz":
            ds = _load_npz(path, model)
        elif path.suffix.lower() == ".csv":
            ds = _load_csv(path, model, label_column)
        else:
            raise DataError(f"unknown data format '{path.suffix or '(none)'}'", path=ref,
                            hint="use demo:digits, a .npz, a .csv or a folder of class sub-folders")
    if model is not None:
        check_against(ds, model)
        if model.module is None and model.format == "onnx" and model.conversion_error:
            from .formats import convert_with_data_shapes

            convert_with_data_shapes(model)  # a converter that needed the shapes the data now gives
    return ds


def _load_demo(ref: str) -> Dataset:
    name = ref[5:]
    from . import zoo

    if name not in zoo.DEMO_DATASETS:
        raise DataError(f"unknown demo dataset; available: {', '.join('demo:' + d for d in zoo.DEMO_DATASETS)}",
                        path=ref)
    x, y = zoo.digits_arrays()
    return Dataset(ref, {"input": x}, y, zoo.digits_splits(len(x)), classes=[str(i) for i in range(10)])


# --- sizes checked before anything is allocated ----------------------------------------------

MAX_NPZ_MEMBERS = 10_000
# an .npz that inflates more than this many times over a quarter GB is a decompression bomb:
# real data (even zero padding compressed by np.savez_compressed) stays far below it
BOMB_RATIO, BOMB_MIN_BYTES = 200, 256 * 1024**2
LOAD_FACTOR = 2  # arrays are converted (float64 -> float32, labels -> int64) after loading
CSV_FACTOR = 24  # a CSV held as Python lists of strings takes ~20x its bytes before becoming an array


def _memory_limit() -> int | None:
    """Bytes a dataset may take once loaded: what the machine has available (a tenth left to the
    rest of the machine), or None when the platform does not say. ``TUGBOAT_SKIP_MEMORY_CHECK=1``
    turns the checks off, like the job memory check."""
    if os.environ.get("TUGBOAT_SKIP_MEMORY_CHECK", "") not in ("", "0"):
        return None
    from ..ram import SAFETY, available_memory

    avail = available_memory()
    return int(avail * SAFETY) if avail is not None else None


def refuse_if_too_big(need: int, what: str, path: Path) -> None:
    from ..errors import ResourceError
    from ..formatting import fmt_bytes

    limit = _memory_limit()
    if limit is not None and need > limit:
        raise ResourceError(f"{what} needs about {fmt_bytes(need)} of memory once loaded, but only "
                            f"{fmt_bytes(limit)} is available; it was not loaded", path=path,
                            hint="use a smaller file or a machine with more memory")


def check_regular_file(path: Path, error: type = DataError) -> None:
    """Refuse a named pipe, a device (``/dev/zero``) or a socket before opening it: reading one
    would block forever or never end."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise error(f"could not be read ({exc.strerror or exc})", path=path) from None
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise error(f"is {kind}, not a regular file; it was not read", path=path)


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype an .npy member declares, read from its header alone."""
    fmt = np.lib.format
    try:
        with zf.open(info) as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                shape, _, dtype = fmt._read_array_header(f, version)  # 3.0: utf-8 field names
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, TypeError, KeyError,
            NotImplementedError, RuntimeError) as exc:
        raise DataError(f"not a readable .npz file (array '{info.filename}': {' '.join(str(exc).split())[:120]})",
                        path=path) from None
    return tuple(int(d) for d in shape), np.dtype(dtype)


def check_npz_size(path: Path) -> None:
    """Read every member's declared shape and dtype from its .npy header and refuse, before
    loading anything, an archive whose arrays would not fit in memory or that inflates like a
    decompression bomb."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > MAX_NPZ_MEMBERS:
                raise DataError(f"holds {len(infos)} arrays; at most {MAX_NPZ_MEMBERS} are read", path=path)
            total = 0
            for info in infos:
                if not info.filename.endswith(".npy"):  # not read (only .npy members are arrays)
                    continue
                shape, dtype = _npy_header(zf, info, path)
                if dtype.hasobject:
                    raise DataError("holds pickled object arrays, which are never loaded", path=path)
                total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    except zipfile.BadZipFile as exc:
        raise DataError(f"not a readable .npz file ({exc})", path=path) from None
    except OSError as exc:
        raise DataError(f"not a readable .npz file ({exc.strerror or exc})", path=path) from None
    from ..formatting import fmt_bytes

    size = max(1, path.stat().st_size)
    if total > BOMB_MIN_BYTES and total > BOMB_RATIO * size:
        raise DataError(f"its arrays declare {fmt_bytes(total)} in a file of {fmt_bytes(size)} "
                        f"({total // size}x): a decompression bomb, not loaded", path=path)
    refuse_if_too_big(total * LOAD_FACTOR, "its arrays", path)


def _load_npz(path: Path, model: ModelHandle | None) -> Dataset:
    check_regular_file(path)
    if not zipfile.is_zipfile(path):  # np.load would take any other bytes for a pickle
        raise DataError("not a readable .npz file (not a zip archive of arrays)", path=path)
    check_npz_size(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            # only .npy members are arrays: np.load hands any other member over as raw bytes
            npy = {name[:-4] for name in z.zip.namelist() if name.endswith(".npy")}
            arrays = {k: z[k] for k in z.files if k in npy}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError("holds pickled object arrays, which are never loaded", path=path) from None
        raise DataError(f"not a readable .npz file ({exc})", path=path) from None
    except Exception as exc:
        raise DataError(f"not a readable .npz file ({' '.join(str(exc).split())[:160]})", path=path) from None
    if not arrays:
        raise DataError("holds no arrays", path=path)
    labels = arrays.pop("labels", None)
    notes: list[str] = []
    if model is not None:
        arrays = match_inputs(arrays, model.input_names, path, notes)
    ds = _make_dataset(str(path), arrays, labels)
    ds.notes.extend(notes)
    return ds


def match_inputs(arrays: dict[str, np.ndarray], names: list[str], path, notes: list[str] | None = None,
                 ) -> dict[str, np.ndarray]:
    """The arrays that feed a model's inputs, keyed by input name.

    By name first. A single-input model takes the single array whatever its name. Inputs still
    unmatched take the remaining arrays in file order (a warning in ``notes`` says which went where);
    arrays beyond the model's inputs are ignored."""
    if not arrays:
        raise DataError("holds labels but no input arrays", path=path)
    if not names:  # the model file does not name its inputs (e.g. TorchScript): the data does
        return dict(arrays)
    matched = {n: arrays[n] for n in names if n in arrays}
    left_names = [n for n in names if n not in matched]
    if not left_names:
        return matched
    left_arrays = [k for k in arrays if k not in matched]
    if len(names) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}  # one array, one input: the names do not matter
    if len(left_arrays) < len(left_names) or len(names) == 1:
        raise DataError(
            f"has no array named {', '.join(map(repr, left_names))} (the model's input"
            f"{'s' if len(names) > 1 else ''}: {', '.join(names)}); arrays found: "
            f"{', '.join(arrays) or 'none'}", path=path)
    pairs = list(zip(left_names, left_arrays))
    msg = ("arrays matched to the model's inputs by position, not by name: "
           + ", ".join(f"'{a}' -> input '{n}'" for n, a in pairs))
    warnings.warn(f"{path}: {msg}", stacklevel=3)
    if notes is not None:
        notes.append(msg)
    matched.update({n: arrays[a] for n, a in pairs})
    return {n: matched[n] for n in names}


def _make_dataset(ref: str, arrays: dict[str, np.ndarray], labels, classes=None) -> Dataset:
    if not arrays:
        raise DataError("holds labels but no input arrays", path=ref)
    lengths = {k: (len(v) if v.ndim else 0) for k, v in arrays.items()}
    if any(n == 0 for n in lengths.values()):
        raise DataError("holds no samples (an array is empty)", path=ref)
    if len(set(lengths.values())) > 1:
        raise DataError(f"arrays have different sample counts: {lengths}", path=ref)
    n = next(iter(lengths.values()))
    for k, v in arrays.items():
        if v.dtype.kind not in "fiub":
            raise DataError(f"array '{k}' has dtype {v.dtype}; numbers are needed", path=ref)
        if v.dtype == np.float64:
            with np.errstate(over="ignore"):
                v = arrays[k] = v.astype(np.float32)
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise DataError(f"array '{k}' contains NaN or Inf values (or numbers too large for float32)",
                            path=ref)
    if labels is not None:
        labels = _check_labels(np.asarray(labels), n, ref)
    try:
        splits = default_splits(n)
    except DataError as exc:
        raise DataError(exc.message, path=ref) from None
    return Dataset(ref, arrays, labels, splits, classes)


MAX_CLASSES = 1_000_000  # a class index beyond this is a corrupt label, not a class


def _check_labels(labels: np.ndarray, n: int, ref: str) -> np.ndarray:
    """Class indices as int64: 1-D, whole, not negative and not absurdly large. Checked in the
    stored dtype before converting, so uint64 values above 2**63 cannot wrap to -1 and float
    labels with fractions are not silently truncated."""
    if labels.ndim != 1 or labels.dtype.kind not in "iuf":
        raise DataError(f"'labels' must be a 1-D integer array, got shape {labels.shape} "
                        f"dtype {labels.dtype}", path=ref)
    if len(labels) != n:
        raise DataError(f"has {len(labels)} labels for {n} samples", path=ref)
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"label {labels[i].item()!r} of sample {i} is not a whole class index", path=ref)
    if labels.dtype.kind in "if" and labels.min() < 0:
        i = int(np.argmin(labels))
        raise DataError(f"'labels' contains negative class indices (sample {i} has {labels[i].item()!r})", path=ref)
    if labels.max() > MAX_CLASSES:
        i = int(np.argmax(labels))
        raise DataError(f"label {labels[i].item()!r} of sample {i} is not a plausible class index "
                        f"(more than {MAX_CLASSES}; a wrapped or corrupt value)", path=ref)
    return labels.astype(np.int64)


def check_labels_fit(ds: Dataset, n_classes: int, model_ref: str | None = None) -> None:
    """Labels must index the model's classes (known from the first forward pass when the output
    shape is symbolic)."""
    if ds.labels is None or not len(ds.labels):
        return
    top = int(ds.labels.max())
    if top >= n_classes:
        of = f" {model_ref}" if model_ref else ""
        raise DataError(f"has label {top} but the model{of} has {n_classes} classes", path=ds.ref)


def _load_csv(path: Path, model: ModelHandle | None, label_column: str) -> Dataset:
    check_regular_file(path)
    refuse_if_too_big(path.stat().st_size * CSV_FACTOR, "the CSV table", path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM must not rename the first column
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"not a readable CSV file ({exc})", path=path) from None
    if len(rows) < 2:
        raise DataError("has no data rows", path=path)
    header, body = rows[0], [r for r in rows[1:] if r]
    if not body:
        raise DataError("has no data rows", path=path)
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise DataError(f"row {i + 2} has {len(r)} columns but the header has {len(header)}", path=path)
    labels = None
    try:
        table = np.array([[float(v) for v in r] for r in body], dtype=np.float32)
    except ValueError as exc:
        raise DataError(f"has a non-numeric value ({exc})", path=path) from None
    if table.ndim != 2 or table.shape[1] != len(header):
        raise DataError(f"rows have different numbers of columns than the header ({len(header)})", path=path)
    if label_column in header:
        col = header.index(label_column)
        labels = table[:, col]  # checked as whole class indices in _make_dataset
        table = np.delete(table, col, axis=1)
    name = model.input_names[0] if model is not None else "input"
    if model is not None:
        shape = model.inputs[0].shape[1:]
        if all(isinstance(d, int) for d in shape) and int(np.prod(shape)) == table.shape[1]:
            table = table.reshape(len(table), *shape)
    return _make_dataset(str(path), {name: table}, labels)


def _load_image_folder(path: Path, model: ModelHandle | None) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError("has no class sub-folders (expected one sub-folder of images per class)", path=path)
    if model is not None:
        shape = model.inputs[0].shape[1:]
    else:
        shape = (3, 32, 32)
    if len(shape) != 3 or not all(isinstance(d, int) for d in shape):
        raise DataError(f"images need a model input of shape (C, H, W); the model takes {shape}", path=path)
    c, h, w = shape
    files = [(label, f) for label, cls in enumerate(classes) for f in sorted((path / cls).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    # every image is resized to the model's input: the count alone tells the memory it will take
    refuse_if_too_big(len(files) * c * h * w * 4 * LOAD_FACTOR, f"{len(files)} images", path)
    xs, ys = [], []
    for label, f in files:
        check_regular_file(f)
        try:
            with warnings.catch_warnings():
                # an image claiming a huge size (a decompression bomb) is refused, not decoded
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    im = im.convert("L" if c == 1 else "RGB").resize((w, h))
                    arr = np.asarray(im, dtype=np.float32) / 255.0
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(f"image is too large to decode safely ({exc})", path=f) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's parse errors
            raise DataError(f"image could not be read ({exc})", path=f) from None
        xs.append(arr[None] if c == 1 else arr.transpose(2, 0, 1))
        ys.append(label)
    if not xs:
        raise DataError("holds no images", path=path)
    name = model.input_names[0] if model is not None else "input"
    return _make_dataset(str(path), {name: np.stack(xs)}, np.array(ys), classes)


def check_against(ds: Dataset, model: ModelHandle) -> None:
    """Names, shapes and dtypes of the data must fit the model's inputs; labels its outputs."""
    if not model.inputs and ds.inputs:
        # a file that records no inputs (TorchScript, a bare module): the data's arrays, sample-first,
        # are the inputs, in file order, with the sizes they have
        from .models import TensorSpec

        model.inputs = [TensorSpec(k, ("batch", *(int(d) for d in v.shape[1:])), str(v.dtype))
                        for k, v in ds.inputs.items()]
    for spec in model.inputs:
        if spec.name not in ds.inputs:
            raise DataError(f"has no array for the model's input '{spec.name}' "
                            f"(found: {', '.join(ds.inputs)})", path=ds.ref)
        arr = ds.inputs[spec.name]
        want = spec.sample_dims()
        got = arr.shape[1:]
        if len(want) != len(got) or any(isinstance(d, int) and d > 0 and d != g for d, g in zip(want, got)):
            raise DataError(f"array '{spec.name}' has samples of shape {tuple(got)}; the model expects "
                            f"{tuple(want)}", path=ds.ref)
        if spec.is_dynamic:  # the data tells the sizes the file leaves open
            spec.sample_shape = tuple(int(g) for g in got)
        want_int = spec.dtype.startswith(("int", "uint", "bool"))
        if want_int != (arr.dtype.kind in "iub"):
            raise DataError(f"array '{spec.name}' has dtype {arr.dtype}; the model expects {spec.dtype}",
                            path=ds.ref)
        if want_int and arr.dtype != np.dtype(spec.dtype):
            ds.inputs[spec.name] = arr.astype(spec.dtype)
        if not want_int and arr.dtype != np.float32 and spec.dtype == "float32":
            ds.inputs[spec.name] = arr.astype(np.float32)
    if model.task_source in ("default", "inferred") and model.outputs:
        from .tasks import infer_task

        model.task = infer_task(model.outputs, ds.labels)
    if ds.labels is not None and model.outputs and model.task == "classification":
        out = model.outputs[0].shape
        n_classes = out[-1] if out and isinstance(out[-1], int) else None
        if n_classes is not None:
            check_labels_fit(ds, n_classes)
