"""Toy techniques for the window's worker process (tests/test_child_jobs.py). Importable by name, so
the worker imports this module too and the toys are registered there as well."""

from __future__ import annotations

import copy
import os
import time

from tugboat.engine.errors import TugboatError
from tugboat.engine.techniques import steps
from tugboat.engine.techniques.steps import Param, Technique

NAME = "toy-child"


def apply(handle, params, data, progress):
    method = params["method"]
    if method == "crash":
        os._exit(3)  # the worker dies mid-run, as a segfault or the out-of-memory killer would end it
    if method == "fail":
        raise TugboatError("the toy refuses this model", path="toy.onnx")
    if method == "spin":  # never checks for a cancel: only ending the process stops it
        progress.record("log", message=f"spinning in {os.getpid()}")
        end = time.monotonic() + params["seconds"]
        while time.monotonic() < end:
            time.sleep(0.01)
    new = copy.copy(handle)
    new.info = {**handle.info, "made_by_pid": os.getpid()}
    return new


TECHNIQUE = Technique(
    NAME, "Toy (worker)", "Records the process it ran in; or spins, crashes or fails on purpose.",
    methods={"pid": "record the pid", "spin": "busy for a while", "crash": "end the process",
             "fail": "raise a TugboatError"},
    params=[Param("seconds", "float", 60.0, "How long spin runs.", 0.0, 600.0)],
    apply=apply, needs_torch=False)


def register() -> None:
    steps.register(TECHNIQUE)


def unregister() -> None:
    steps.unregister(NAME)


register()
