"""The broken-input corpus (tests/corpus, made by tools/make_corpus.py): every bad model, data
and recipe file gives one clear TugboatError naming the file and the problem, through the engine,
the CLI (exit code 2, one line, no traceback) and the GUI (a notification; the app stays usable)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tugboat import cli
from tugboat.engine import errors
from tugboat.engine.errors import TugboatError
from tugboat.engine.io.data import load_data
from tugboat.engine.io.loading import load_model
from tugboat.engine.running.recipe import Recipe, load_recipe
from tugboat.engine.running.runner import prepare, run

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus"
CASES = json.loads((CORPUS / "manifest.json").read_text())["cases"]
# fast measurement settings, for the cases that get as far as measuring
MEASURE = {"batch": 8, "threads": 1, "warmup": 0, "min_runs": 1, "min_seconds": 0.0, "max_seconds": 0.05,
           "also_batch1": False, "both_runtimes": False}


def _ids(cases):
    return [c["file"] for c in cases]


def run_case(case: dict, out_dir: Path) -> None:
    """Feed one corpus case to the engine API it targets (raises for every case)."""
    from tugboat.engine.measuring.measure import MeasureConfig

    path, opts, kind = CORPUS / case["file"], case.get("options", {}), case["kind"]
    if kind == "model":
        load_model(path, arch=opts.get("arch"))
    elif kind == "baseline":
        prepare(Recipe(model=str(path), measure=MeasureConfig(**MEASURE)))
    elif kind == "first_run":
        prepare(Recipe(model=str(CORPUS / opts["model"]), data=str(path), measure=MeasureConfig(**MEASURE)))
    elif kind in ("data", "data_folder"):
        model = load_model(CORPUS / opts["model"]) if opts.get("model") else None
        load_data(CORPUS / opts.get("folder", case["file"]), model)
    elif kind == "recipe":
        load_recipe(path)
    elif kind == "run":
        recipe = load_recipe(path)
        recipe.measure = MeasureConfig(**MEASURE)
        run(recipe, out_dir)
    elif kind == "workspace":
        from tugboat.engine.running.workspace import Workspace

        Workspace.open(path.parent)
    elif kind == "report":
        from tugboat.report_command import load_any_report

        load_any_report(path.parent)
    else:  # pragma: no cover - a manifest typo
        raise AssertionError(f"unknown kind {kind}")


def check_message(case: dict, text: str) -> None:
    assert case["names"] in text, f"{case['file']}: the message does not name the file: {text}"
    for word in case["expect"]:
        assert word in text, f"{case['file']}: {word!r} missing from: {text}"
    assert "\n" not in text.strip() and "Traceback" not in text, text


def test_corpus_is_big_enough_and_every_file_is_a_case():
    assert len(CASES) >= 30
    kinds = {c["kind"] for c in CASES}
    assert kinds >= {"model", "baseline", "data", "recipe", "run", "workspace", "report"}
    files = {c["file"] for c in CASES}
    for fmt in ("{}.onnx", "{}_torchscript.pt", "{}.pt2", "{}_state_dict.pt"):  # every model format
        assert f"models/{fmt.format('truncated')}" in files
        assert any(f.startswith(f"models/{fmt.format('bitflip')}") for f in files) or "onnx" in fmt
    assert "models/bitflip_header.onnx" in files
    named = {c["file"] for c in CASES} | {c.get("options", {}).get("folder") for c in CASES}
    for f in CORPUS.rglob("*"):
        if f.is_file() and f.name != "manifest.json":
            rel = f.relative_to(CORPUS).as_posix()
            assert rel.startswith("good/") or any(rel == n or rel.startswith(f"{n}/") for n in named if n), rel


def test_committed_corpus_is_what_the_script_makes(tmp_path, python):
    # a fresh process: TorchScript names depend on what the process traced before
    subprocess.run([python, str(ROOT / "tools" / "make_corpus.py"), "--out", str(tmp_path / "corpus")],
                   check=True, capture_output=True, timeout=120)
    made = {p.relative_to(tmp_path / "corpus").as_posix(): p.read_bytes()
            for p in (tmp_path / "corpus").rglob("*") if p.is_file()}
    committed = {p.relative_to(CORPUS).as_posix(): p.read_bytes() for p in CORPUS.rglob("*") if p.is_file()}
    assert made.keys() == committed.keys()

    def same(name: str, a: bytes, b: bytes) -> bool:
        # TorchScript and torch.export files record the script's path (debug records, stack
        # traces), so they differ between checkouts (and a damaged one cannot be opened to compare
        # members): about the same size there; every other file must be byte-identical
        if "torchscript" in name or name.endswith(".pt2"):
            return abs(len(a) - len(b)) <= max(512, len(b) // 20)
        return a == b

    changed = [k for k in made if not same(k, made[k], committed[k])]
    assert not changed, f"rerun tools/make_corpus.py: {changed}"


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_engine_gives_the_documented_error(case, tmp_path):
    with pytest.raises(TugboatError) as err:
        run_case(case, tmp_path / "out")
    assert type(err.value) is getattr(errors, case["error"]), f"{type(err.value).__name__}: {err.value}"
    check_message(case, str(err.value))
    assert not (tmp_path / "out" / "report.json").exists()


def cli_args(case: dict, tmp_path: Path) -> list[str]:
    """``tugboat info FILE`` for model files; ``tugboat run RECIPE`` for everything else (data and
    baseline cases get a recipe naming the corpus file)."""
    path, opts, kind = CORPUS / case["file"], case.get("options", {}), case["kind"]
    out = str(tmp_path / "out")
    if kind == "model":
        return ["info", str(path), *(["--arch", opts["arch"]] if opts.get("arch") else [])]
    if kind in ("recipe", "run"):
        return ["run", str(path), "--out", out, "--quiet"]
    if kind in ("workspace", "report"):
        return ["report", str(path.parent)]
    if kind == "baseline":
        model, data = path, None
    else:
        model, data = CORPUS / opts["model"], CORPUS / opts.get("folder", case["file"])
    lines = [f"model = {json.dumps(str(model))}"]
    if data is not None:
        lines.append(f"data = {json.dumps(str(data))}")
    lines.append("[measure]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in MEASURE.items()]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("\n".join(lines) + "\n")
    return ["run", str(recipe), "--out", out, "--quiet"]


# data read without a model (a multi-array check) has no CLI form: the CLI always loads a model
CLI_CASES = [c for c in CASES if c["kind"] != "data" or c.get("options", {}).get("model")]


@pytest.mark.parametrize("case", CLI_CASES, ids=_ids(CLI_CASES))
def test_cli_exit_code_2_and_one_line(case, tmp_path, capsys):
    rc = cli.main(cli_args(case, tmp_path))
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert captured.out == ""
    assert captured.err.startswith("tugboat: error: ") and captured.err.endswith("\n")
    check_message(case, captured.err)


SUBPROCESS_CASES = [c for c in CASES if c["file"] in (
    "models/bitflip.pt2", "models/readme_renamed.onnx", "recipes/nan_model.toml", "recipes/param_typo.toml")]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=_ids(SUBPROCESS_CASES))
def test_cli_in_a_real_process_prints_one_line(case, tmp_path, python):
    """Warnings and library logging included: what a user sees is exactly one line."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    proc = subprocess.run([python, "-m", "tugboat", *cli_args(case, tmp_path)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tugboat: error: "), proc.stderr
    check_message(case, lines[0])


def test_info_warns_when_outputs_are_nan(capsys):
    rc = cli.main(["info", str(CORPUS / "models" / "nan_outputs.onnx")])
    out = capsys.readouterr().out
    assert rc == 0
    warning = [line for line in out.splitlines() if line.startswith("Warning")]
    assert warning and "broken" in warning[0] and "NaN" in warning[0], out


GUI_CASES = {c["file"]: c for c in CASES}


@pytest.mark.timeout(300)
def test_gui_notifies_and_still_loads_the_demo(qtbot):
    from tugboat.engine.measuring.measure import MeasureConfig
    from tugboat.ui.main_window import MainWindow

    window = MainWindow()
    qtbot.addWidget(window)
    window.session.measure = MeasureConfig(**MEASURE)
    window.show()
    window.confirm_trust = lambda p: pytest.fail(f"asked to trust {p}")
    try:
        tries = [("models/bitflip_header.onnx", None), ("models/readme_renamed.onnx", None),
                 ("good/tiny.onnx", "data/label_count.npz")]
        for model, data in tries:
            before = len(window.notifications.shown())
            job = window.load_model(str(CORPUS / model), str(CORPUS / data) if data else "")
            with qtbot.waitSignal(job.failed, timeout=60000):
                pass
            qtbot.waitUntil(lambda b=before: len(window.notifications.shown()) > b, timeout=5000)
            text = window.notifications.shown()[-1].label.text()
            case = GUI_CASES[data or model]
            check_message(case, text)
            assert window.session.baseline is None
        job = window.load_demo()
        with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
            pass
        assert job.state == "done" and window.session.baseline is not None
        assert window.store.baseline.metrics["accuracy"] > 0.9
    finally:
        window.queue.shutdown(10)
