"""The files Tugboat writes and reads back (workspace.json, report.json, metrics.json, settings.json,
the lock, temp files) are untrusted input: every stored path stays inside its folder, only Tugboat's
own temp files are cleaned, trust is never stored, counts are checked before allocating, two writers
never share a folder, and every malformed file ends in one line naming it (issue 15)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tugboat import cli
from tugboat.engine.errors import RecipeError, UntrustedFileError
from tugboat.engine.lock import LOCK_FILE, FolderLock, FolderLockedError
from tugboat.engine.running.recipe import load_recipe, parse_recipe, recipe_to_toml
from tugboat.engine.running.sweep import MAX_VARIANTS, plan, random_candidates, run_sweep
from tugboat.engine.running.variants import Variant
from tugboat.engine.running.workspace import Workspace, WorkspaceError
from tugboat.engine.stored import OutputError, StoredFileError, atomic_write_bytes, dumps, inside
from tugboat.settings import Settings, load_settings

PRUNE = '[[steps]]\ntechnique = "prune"\nmethod = "structured"\nratio = 0.5\nfinetune_epochs = 0\n'
MEASURE = "[measure]\nbatch = 8\nthreads = 1\nmin_runs = 1\nmax_seconds = 0.05\nwarmup = 0\n"


def metrics(size: int = 1000, median: float = 1.0, acc: float = 0.9) -> dict:
    return {"size_bytes": size, "compressed_bytes": size, "params": 10, "nonzero_params": 10, "flops": 100,
            "latency_ms": {"median": median, "p90": median, "batch": 8, "threads": 1, "runtime": "onnxruntime"},
            "accuracy": acc, "fidelity": {"top1_agreement": 1.0, "cosine": 1.0, "rel_error": 0.0}}


def make_workspace(path: Path, **kw) -> Workspace:
    ws = Workspace.create(path, model="demo:digits-cnn", data="demo:digits",
                          measure=kw.pop("measure", {"batch": 8, "threads": 1, "runtime": "onnxruntime"}))
    ws.set_baseline(Variant("baseline", {}, metrics(2000, 2.0)))
    ws.add_variant(Variant("v1", {"steps": []}, metrics(1000, 1.0)))
    return ws


def edit_json(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def write_recipe(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text('model = "demo:digits-cnn"\ndata = "demo:digits"\n' + text)
    return path


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --- 1. write containment -------------------------------------------------------------------------

@pytest.mark.parametrize("rel", ["../../../escaped", "/tmp/tugboat-escaped-abs", "a/../../escaped", "..",
                                 "C:\\escaped", "\\\\server\\share", "", "x\x00y"])
def test_inside_refuses_every_way_out(tmp_path, rel):
    with pytest.raises(StoredFileError, match=r"outside|not a valid|single"):
        inside(tmp_path, rel, what="folder", single=True)


def test_inside_refuses_a_symlink_that_leads_out(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "ws" / "evil").symlink_to(tmp_path / "outside")
    with pytest.raises(StoredFileError, match="symlink"):
        inside(tmp_path / "ws", "evil/model.onnx", what="artifact")
    assert inside(tmp_path / "ws", "fine/model.onnx", what="artifact") == tmp_path / "ws" / "fine" / "model.onnx"


@pytest.mark.parametrize("where, value", [
    ("baseline.folder", "../../../X"), ("baseline.folder", "/ABS"), ("variants.0.folder", "../v1"),
    ("variants.0.folder", "a/b"), ("variants.0.artifacts", {"onnx": "../../model.onnx"}),
    ("baseline.artifacts", {"onnx": "/etc/passwd"}),
])
def test_stored_paths_outside_the_workspace_are_refused(tmp_path, where, value):
    ws_path = tmp_path / "deep" / "ws"
    make_workspace(ws_path)
    target = str(tmp_path / "X") if value == "/ABS" else value

    def change(raw):
        key, *rest = where.split(".")
        node = raw[key][int(rest[0])] if rest[0].isdigit() else raw[key]
        node[rest[-1]] = target

    edit_json(ws_path / "workspace.json", change)
    with pytest.raises(WorkspaceError, match=r"outside|single folder name") as err:
        Workspace.open(ws_path)
    assert "workspace.json" in str(err.value)


def test_symlinked_variant_folder_is_refused(tmp_path):
    ws_path = tmp_path / "ws"
    make_workspace(ws_path)
    (tmp_path / "elsewhere").mkdir()
    (ws_path / "v1").rename(tmp_path / "v1-real")
    (ws_path / "v1").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(WorkspaceError, match="symlink"):
        Workspace.open(ws_path)


def test_sweep_resume_with_an_escaping_folder_writes_nothing_outside(tmp_path, capsys):
    ws_path = tmp_path / "a" / "b" / "ws"
    make_workspace(ws_path)
    edit_json(ws_path / "workspace.json", lambda raw: raw["baseline"].update(folder="../../../X"))
    recipe = write_recipe(tmp_path, PRUNE + '[sweep]\n"steps.0.ratio" = [0.25]\n' + MEASURE)
    assert cli.main(["sweep", str(recipe), "--out", str(ws_path), "--resume", "--quiet"]) == 2
    one_line_error(capsys, "workspace.json", "outside")
    assert not (tmp_path / "X").exists() and not (tmp_path / "a" / "X").exists()


# --- 2. only Tugboat's own temp files are cleaned --------------------------------------------------

def test_recovery_and_report_remove_only_tugboat_temp_files(tmp_path, capsys):
    ws_path = tmp_path / "ws"
    make_workspace(ws_path)
    mine = [ws_path / ".workspace.json.tugboat-x1.tmp", ws_path / "v1" / ".metrics.json.tugboat-x2.tmp"]
    users = [ws_path / "notes" / ".draft.tmp", ws_path / ".draft.tmp", ws_path / "v1" / ".notes.tmp",
             ws_path / "notes" / "deeper" / ".x.tugboat-1.tmp"]  # not where Tugboat writes
    for p in mine + users:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert cli.main(["report", str(ws_path)]) == 0
    assert not any(p.exists() for p in mine)
    assert all(p.read_text() == "x" for p in users)


def test_temp_files_are_left_alone_while_another_writer_holds_the_folder(tmp_path):
    ws_path = tmp_path / "ws"
    make_workspace(ws_path)
    live = ws_path / "v1" / ".metrics.json.tugboat-live.tmp"  # a running sweep's write
    live.write_text("half")
    with FolderLock(ws_path, "a sweep"):
        Workspace.open(ws_path)
    assert live.exists()


def test_atomic_write_names_its_temp_file_distinctively(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(Path(a).name), real(a, b)))
    atomic_write_bytes(tmp_path / "report.json", b"{}")
    assert seen and seen[0].startswith(".report.json.tugboat-") and seen[0].endswith(".tmp")


# --- 3. trust is never stored or read ---------------------------------------------------------------

def test_trust_in_a_recipe_is_ignored_with_a_warning_and_never_written(tmp_path, capsys):
    path = write_recipe(tmp_path, 'trust = true\n[[steps]]\ntechnique = "distill"\nstudent = "file"\n'
                                  'student_file = "s.pt"\nstudent_trust = true\n')
    recipe = load_recipe(path)
    assert recipe.trust is False
    assert any("'trust = true' is ignored" in n for n in recipe.notes)
    assert any("student_trust' is ignored" in n and "--trust" in n for n in recipe.notes)
    assert "student_trust" not in recipe.steps[0]
    assert "trust" not in recipe_to_toml(recipe)
    ws = Workspace.create(tmp_path / "ws", model=recipe.model, recipe=recipe.to_dict())
    ws.set_baseline(Variant("baseline", recipe.to_dict(), metrics()))
    ws.add_variant(Variant("v", recipe.to_dict(), metrics()))
    for name in ("workspace.json", "report.json", "v/metrics.json", "v/recipe.toml"):
        assert "trust" not in (tmp_path / "ws" / name).read_text(), name


def test_trust_flags_in_an_old_workspace_are_dropped_when_read_and_never_written_back(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    old = {"model": "m", "trust": True, "steps": [{"technique": "distill", "student_trust": True}]}

    def plant(raw):
        raw["recipe"] = old
        raw["variants"][0]["recipe"] = old

    edit_json(tmp_path / "ws" / "workspace.json", plant)
    ws = Workspace.open(tmp_path / "ws")
    assert "trust" not in json.dumps(ws.recipe) and "trust" not in json.dumps(ws.get("v1").recipe)
    ws.save()
    again = Workspace.create(tmp_path / "copy", model="m")
    again.add_variant(ws.get("v1"))  # what the app's Save as does
    for path in (tmp_path / "ws" / "workspace.json", tmp_path / "ws" / "report.json",
                 tmp_path / "copy" / "v1" / "recipe.toml", tmp_path / "copy" / "v1" / "metrics.json"):
        assert "trust" not in path.read_text(), path
    assert "trust" not in recipe_to_toml(old)


def test_old_reports_with_student_trust_false_still_parse():
    recipe = parse_recipe({"model": "demo:digits-cnn", "steps": [{"technique": "distill", "student_trust": False}]})
    assert "student_trust" not in recipe.steps[0] and not recipe.notes


def test_cli_warns_that_recipe_trust_is_ignored(tmp_path, capsys):
    path = write_recipe(tmp_path, "trust = true\n" + PRUNE + '[sweep]\n"steps.0.ratio" = [0.25]\n')
    (tmp_path / "out").write_text("a file")  # refused right after reading the recipe
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "warning" in err and "'trust = true' is ignored" in err and "--trust" in err


def test_untrusted_student_file_names_the_option_that_covers_it(tmp_path):
    import torch

    from tugboat.engine.io.loading import load_model
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques.distill import make_student

    student = tmp_path / "student.pt"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), student)
    teacher = load_model("demo:digits-cnn")
    params = {"student": "file", "student_file": str(student), "width": 0.5, "depth": 1}
    with pytest.raises(UntrustedFileError) as err:
        make_student(teacher, params, None, (10,), null_progress())
    text = str(err.value)
    assert str(student) in text and "student_file" in text and "--trust" in text and "tugboat run" in text
    _, _, notes = make_student(teacher, {**params, "trust": True}, None, (10,), null_progress())
    assert notes["student_format"]


@pytest.mark.parametrize("argv, recipe_says, model_trust, step_trust", [
    ([], "", False, False), (["--trust"], "", True, True), ([], "trust = true\n", False, False)])
def test_trust_comes_only_from_this_runs_command_line(tmp_path, monkeypatch, argv, recipe_says, model_trust,
                                                      step_trust):
    from tugboat.engine.running import runner as recipe_mod

    seen = {}
    monkeypatch.setattr(recipe_mod, "run", lambda recipe, out, progress: seen.update(
        model=recipe.trust, steps=recipe.trust_steps) or {"baseline": {"metrics": {}}, "variants": []})
    monkeypatch.setattr(cli, "format_summary", lambda report: "")
    path = write_recipe(tmp_path, recipe_says + PRUNE)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet", *argv]) == 0
    assert seen == {"model": model_trust, "steps": step_trust}


def test_only_techniques_that_load_files_get_the_runs_trust(monkeypatch):
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.progress import null_progress
    from tugboat.engine.running.runner import apply_steps
    from tugboat.engine.techniques import steps as registry

    seen = []

    def record(handle, params, data, progress):
        seen.append(dict(params))
        return handle

    registry.techniques()
    for name, loads in (("probe_loads", True), ("probe_plain", False)):
        monkeypatch.setitem(registry._REGISTRY, name, registry.Technique(
            name, name, "", {"m": ""}, [], record, needs_torch=False, extras={"loads_files": True} if loads else {}))
    handle = load_model("demo:digits-cnn")
    steps = [{"technique": "probe_loads", "method": "m"}, {"technique": "probe_plain", "method": "m"}]
    apply_steps(handle, steps, None, null_progress(), guard=False, trust=True)
    apply_steps(handle, steps, None, null_progress(), guard=False)
    assert [p.get("trust") for p in seen] == [True, None, False, None]


# --- 4. counts checked before allocating --------------------------------------------------------------

def test_a_grid_of_100_million_is_refused_arithmetically(tmp_path):
    axes = "".join(f'"steps.0.{p}" = [{", ".join(v)}]\n' for p, v in [
        ("ratio", [f"0.{i}" for i in range(1, 10)] + ["0.05"]), ("lr", [f"{i}e-4" for i in range(1, 11)]),
        ("finetune_epochs", [str(i) for i in range(10)]), ("iterative_steps", [str(i) for i in range(1, 11)]),
        ("round_to", [str(i) for i in range(10)]), ("importance", ['"l1"', '"l2"'] * 5),
        ("scope", ['"uniform"'] * 10), ("allocation", ['"uniform"'] * 10)])
    recipe = load_recipe(write_recipe(tmp_path, PRUNE + "[sweep]\n" + axes))
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=r"100,000,000 combinations.*--max-variants"):
        plan(recipe)
    assert time.perf_counter() - t0 < 2.0
    recipe.search = {"budget_seconds": 1, "max_variants": 3}  # sampling it is fine: drawn lazily
    p = plan(recipe)
    assert not isinstance(p.candidates, list) and len([next(p.candidates) for _ in range(3)]) == 3


def test_a_grid_over_the_limit_needs_the_explicit_override(tmp_path, capsys):
    values = ", ".join(f"{0.5 + i / 10000:.4f}" for i in range(MAX_VARIANTS + 1))
    path = write_recipe(tmp_path, PRUNE + f'[sweep]\n"steps.0.ratio" = [{values}]\n')
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    one_line_error(capsys, "1,001 combinations", "--max-variants")
    assert not (tmp_path / "out").exists()
    assert len(plan(load_recipe(path), max_variants=1001).candidates) == 1001


# --- 5. one writer per folder -----------------------------------------------------------------------------

def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with FolderLock(tmp_path, "tugboat sweep"):
        with pytest.raises(FolderLockedError) as err:
            FolderLock(tmp_path, "another").acquire()
        assert f"in use by PID {os.getpid()}" in str(err.value) and "tugboat sweep" in str(err.value)
    assert not (tmp_path / LOCK_FILE).exists()  # released and removed
    FolderLock(tmp_path).acquire().release()


def test_a_planted_lock_symlink_is_never_written_through(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / LOCK_FILE).symlink_to(victim)
    path = write_recipe(tmp_path, PRUNE + '[sweep]\n"steps.0.ratio" = [0.25]\n')
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "ws"), "--quiet"]) == 2
    one_line_error(capsys, LOCK_FILE, "symbolic link")
    assert victim.read_text() == "precious"


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "started": "then"}))
    with FolderLock(tmp_path, "me"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_sweep_on_a_folder_another_process_writes_is_refused(tmp_path, capsys):
    out = tmp_path / "ws"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tugboat.engine.lock import FolderLock; "
         f"lock = FolderLock({str(out)!r}, 'tugboat sweep').acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        path = write_recipe(tmp_path, PRUNE + '[sweep]\n"steps.0.ratio" = [0.25]\n')
        assert cli.main(["sweep", str(path), "--out", str(out), "--quiet"]) == 2
        one_line_error(capsys, f"in use by PID {holder.pid}", "tugboat sweep")
        assert cli.main(["run", str(path), "--out", str(out), "--quiet"]) == 2
        one_line_error(capsys, f"in use by PID {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(out):  # its process is gone: the lock is stale and taken over
        pass


# --- 6. --resume with other settings -------------------------------------------------------------------

@pytest.mark.parametrize("change, fragment", [
    ("batch = 64", "measure.batch 8 (now 64)"), ("runtime = \"torch\"", "measure.runtime"),
    ("threads = 2", "measure.threads 1 (now 2)")])
def test_resume_with_other_measure_settings_is_refused(tmp_path, change, fragment):
    make_workspace(tmp_path / "ws")
    text = PRUNE + '[sweep]\n"steps.0.ratio" = [0.25]\n' + MEASURE.replace(change.split(" ")[0] + " = ", "#")
    recipe = load_recipe(write_recipe(tmp_path, text.replace("[measure]\n", f"[measure]\n{change}\n")))
    with pytest.raises(WorkspaceError, match="cannot be compared") as err:
        run_sweep(recipe, tmp_path / "ws", resume=True)
    assert fragment in str(err.value)


def test_resume_with_other_data_is_refused(tmp_path):
    make_workspace(tmp_path / "ws")
    recipe = load_recipe(write_recipe(tmp_path, PRUNE + '[sweep]\n"steps.0.ratio" = [0.25]\n' + MEASURE))
    recipe.data = "demo:other"
    with pytest.raises(WorkspaceError, match="data 'demo:digits' \\(now 'demo:other'\\)"):
        run_sweep(recipe, tmp_path / "ws", resume=True)


# --- 7. malformed report / workspace / settings JSON -----------------------------------------------------

BAD_REPORTS = {
    "empty-baseline": {"baseline": {}},
    "string-metric": {"baseline": {"metrics": {"size_bytes": "big"}}, "variants": []},
    "metrics-string": {"baseline": {"metrics": "str"}},
    "variant-metrics-string": {"baseline": {"metrics": {}}, "variants": [{"name": "a", "metrics": "str"}]},
    "latency-string": {"baseline": {"metrics": {"latency_ms": {"median": "fast"}}}},
    "variants-not-list": {"baseline": {"metrics": {}}, "variants": {"a": 1}},
    "name-number": {"baseline": {"metrics": {}}, "variants": [{"name": 3, "metrics": {}}]},
    "pareto-numbers": {"baseline": {"metrics": {}}, "pareto": [1, 2]},
    "warnings-dict": {"baseline": {"metrics": {}, "warnings": {"a": 1}}},
    "status-bogus": {"baseline": {"metrics": {}}, "variants": [{"name": "a", "status": "weird"}]},
    "root-list": [1, 2],
    "root-string": "report",
    "deep": "[" * 100000 + "]" * 100000,
    "deep-in-key": '{"baseline": {"metrics": {}}, "x": ' + "[" * 200 + "]" * 200 + "}",
}


@pytest.mark.parametrize("name", sorted(BAD_REPORTS))
def test_malformed_report_json_is_one_line(tmp_path, capsys, name):
    content = BAD_REPORTS[name]
    (tmp_path / "report.json").write_text(content if isinstance(content, str) and name.startswith("deep")
                                          else json.dumps(content))
    assert cli.main(["report", str(tmp_path)]) == 2
    one_line_error(capsys, "report.json")


BAD_WORKSPACES = {
    "variants-metrics-string": lambda raw: raw["variants"][0].update(metrics="str"),
    "baseline-list": lambda raw: raw.update(baseline=[1]),
    "measure-batch-string": lambda raw: raw["measure"].update(batch="64"),
    "meta-string": lambda raw: raw.update(meta="x"),
    "version-string": lambda raw: raw.update(version="2"),
    "artifacts-list": lambda raw: raw["variants"][0].update(artifacts=["a"]),
    "fidelity-string": lambda raw: raw["variants"][0]["metrics"].update(fidelity={"cosine": "1"}),
}


@pytest.mark.parametrize("name", sorted(BAD_WORKSPACES))
def test_malformed_workspace_json_is_one_line(tmp_path, capsys, name):
    make_workspace(tmp_path / "ws")
    edit_json(tmp_path / "ws" / "workspace.json", BAD_WORKSPACES[name])
    assert cli.main(["report", str(tmp_path / "ws")]) == 2
    one_line_error(capsys, "workspace.json")


def test_read_only_workspace_needing_recovery_is_a_clear_error(tmp_path, monkeypatch):
    ws_path = tmp_path / "ws"
    make_workspace(ws_path)
    saved = (ws_path / "workspace.json").read_bytes()
    Workspace.open(ws_path).add_variant(Variant("v2", {}, metrics()))
    (ws_path / "workspace.json").write_bytes(saved)  # killed before the index was rewritten

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)  # root ignores chmod, a read-only mount does not
    with pytest.raises(WorkspaceError, match=r"does not list yet.*Read-only file system") as err:
        Workspace.open(ws_path)
    assert str(ws_path) in str(err.value) and "\n" not in str(err.value)


def test_deeply_nested_settings_are_ignored(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("[" * 200000 + "]" * 200000)
    assert load_settings(path) == Settings()
    path.write_text('{"recent_models": ' + "[" * 5000 + "]" * 5000 + ', "measure_batch": 7}')
    assert load_settings(path) == Settings()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_special_files_are_refused_not_read(tmp_path, capsys):
    os.mkfifo(tmp_path / "settings.json")  # reading it would block start-up forever
    assert load_settings(tmp_path / "settings.json") == Settings()
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "report.json")
    assert cli.main(["report", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "report.json")
    make_workspace(tmp_path / "ws")
    (tmp_path / "ws" / "orphan").mkdir()
    os.mkfifo(tmp_path / "ws" / "orphan" / "metrics.json")  # recovery skips it
    assert cli.main(["report", str(tmp_path / "ws")]) == 0


# --- 8. NaN and Infinity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    (PRUNE.replace("ratio = 0.5", "ratio = nan"), "'steps.0.ratio' must be a finite number"),
    (PRUNE + "lr = nan\n", "'steps.0.lr' must be a finite number, got nan"),
    ('[[steps]]\ntechnique = "distill"\nalpha = nan\n', "'steps.0.alpha' must be a finite number"),
    ('[[steps]]\ntechnique = "distill"\ntemperature = inf\n', "finite number, got inf"),
    ('[[steps]]\ntechnique = "distill"\nepochs = inf\n', "whole number, got inf"),
])
def test_nan_and_inf_parameters_are_refused(tmp_path, text, fragment):
    with pytest.raises(RecipeError, match=r"finite|whole") as err:
        load_recipe(write_recipe(tmp_path, text))
    assert fragment in str(err.value)


@pytest.mark.parametrize("values", ["[0.3, nan]", "[inf]", "[0.3, -inf]"])
def test_nan_in_sweep_lists_is_refused_before_running(tmp_path, values):
    for tables in ("", "[search]\nbudget_seconds = 5\n"):
        lr_range = '"steps.0.lr" = {min = 0.001, max = 0.01}\n' if tables else ""
        recipe = load_recipe(write_recipe(tmp_path, PRUNE + f'[sweep]\n"steps.0.ratio" = {values}\n' + lr_range
                                          + tables))
        with pytest.raises(RecipeError, match="finite"):
            p = plan(recipe)
            list(p.candidates) if isinstance(p.candidates, list) else next(p.candidates)


def test_tugboat_json_never_holds_bare_nan(tmp_path):
    assert json.loads(dumps({"a": float("nan"), "b": [float("inf")]})) == {"a": None, "b": [None]}
    ws = make_workspace(tmp_path / "ws")
    ws.add_variant(Variant("nan", {}, {**metrics(), "accuracy": float("nan")}))

    def strict(name):
        raise ValueError(f"bare {name}")

    for name in ("workspace.json", "report.json", "nan/metrics.json"):
        json.loads((tmp_path / "ws" / name).read_text(), parse_constant=strict)


# --- 9. range sweeps checked up front ---------------------------------------------------------------------

def test_a_range_outside_the_parameter_range_is_refused_up_front(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, PRUNE + '[sweep]\n"steps.0.ratio" = {min = 0.5, max = 1.5}\n'
                                                        "[search]\nbudget_seconds = 10\n"))
    with pytest.raises(RecipeError, match=r"'steps.0.ratio', range max: 'steps.0.ratio' = 1.5 is out of range"):
        plan(recipe)


def test_a_range_on_a_whole_number_parameter_draws_whole_numbers(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, PRUNE + '[sweep]\n"steps.0.finetune_epochs" = {min = 1, max = 5}\n'
                                                        '"steps.0.ratio" = {min = 0.2, max = 0.4}\n'
                                                        "[search]\nbudget_seconds = 10\n"))
    cands = random_candidates(recipe, seed=3)
    drawn = [next(cands).steps[0]["finetune_epochs"] for _ in range(20)]
    assert all(isinstance(d, int) and 1 <= d <= 5 for d in drawn) and len(set(drawn)) > 1
    bad = load_recipe(write_recipe(tmp_path, PRUNE + '[sweep]\n"steps.0.method" = {min = 1, max = 2}\n'
                                                     "[search]\nbudget_seconds = 10\n", "bad.toml"))
    with pytest.raises(RecipeError, match="numeric parameter"):
        plan(bad)


# --- 10. output paths -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "sweep"])
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    path = write_recipe(tmp_path, PRUNE + '[sweep]\n"steps.0.ratio" = [0.25]\n' * (command == "sweep"))
    (tmp_path / "out").write_text("mine")
    t0 = time.perf_counter()
    assert cli.main([command, str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    one_line_error(capsys, "existing file", str(tmp_path / "out"))
    assert time.perf_counter() - t0 < 5 and (tmp_path / "out").read_text() == "mine"


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*_a, **_k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    path = write_recipe(tmp_path, PRUNE)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    one_line_error(capsys, "cannot be written (Permission denied)")


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text('{"old": true}')

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"\(No space left on device\); the previous version is kept"):
        atomic_write_bytes(target, b'{"new": true}')
    assert target.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_report_html_or_csv_to_a_folder_or_under_a_file_is_one_line(tmp_path, capsys):
    make_workspace(tmp_path / "ws")
    (tmp_path / "afile").write_text("x")
    for option, target in (("--html", tmp_path), ("--csv", tmp_path), ("--csv", tmp_path / "afile" / "t.csv")):
        assert cli.main(["report", str(tmp_path / "ws"), option, str(target)]) == 2
        one_line_error(capsys, str(target))


def test_run_into_a_sweep_workspace_is_refused(tmp_path, capsys):
    make_workspace(tmp_path / "ws")
    before = (tmp_path / "ws" / "report.json").read_bytes()
    assert cli.main(["run", str(write_recipe(tmp_path, PRUNE)), "--out", str(tmp_path / "ws"), "--quiet"]) == 2
    one_line_error(capsys, "holds a sweep workspace", "report.json")
    assert (tmp_path / "ws" / "report.json").read_bytes() == before
