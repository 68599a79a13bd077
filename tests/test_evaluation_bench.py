"""bench/eval_throughput.py's CPU smoke run, in a fresh process in which the modules of the
harness's task stack (and of our tracking) cannot be imported: the benchmark of the harness
model's `loglikelihood` and `generate_until` needs only `lm_eval`'s model interface, whose wheel
is all a CUDA PyTorch image lacks for it (the bench's docstring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

ABSENT = ("datasets", "evaluate", "sqlitedict", "pytablewriter", "rouge_score", "word2number",
          "dill", "multiprocess", "mlflow", "chardet", "wcwidth")  # fmt: skip
"""What `lm-eval` requires beyond a CUDA PyTorch image, what only training needs (`mlflow`),
and optional imports the image lacks; `more_itertools` is not among them: setuptools vendors
it. The rest of what the smoke run imports is in the image or among bench/gpu.sh's wheels."""

RUN = f"""
import runpy, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on purpose)")

sys.meta_path.insert(0, Absent())
sys.argv = ["bench/eval_throughput.py", *sys.argv[1:]]
runpy.run_path("bench/eval_throughput.py", run_name="__main__")
"""


def test_eval_bench_runs_on_the_cpu_without_the_harness_task_stack(tmp_path):
    out = tmp_path / "bench.jsonl"
    # not this process's torch.distributed rendezvous (set by in-process tests before this one)
    dist = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", RUN, "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["bench"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"mc", "gen"}
    assert rows["mc"]["requests"] == 2 * 4 and rows["mc"]["requests_per_s"] > 0
    assert rows["mc"]["forwards"] >= 2  # 8 requests x (4 samples + the greedy row) / 16 rows
    assert rows["gen"]["requests"] == 2 and rows["gen"]["tokens_per_s"] > 0
    assert "| mc | 8 |" in done.stdout
