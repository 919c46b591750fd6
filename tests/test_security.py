"""Hostile files: nothing a file holds runs unless the user trusts it, ONNX external data stays in
the model's folder, and archive members are never written anywhere.

Each payload creates a marker file when it runs, so "nothing ran" is checked, not assumed."""

from __future__ import annotations

import ast
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tugboat import cli
from tugboat.engine.errors import ModelLoadError, UntrustedFileError
from tugboat.engine.io.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


class WritesFile:
    """Unpickling calls open(marker, "w"): the file appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsShell:
    """Unpickling runs a shell command that creates the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class EvilModule(nn.Module):
    """A real nn.Module whose pickle also runs a command (a whole pickled module)."""

    def __init__(self, marker: Path):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.payload = RunsShell(marker)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _payloads(marker: Path):
    return {"writes_file": WritesFile(marker), "runs_shell": RunsShell(marker)}


def _save_variants(obj, folder: Path, stem: str) -> list[Path]:
    """The same object as a zip-based torch archive (.pt), a legacy torch pickle (.pth) and a
    plain pickle renamed .pt."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.pt", folder / f"{stem}_legacy.pth", folder / f"{stem}_plain.pt"]
    torch.save({"model": obj}, paths[0])
    torch.save({"model": obj}, paths[1], _use_new_zipfile_serialization=False)
    paths[2].write_bytes(pickle.dumps(obj, protocol=2))
    return paths


@pytest.mark.parametrize("payload", ["writes_file", "runs_shell", "module"])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "marker"
    obj = EvilModule(marker) if payload == "module" else _payloads(marker)[payload]
    for path in _save_variants(obj, tmp_path / "files", payload):
        with pytest.raises(UntrustedFileError) as err:
            load_model(path)
        text = str(err.value)
        assert str(path) in text and "--trust" in text and "pickled" in text, text
        assert len(text.splitlines()) == 1
        assert not marker.exists(), f"{path.name}: the payload ran"
        # weights_only loading itself never executes the payload either
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
        assert not marker.exists()


def test_cli_refuses_untrusted_pickle_with_exit_2(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = _save_variants(RunsShell(marker), tmp_path, "evil")[0]
    assert cli.main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "--trust" in err
    assert not marker.exists()


def test_the_payloads_are_real(tmp_path):
    """The control: with trust, each payload does run (so the tests above can fail)."""
    for name in ("writes_file", "runs_shell"):
        marker = tmp_path / f"marker_{name}"
        path = _save_variants(_payloads(marker)[name], tmp_path / name, name)[0]
        with pytest.raises(ModelLoadError):  # runs, then is not an nn.Module
            load_model(path, trust=True)
        assert marker.exists(), name


def _evil_torchscript_zip(path: Path, marker: Path) -> None:
    """A zip shaped like a TorchScript archive (code/ folder) whose data.pkl is a payload."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/code/__torch__/m.py", "class M(Module):\n  pass\n")
        zf.writestr("archive/data.pkl", pickle.dumps(RunsShell(marker), protocol=2))
        zf.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("archive/version", "3\n")


def test_payload_inside_a_torchscript_shaped_archive_does_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "scripted.pt"
    _evil_torchscript_zip(path, marker)
    for trust in (False, True):  # TorchScript's own unpickler never calls Python functions
        with pytest.raises(ModelLoadError) as err:
            load_model(path, trust=trust)
        assert str(path) in str(err.value)
        assert not marker.exists()


def _calls(tree: ast.AST, attr: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            yield node


def test_source_never_unpickles_outside_the_trusted_path():
    """Every torch.load in the app passes weights_only=True, except the one trusted loader;
    pickle/np.load never unpickle; nothing extracts archives to disk."""
    # the process executor's workers read the sweep context their own driver pickled into a private
    # 0700 temp folder, and the driver the variants its workers made into the same folder (checked
    # before reading): our objects between our processes, as a pool's arguments and results would
    # travel; never a file the user gave
    # The window's worker process (executors/child.py) is the same: requests and progress messages
    # over the pipe between the window and the worker it started, the model's context in its private
    # 0700 folder.
    allowed_unsafe = {("engine/io/loading.py", "_load_pickled_module"),
                      ("engine/running/executors/processes.py", "pickle.load"),
                      ("engine/running/executors/child.py", "pickle.load"),
                      ("engine/running/executors/child.py", "pickle.loads"),
                      ("engine/running/executors/child.py", "pickle.Unpickler")}
    found_unsafe = set()
    for path in sorted((ROOT / "appsrc" / "tugboat").rglob("*.py")):
        rel = path.relative_to(ROOT / "appsrc" / "tugboat").as_posix()
        tree = ast.parse(path.read_text())
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node

        def enclosing_function(node, parents=parents):
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    return node.name
            return None

        for call in _calls(tree, "load"):
            owner = ast.unparse(call.func.value)
            kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if owner == "torch":
                if kwargs.get("weights_only") != "True":
                    found_unsafe.add((rel, enclosing_function(call)))
            elif owner in ("pickle", "cloudpickle", "dill", "joblib"):
                found_unsafe.add((rel, f"{owner}.load"))
            elif owner == "np":
                assert kwargs.get("allow_pickle") == "False", f"{rel}: np.load without allow_pickle=False"
        for attr in ("loads", "Unpickler"):
            for call in _calls(tree, attr):
                owner = ast.unparse(call.func.value)
                if owner in ("pickle", "dill", "cloudpickle"):
                    found_unsafe.add((rel, f"{owner}.{attr}"))
        for name in ("extractall", "extract"):
            for call in _calls(tree, name):
                pytest.fail(f"{rel}: {ast.unparse(call)} writes archive members to disk")
    assert found_unsafe == allowed_unsafe


# --- ONNX external data --------------------------------------------------------------------------

def _onnx_with_external(tmp_path: Path, location: str, name: str = "model.onnx") -> Path:
    from onnx import TensorProto, helper

    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def test_onnx_external_data_inside_the_folder_loads(tmp_path):
    path = _onnx_with_external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(np.eye(4, dtype=np.float32).tobytes())
    handle = load_model(path)
    assert onnx.numpy_helper.to_array(handle.onnx_model.graph.initializer[0]).tolist() == np.eye(4).tolist()


@pytest.mark.parametrize("where", ["parent", "etc_passwd", "absolute", "symlink", "symlinked_folder"])
def test_onnx_external_data_outside_the_folder_is_refused(tmp_path, where):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(16, dtype=np.float32).tobytes())
    folder = tmp_path / "models"
    folder.mkdir()
    if where == "parent":
        location = "../secret.bin"
    elif where == "etc_passwd":
        location = "../../../../../../etc/passwd"
    elif where == "absolute":
        location = str(secret)
    elif where == "symlink":
        (folder / "weights.bin").symlink_to(secret)
        location = "weights.bin"
    else:
        (folder / "sub").symlink_to(tmp_path, target_is_directory=True)
        location = "sub/secret.bin"
    path = _onnx_with_external(tmp_path, location)
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    text = str(err.value)
    assert str(path) in text and "outside the model's folder" in text and "refused" in text, text


# --- archive members ---------------------------------------------------------------------------

def _with_hostile_members(data: bytes) -> bytes:
    """A copy of a zip archive with members named to escape any folder they are extracted to."""
    buf = io.BytesIO(data)
    with zipfile.ZipFile(buf, "a") as zf:
        for name in ("../../evil", "archive/../../../evil2", "/tmp/tugboat_evil_abs"):
            zf.writestr(zipfile.ZipInfo(name), b"pwned")
    return buf.getvalue()


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


def _archives() -> dict[str, bytes]:
    out = {}
    buf = io.BytesIO()
    torch.save(_tiny().state_dict(), buf)
    out["weights.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(_tiny(), (torch.zeros(2, 1, 8, 8),)), buf)
    out["scripted.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.export.save(torch.export.export(_tiny(), (torch.zeros(2, 1, 8, 8),)), buf)
    out["program.pt2"] = buf.getvalue()
    return out


def test_archive_members_are_never_written_outside(tmp_path, monkeypatch):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    before = {p for p in tmp_path.rglob("*")}
    for name, data in _archives().items():
        path = deep / name
        path.write_bytes(_with_hostile_members(data))
        try:
            load_model(path, arch="digits-mlp" if name == "weights.pt" else None)
        except ModelLoadError as exc:  # refusing is fine; writing the members is not
            assert str(path) in str(exc)
    written = {p for p in tmp_path.rglob("*")} - before - {deep / n for n in _archives()}
    assert not written, written
    for escaped in (tmp_path / "a" / "evil", tmp_path / "evil", tmp_path / "evil2",
                    Path("/tmp/tugboat_evil_abs")):
        assert not escaped.exists(), escaped


# --- GUI -----------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_gui_asks_trust_naming_the_file_and_declining_runs_nothing(qtbot, tmp_path):
    from tugboat.ui.main_window import MainWindow

    marker = tmp_path / "marker"
    path = tmp_path / "whole_module.pt"
    torch.save(EvilModule(marker), path)
    window = MainWindow()
    qtbot.addWidget(window)
    asked = []
    window.confirm_trust = lambda p: asked.append(p) or False
    try:
        job = window.load_model(str(path))
        with qtbot.waitSignal(job.finished, timeout=60000):
            pass
        qtbot.waitUntil(lambda: bool(asked), timeout=5000)
        assert asked == [str(path)]
        qtbot.wait(300)  # nothing else gets queued after the refusal
        assert not marker.exists()
        assert window.session.baseline is None and len(window.store) == 0
        assert [j.name for j in window.queue.jobs() if not j.is_ended] == []
        shown = [n.label.text() for n in window.notifications.shown()]
        assert any("not trusted" in t and str(path) in t and "nothing was unpickled" in t for t in shown), shown
    finally:
        window.queue.shutdown(10)
