"""How far a plan's top-1 moves with the seed and with the source of batches, for the tolerance of
tests/test_own_model.py: the network that test trains outside hwsearch, quantized (its budget and
epochs) from the command line's path (hwsearch's digits tensors: random-crop augmentation, randperm
order) and from the Python API over a Dataset and a DataLoader of the same images (no augmentation,
DataLoader order), seeds 0-4 each.

    python bench/own_model_spread.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    import torch
    from common import write_json
    from test_own_model import BUDGET, _datasets, train_own_model
    from torch.utils.data import DataLoader

    import hwsearch
    from hwsearch.data import load_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "own-model" / "spread.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    own = train_own_model(Path(tempfile.mkdtemp()))
    tensors = replace(load_dataset("digits"), mean=(0.0,), std=(1.0,))  # the CLI's path, --input-mean none
    rows = []
    for seed in range(args.seeds):
        train, test = _datasets()
        sources = {"cli-tensors": (tensors, None), "dataset": (train, test),
                   "dataloader": (DataLoader(train, batch_size=128, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(seed)),
                                  DataLoader(test, batch_size=100))}
        for kind, (tr, te) in sources.items():
            r = hwsearch.quantize(own["model"], tr, te, budgets={"bitops": BUDGET}, epochs=2, search_epochs=2,
                                  seed=seed)
            rows.append({"source": kind, "seed": seed, "top1": r.metrics["top1"],
                         "bitops": r.plan["totals"]["bitops"]})
            print(f"{kind:12s} seed {seed}  top-1 {r.metrics['top1']:.4f}")
    summary = {}
    for kind in ("cli-tensors", "dataset", "dataloader"):
        tops = [r["top1"] for r in rows if r["source"] == kind]
        summary[kind] = {"min": min(tops), "max": max(tops), "range": max(tops) - min(tops),
                         "mean": sum(tops) / len(tops)}
        print(f"{kind:12s} top-1 {min(tops):.4f}-{max(tops):.4f} (range {max(tops) - min(tops):.4f}, "
              f"mean {sum(tops) / len(tops):.4f})")
    write_json(Path(args.out), {"fp32_top1": own["accuracy"], "budget_bitops": BUDGET, "test_images": 360,
                                "command": "python bench/own_model_spread.py", "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
