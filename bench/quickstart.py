"""The README's quickstart figures, from a committed output: the quickstart's run and its ONNX export
(with --verify), in a fresh directory and cache, as a user runs them on a fresh clone.

    python bench/quickstart.py        # about two minutes on 2 cores; writes bench/results/quickstart/quickstart.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import code_version, write_json

ROOT = Path(__file__).resolve().parents[1]
RUN = ["run", "--model", "resnet20", "--dataset", "digits", "--budget-bitops", "40M", "--out", "runs/quickstart",
       "--quiet"]
EXPORT = ["export", "runs/quickstart", "--format", "onnx", "--verify"]


def hwsearch(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-m", "hwsearch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=True)
    return proc.stdout


def main() -> None:
    work = Path(tempfile.mkdtemp())
    env = {**os.environ, "HWSEARCH_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    run_out, export_out = hwsearch(RUN, work, env), hwsearch(EXPORT, work, env)
    metrics = json.loads((work / "runs/quickstart/metrics.json").read_text())
    plan = json.loads((work / "runs/quickstart/plan.json").read_text())
    top1 = {line.split()[0]: float(line.split()[2]) for line in export_out.splitlines() if line.split()[1:2] == ["top-1"]}
    record = {"command": "python bench/quickstart.py", "code": code_version(),
              "run": "hwsearch " + " ".join(RUN), "export": "hwsearch " + " ".join(EXPORT),
              "fp32_top1": metrics["fp32_top1"], "search_top1": metrics["search_top1"], "top1": metrics["top1"],
              "bitops": plan["totals"]["bitops"], "budget_bitops": 40e6,
              "export_top1": {"plan": top1["plan"], "pytorch": top1["PyTorch"], "onnx": top1["ONNX"]},
              "bytes": {"model.onnx": (work / "runs/quickstart/model.onnx").stat().st_size,
                        "model.pt": (work / "runs/quickstart/model.pt").stat().st_size},
              "stdout": {"run": run_out.splitlines(), "export": export_out.splitlines()}}
    out = ROOT / "bench" / "results" / "quickstart" / "quickstart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    print(run_out + export_out, end="")


if __name__ == "__main__":
    main()
