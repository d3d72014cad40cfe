"""Bench: fvcore-based MAC counts against torchvision's published `_ops` for every
classification model, and the time to profile ResNet-50 on this machine.

    python bench/profile_catalogue.py [--out bench/results] [--pattern 'resnet*']

Prints a table and writes profile_catalogue.csv. Exit status 1 if any model is off by
more than 1% or has uncounted MAC ops.
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from pathlib import Path

import pandas as pd
import torch
import torchvision

from cost_models import profile


def time_resnet50(repeats: int = 3) -> list[float]:
    model = torchvision.models.resnet50()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        profile(model, (1, 3, 224, 224))
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--pattern", default="*")
    ap.add_argument("--time-only", action="store_true", help="only time ResNet-50's profile; update the summary")
    args = ap.parse_args()
    if args.time_only:
        import json

        times = time_resnet50()
        path = Path(args.out) / "profile_catalogue_summary.json"
        summary = json.loads(path.read_text())
        summary["resnet50_profile_s"] = times
        path.write_text(json.dumps(summary, indent=1))
        print(f"resnet50 profile at 1x3x224x224: {', '.join(f'{t:.2f}s' for t in times)}")
        return 0
    torch.set_grad_enabled(False)
    rows = []
    names = [n for n in torchvision.models.list_models(module=torchvision.models) if fnmatch.fnmatch(n, args.pattern)]
    for name in names:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        crop = getattr(weights.transforms(), "crop_size", [224])
        size = crop[0] if isinstance(crop, (list, tuple)) else int(crop)
        try:  # models with a fixed image size (ViT) must be built at the weights' size
            model = torchvision.models.get_model(name, image_size=size) if size != 224 else torchvision.models.get_model(name)
        except TypeError:
            model = torchvision.models.get_model(name)
        t0 = time.perf_counter()
        table = profile(model, (1, 3, size, size), strict=False)
        seconds = time.perf_counter() - t0
        published = weights.meta["_ops"] * 1e9
        rows.append({"model": name, "input": size, "layers": len(table), "macs_G": table.macs / 1e9,
                     "published_G": published / 1e9, "rel_err": table.macs / published - 1,
                     "uncounted": ",".join(table.uncounted), "profile_s": seconds})
        print(f"{name:28s} {size:4d} {table.macs / 1e9:9.4f} {published / 1e9:9.4f} {rows[-1]['rel_err']:+.4%} "
              f"{seconds:6.2f}s {rows[-1]['uncounted']}", flush=True)
        del model
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "profile_catalogue.csv", index=False)
    bad = df[(df.rel_err.abs() > 0.01) | (df.uncounted != "")]
    print(f"\n{len(df)} models; max |rel err| {df.rel_err.abs().max():.4%}; beyond 1% or uncounted: {len(bad)}")
    if len(bad):
        print(bad.to_string(index=False))
    times = time_resnet50()
    print(f"resnet50 profile at 1x3x224x224: {', '.join(f'{t:.2f}s' for t in times)} "
          f"(threads={torch.get_num_threads()})")
    import json
    import os

    (out / "profile_catalogue_summary.json").write_text(json.dumps({
        "models": len(df), "max_abs_rel_err": float(df.rel_err.abs().max()), "beyond_1pct_or_uncounted": len(bad),
        "resnet50_profile_s": times, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}, indent=1))
    return 1 if len(bad) else 0


if __name__ == "__main__":
    raise SystemExit(main())
