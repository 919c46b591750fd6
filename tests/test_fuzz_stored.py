"""Property-based fuzzing of the files Tugboat writes and reads back: ``workspace.json`` (and a
recovered variant's ``metrics.json``), ``report.json`` and ``settings.json``. Every generated file
either loads (and then everything downstream works: the summary table, CSV, HTML, every stored path
resolving inside the workspace) or raises Tugboat's one error type, :class:`TugboatError`, with one
line naming the file; the settings reader never raises at all.

Two kinds of input: valid files with random subtrees replaced by random JSON (deep in the schema,
where the checks are), and random JSON / text / bytes. Same knobs as ``tests/test_fuzz.py``
(``TUGBOAT_FUZZ_SCALE``, ``TUGBOAT_FUZZ_RANDOM``); ``tools/fuzz_long.py`` runs both files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tugboat.console import format_summary
from tugboat.engine.errors import TugboatError
from tugboat.engine.running.report_html import render_html, to_csv
from tugboat.engine.running.variants import Variant
from tugboat.engine.running.workspace import Workspace
from tugboat.report_command import load_any_report
from tugboat.settings import Settings, load_settings

SCALE = float(os.environ.get("TUGBOAT_FUZZ_SCALE", "1"))
TRIED: Counter[str] = Counter()
LOADED: Counter[str] = Counter()


def fuzz_settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    derandomize=os.environ.get("TUGBOAT_FUZZ_RANDOM") != "1",
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def _report_count(request):
    t0 = time.perf_counter()
    yield
    total, elapsed = sum(TRIED.values()), time.perf_counter() - t0
    parts = ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
    line = (f"fuzz (stored files): {total} files tried in {elapsed:.1f} s, 0 unexpected exceptions ({parts}; "
            f"{sum(LOADED.values())} loaded and were rendered)")

    class _Summary:
        def pytest_terminal_summary(self, terminalreporter):
            terminalreporter.write_sep("-", line)

    if not request.session.testsfailed:
        request.config.pluginmanager.register(_Summary(), "tugboat-fuzz-stored-summary")
    out = os.environ.get("TUGBOAT_FUZZ_REPORT")
    if out:  # tools/fuzz_long.py: add to the count test_fuzz.py wrote in the same round
        before = Path(out).read_text().split() if Path(out).is_file() else []
        prior = int(before[0]) if before else 0
        Path(out).write_text(f"{prior + total} {elapsed:.1f}\n")


@pytest.fixture(scope="module")
def work():
    with tempfile.TemporaryDirectory(prefix="tugboat-fuzz-stored-") as d:
        yield Path(d)


def _metrics(size: int, median: float, acc: float | None) -> dict:
    return {"size_bytes": size, "compressed_bytes": size // 2, "params": 100, "nonzero_params": 90, "flops": 1000,
            "latency_ms": {"median": median, "p90": median * 1.2, "batch": 8, "threads": 1, "runtime": "onnxruntime"},
            "accuracy": acc, "fidelity": {"top1_agreement": 0.99, "cosine": 0.999, "rel_error": 0.01},
            "seconds": 1.5}


@pytest.fixture(scope="module")
def template(work):
    """A real workspace (written by the engine): its workspace.json, report.json, metrics.json."""
    ws = Workspace.create(work / "template", model="demo:digits-cnn", data="demo:digits",
                          measure={"batch": 8, "threads": 1, "runtime": "onnxruntime"},
                          recipe={"model": "demo:digits-cnn", "steps": []})
    ws.set_baseline(Variant("baseline", {"model": "demo:digits-cnn"}, _metrics(4000, 2.0, 0.95)))
    for i, acc in enumerate((0.9, None)):
        v = Variant(f"prune-r0.{i + 3}", {"steps": [{"technique": "prune", "ratio": 0.3}]}, _metrics(2000, 1.0, acc),
                    artifacts={"onnx": f"prune-r0.{i + 3}/model.onnx"}, warnings=["slower"], info={"k": [1, 2]})
        ws.add_variant(v)
    ws.add_variant(Variant("broken", {"steps": []}, status="failed", error="numerical failure"))
    ws.meta["sweep"] = {"kind": "grid"}
    ws.save()
    files = {name: json.loads((ws.path / name).read_text()) for name in ("workspace.json", "report.json")}
    files["metrics.json"] = json.loads((ws.path / "prune-r0.3" / "metrics.json").read_text())
    return files


WORDS = ["name", "folder", "metrics", "artifacts", "onnx", "baseline", "variants", "failed", "pareto", "recipe",
         "steps", "measure", "batch", "threads", "runtime", "latency_ms", "median", "p90", "accuracy", "fidelity",
         "size_bytes", "status", "ok", "error", "warnings", "info", "version", "meta", "model", "data",
         "../..", "/etc", "..", ".", "baseline/model.onnx", "a/b", "C:\\x", "\x00", "recent_models",
         "last_workspace", "measure_batch", "geometry"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(WORDS))
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(keys, inner, max_size=4)),
                           max_leaves=16)
# a few paths of random choices into the document, each with a replacement value (or a deletion)
edits = st.lists(st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=6),
                           st.one_of(json_values, st.just("<delete>"), st.just("<deep>"))), min_size=1, max_size=4)


def mutate(doc, path: list[int], value):
    """Replace (or delete) the node that ``path`` picks, choosing among children by index."""
    doc = copy.deepcopy(doc)
    if value == "<deep>":
        value = json.loads("[" * 80 + "]" * 80)
    parent, key, node = None, None, doc
    for choice in path:
        if isinstance(node, dict) and node:
            k = sorted(node)[choice % len(node)]
            parent, key, node = node, k, node[k]
        elif isinstance(node, list) and node:
            i = choice % len(node)
            parent, key, node = node, i, node[i]
        else:
            break
    if parent is None:
        return doc if value == "<delete>" else value
    if value == "<delete>":
        del parent[key]
    else:
        parent[key] = value
    return doc


def dump(doc) -> str:
    return json.dumps(doc)  # Python's default: bare NaN and Infinity, as an older or a foreign writer would


def expect_loaded_or_tugboat_error(label: str, fn):
    TRIED[label] += 1
    try:
        result = fn()
    except TugboatError as exc:
        text = str(exc)
        assert text.strip() and "\n" not in text.strip() and "Traceback" not in text, text
        return None
    LOADED[label] += 1
    return result


def render(report: dict) -> None:
    """Everything the CLI does with a loaded report must work."""
    format_summary(report)
    to_csv(report)
    render_html(report, None)


def check_workspace_folder(folder: Path) -> None:
    def opened():
        ws = Workspace.open(folder)
        root = folder.resolve()
        for name in [*ws.names(), *(["baseline"] if ws.baseline else [])]:
            for path in (ws.folder(name), ws.artifact_path(name)):
                if path is not None:
                    assert path.resolve().is_relative_to(root), (name, path)
        render(ws.report())
        ws.save()  # writing it back works (strict JSON) and stays inside
        render(load_any_report(folder))
        return ws

    expect_loaded_or_tugboat_error("workspace.json", opened)


def fresh(work: Path, name: str) -> Path:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


@fuzz_settings(100)
@given(changes=edits)
def test_mutated_workspace_json_loads_or_is_one_error(work, template, changes):
    doc = template["workspace.json"]
    for path, value in changes:
        doc = mutate(doc, path, value)
    folder = fresh(work, "ws")
    (folder / "workspace.json").write_text(dump(doc))
    check_workspace_folder(folder)
    assert not any(p.name.startswith(("X", "escaped")) for p in work.iterdir())


@fuzz_settings(60)
@given(changes=edits)
def test_mutated_metrics_json_of_a_recovered_variant(work, template, changes):
    doc = template["metrics.json"]
    for path, value in changes:
        doc = mutate(doc, path, value)
    folder = fresh(work, "ws-recover")
    (folder / "workspace.json").write_text(dump(template["workspace.json"]))
    (folder / "orphan").mkdir()
    (folder / "orphan" / "metrics.json").write_text(dump(doc))
    check_workspace_folder(folder)


@fuzz_settings(100)
@given(changes=edits)
def test_mutated_report_json_loads_or_is_one_error(work, template, changes):
    doc = template["report.json"]
    for path, value in changes:
        doc = mutate(doc, path, value)
    folder = fresh(work, "run")
    (folder / "report.json").write_text(dump(doc))
    report = expect_loaded_or_tugboat_error("report.json", lambda: load_any_report(folder))
    if report is not None:
        render(report)


@fuzz_settings(100)
@given(content=st.one_of(json_values.map(dump), st.text(max_size=200), st.binary(max_size=200).map(
    lambda b: b.decode("latin-1")), st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)))
def test_random_content_for_every_file_kind(work, content):
    folder = fresh(work, "random")
    (folder / "workspace.json").write_text(content, encoding="utf-8", errors="surrogatepass")
    check_workspace_folder(folder)
    (folder / "workspace.json").unlink()
    (folder / "report.json").write_text(content, encoding="utf-8", errors="surrogatepass")
    expect_loaded_or_tugboat_error("report.json", lambda: load_any_report(folder))
    TRIED["settings.json"] += 1
    (folder / "settings.json").write_text(content, encoding="utf-8", errors="surrogatepass")
    assert isinstance(load_settings(folder / "settings.json"), Settings)


@fuzz_settings(100)
@given(doc=st.dictionaries(keys, json_values, max_size=8), changes=edits)
def test_settings_never_block_start_up(work, doc, changes):
    base = {**Settings().to_dict(), **doc}
    for path, value in changes:
        base = mutate(base, path, value)
    TRIED["settings.json"] += 1
    path = work / "settings.json"
    path.write_text(dump(base))
    loaded = load_settings(path)
    assert isinstance(loaded, Settings)
    for name, default in Settings().to_dict().items():  # every field keeps its type
        assert type(getattr(loaded, name)) is type(default), name
