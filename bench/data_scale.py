"""Bench: training from an ImageFolder held in memory against one streamed from disk.

Makes an ImageFolder of N JPEGs at a given size (the CIFAR-10 copy upscaled, or synthetic noise),
then, for each data mode, trains ``--steps`` steps (hwsearch's training loop, FP32, one process) in a
fresh child process and records images/s, the fraction of each step spent waiting for the next batch
(time inside the batch iterator, which in memory mode includes the augmentation on the device), and
the peak resident memory of the whole process tree (the child and its DataLoader workers, sampled
every 50 ms with psutil). Mode ``synthetic`` trains the same model on ``steps x batch`` random images
held in memory: the memory of training itself, without any data pipeline, to subtract.

    # speed: the CIFAR-10 copy, ResNet-20, batch 128, memory against stream, twice each, alternately
    python bench/data_scale.py --data imagefolder:../shared/data/cifar10-jpeg.tar.gz --modes memory,stream,memory,stream \\
        --steps 150 --out bench/results/data-scale/cifar10-speed.json
    # memory: 20,000 JPEGs at 224 pixels (about 3 GB decoded), the mode auto chooses, against no pipeline
    python bench/data_scale.py --make 20000 --size 224 --modes synthetic,auto --steps 30 --batch-size 32 \\
        --model resnet18 --pss --out bench/results/data-scale/imagefolder-224-20k.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import code_version, write_json

ROOT = Path(__file__).resolve().parents[1]


def make_folder(out: Path, count: int, size: int, source: str) -> Path:
    """``count`` JPEGs (quality 90) at ``size``x``size`` in ImageFolder layout: 90% train, 10% test, 10 classes,
    upscaled from the CIFAR-10 copy (``source`` a folder of it) or random noise (``source`` 'synthetic')."""
    import numpy as np
    from PIL import Image

    if (out / ".complete").exists():
        return out
    rng = np.random.default_rng(0)
    sources = []
    if source != "synthetic":
        sources = sorted(Path(source).glob("train/*/*.jpg"))
    for i in range(count):
        split = "test" if i % 10 == 9 else "train"
        label = (i // 10) % 10
        d = out / split / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        if sources:
            im = Image.open(sources[i % len(sources)]).convert("RGB").resize((size, size), Image.BICUBIC)
        else:
            im = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        im.save(d / f"{i:06d}.jpg", quality=90)
    (out / ".complete").touch()
    return out


def child(args) -> None:
    """One mode's training, in its own process; prints one JSON line."""
    import torch

    from hwsearch.config import RunConfig
    from hwsearch.learn import load_data
    from hwsearch.models import create_model
    from hwsearch.train import fit

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.mode == "synthetic":  # the same training on a few random images held in memory: no data pipeline
        from hwsearch.data import TensorData

        n, side = args.steps * args.batch_size, args.size
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        data = TensorData("synthetic", x, y, x[: args.batch_size], y[: args.batch_size], 10, (0.5,) * 3, (0.25,) * 3,
                          pad=max(1, side // 8), recipe="pad-crop" if side <= 64 else "resized-crop")
    else:
        cfg = RunConfig(dataset=args.data, data_mode=args.mode, batch_size=args.batch_size,
                        max_train=args.steps * args.batch_size, max_test=args.batch_size, image_size=args.size_in,
                        loader_workers=args.workers)
        data = load_data(cfg, torch.device("cpu"))
    load_s = time.perf_counter() - t0
    wait = [0.0]
    original = data.train_batches

    def timed(batch_size, generator):
        it = iter(original(batch_size, generator))
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            wait[0] += time.perf_counter() - t
            yield batch

    object.__setattr__(data, "train_batches", timed)  # TensorData is a frozen dataclass
    model = create_model(args.model, num_classes=data.num_classes, in_channels=data.input_shape[1])
    t1 = time.perf_counter()
    history = fit(model, data, epochs=1, lr=0.05, batch_size=args.batch_size, seed=0, log_every=10**9)
    train_s = time.perf_counter() - t1
    steps = history[-1]["step"]
    print(json.dumps({"mode": type(data).__name__, "asked": args.mode, "steps": steps, "load_s": load_s,
                      "train_s": train_s, "steps_per_s": steps / train_s,
                      "images_per_s": steps * args.batch_size / train_s, "data_wait_fraction": wait[0] / train_s,
                      "input_shape": list(data.input_shape)}), flush=True)


def peak_tree_memory(proc: subprocess.Popen, pss: bool) -> tuple[int, int, str]:
    """Wait for ``proc`` while sampling the memory of it and its descendants; return the peak summed RSS, the
    peak summed PSS and stdout. RSS counts a page shared by the DataLoader workers (forked from the main
    process: torch's libraries, the parent's heap) once per process; PSS splits each shared page among the
    processes that map it, so its sum is the tree's real footprint. Reading PSS (``/proc/PID/smaps``) costs
    CPU time on every sample: it is taken only with ``pss``, never in a speed measurement."""
    import psutil

    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [q for q in (p, *p.children(recursive=True)) if q.is_running()]
                peak["rss"] = max(peak["rss"], sum(q.memory_info().rss for q in tree))
                if pss:
                    peak["pss"] = max(peak["pss"], sum(q.memory_full_info().pss for q in tree))
            except psutil.Error:
                pass
            done.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    return peak["rss"], peak["pss"], out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="an imagefolder: dataset (default: the folder --make writes)")
    ap.add_argument("--make", type=int, help="generate an ImageFolder of this many JPEGs")
    ap.add_argument("--size", type=int, default=224, help="side of the generated images")
    ap.add_argument("--source", default="cifar", help="cifar (the shared CIFAR-10 copy, upscaled) or synthetic")
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "hwsearch-data-scale"))
    ap.add_argument("--modes", default="memory,stream", help="data modes to train with, in turn")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the training process")
    ap.add_argument("--workers", type=int, help="DataLoader workers in stream mode (default: hwsearch's)")
    ap.add_argument("--pss", action="store_true", help="also sample the tree's PSS (costs CPU: not for speed)")
    ap.add_argument("--out", required=False)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size_in = None
    if args.child:
        args.mode = args.child
        args.size_in = args.size if args.make else None
        child(args)
        return 0
    if args.make:
        source = args.source
        if source == "cifar":
            from hwsearch.data import imagefolder_root

            source = str(imagefolder_root(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz")[0])
        folder = make_folder(Path(args.folder) / f"{args.size}px-{args.make}", args.make, args.size, source)
        args.data = f"imagefolder:{folder}"
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--data", args.data, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--model", args.model, "--threads", str(args.threads),
               "--size", str(args.size)] + (["--make", str(args.make)] if args.make else []) + \
              (["--workers", str(args.workers)] if args.workers is not None else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        rss, pss, out = peak_tree_memory(proc, args.pss)
        if proc.returncode:
            raise SystemExit(f"{mode}: exit status {proc.returncode}")
        row = {**json.loads(out.strip().splitlines()[-1]), "peak_rss_gb": rss / 1e9,
               **({"peak_pss_gb": pss / 1e9} if args.pss else {})}
        rows.append(row)
        print(f"{mode:9s} -> {row['mode']:10s} {row['images_per_s']:8.1f} images/s  {row['steps_per_s']:.3f} steps/s  "
              f"data wait {100 * row['data_wait_fraction']:.1f}%  peak RSS {row['peak_rss_gb']:.2f} GB"
              + (f", PSS {row['peak_pss_gb']:.2f} GB" if args.pss else "") + f"  (load {row['load_s']:.0f} s)", flush=True)
    record = {"command": "python bench/data_scale.py " + " ".join(sys.argv[1:]), "code": code_version(),
              "data": args.data, "images": args.make, "size": args.size if args.make else None, "model": args.model,
              "batch_size": args.batch_size, "threads": args.threads, "cpus": os.cpu_count(), "rows": rows}
    speed = {m: [r["steps_per_s"] for r in rows if r["asked"] == m] for m in ("memory", "stream")}
    if all(speed.values()):  # modes repeated alternately (memory,stream,memory,stream): the means' ratio
        mean = {m: sum(v) / len(v) for m, v in speed.items()}
        record["stream_over_memory_steps_per_s"] = mean["stream"] / mean["memory"]
        print(f"stream / memory steps per second: {record['stream_over_memory_steps_per_s']:.3f} "
              f"(means over {len(speed['memory'])} and {len(speed['stream'])} runs)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
