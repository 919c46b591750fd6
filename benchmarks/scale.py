"""Wall time of one sweep on each executor (issue 20, issue 17.8), and the overhead per task.

    PYTHONPATH=appsrc python benchmarks/scale.py [--variants 12] [--finetune 1]

Runs the same demo-CNN sweep (structured pruning ratios x quantization methods, ``--finetune``
epochs) into a fresh workspace on: the local executor, 2 worker processes, and a local Ray instance
with 1 and 2 CPUs (when Ray is installed). Timing of every variant stays serial in the driver, so
only the making of variants is parallel. The per-task overhead is (executor wall - local wall) / tasks
for the 1-worker Ray run: what shipping a task and its model costs. Prints one table.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
import tomllib
from pathlib import Path

RECIPE = """
model = "demo:digits-cnn"
data = "demo:digits"
[[steps]]
technique = "prune"
method = "structured"
ratio = 0.25
finetune_epochs = {finetune}
[[steps]]
technique = "quantize"
method = "dynamic-int8"
[sweep]
"steps.0.ratio" = {ratios}
"steps.1.method" = ["dynamic-int8", "fp16", "static-int8"]
[measure]
batch = 32
threads = 1
warmup = 1
min_runs = 5
min_seconds = 0.0
max_seconds = 0.3
also_batch1 = false
both_runtimes = false
"""


def one(name: str, text: str, make) -> tuple[float, int]:
    from tugboat.engine.running.recipe import parse_recipe
    from tugboat.engine.running.sweep import run_sweep

    with tempfile.TemporaryDirectory() as d:
        recipe = parse_recipe(tomllib.loads(text), str(Path(d) / "r.toml"))
        t0 = time.perf_counter()
        result = run_sweep(recipe, Path(d) / "ws", executor=make())
        wall = time.perf_counter() - t0
        ok = sum(v.status == "ok" for v in result.variants)
    print(f"{name:<22} {wall:8.2f} s  {ok} variant(s) ok", flush=True)
    return wall, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=int, default=12, help="3 x N/3 grid (default 12)")
    ap.add_argument("--finetune", type=int, default=1, help="fine-tuning epochs after pruning (default 1)")
    args = ap.parse_args()
    ratios = [round(0.1 + 0.8 * i / max(1, args.variants // 3 - 1), 2) for i in range(max(1, args.variants // 3))]
    text = RECIPE.format(finetune=args.finetune, ratios=ratios)

    from tugboat.engine.running.executors import LocalExecutor, make_executor

    print(f"{len(ratios) * 3} variants, {args.finetune} fine-tuning epoch(s)")
    one("local (warm-up run)", text, LocalExecutor)  # first-use imports and caches out of the comparison
    local, n = one("local", text, LocalExecutor)
    one("processes (2 workers)", text, lambda: make_executor("processes", workers=2))
    if importlib.util.find_spec("ray") is None:
        print("ray: not installed (pip install 'tugboat-ml[ray]'); skipped")
        return
    import ray

    from tugboat.engine.running.executors.ray_executor import RayExecutor

    for cpus in (1, 2):
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            wall, _ = one(f"ray (local, {cpus} cpu)", text, RayExecutor)
        finally:
            ray.shutdown()
        if cpus == 1:
            print(f"{'  overhead per task':<22} {(wall - local) / max(1, n) * 1000:8.0f} ms "
                  "(1-CPU Ray minus local, per variant)")


if __name__ == "__main__":
    main()
