"""Caches that change when their inputs change (FP32 checkpoints, decoded ImageFolders), and say so."""

import importlib
import logging
import sys

import pytest
import torch

from hwsearch.data import load_dataset
from hwsearch.models import create_model
from hwsearch.train import fp32_checkpoint, model_digest

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc({act}(self.conv(x)).mean((2, 3)))


def make(num_classes=10, in_channels=1):
    model = Net(num_classes, in_channels)
    {init}
    return model
'''


def _factory(tmp_path, monkeypatch, act="torch.relu", init="pass"):
    """Write netcache.py (as a user edits their factory) and build it by name, afresh."""
    (tmp_path / "netcache.py").write_text(NET.format(act=act, init=init))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("netcache", None)
    importlib.invalidate_caches()
    torch.manual_seed(0)
    return create_model("netcache:make", num_classes=10, in_channels=1)


def test_fp32_checkpoint_is_keyed_by_the_models_structure_and_initial_state(tmp_path, monkeypatch):
    data = load_dataset("digits").subset(256, 64)
    first = _factory(tmp_path, monkeypatch)
    assert model_digest(first) == model_digest(_factory(tmp_path, monkeypatch))  # same factory, same seed
    ck = fp32_checkpoint("netcache:make", first, data, epochs=1, seed=0)
    assert not ck["cached"]
    assert fp32_checkpoint("netcache:make", _factory(tmp_path, monkeypatch), data, epochs=1, seed=0)["cached"]
    # The factory now loads other initial weights: a checkpoint of its own, not the old one.
    zeroed = _factory(tmp_path, monkeypatch, init="torch.nn.init.zeros_(model.fc.weight)")
    ck2 = fp32_checkpoint("netcache:make", zeroed, data, epochs=1, seed=0)
    assert not ck2["cached"] and ck2["path"] != ck["path"]
    # Another forward with the same tensors and values: also its own.
    other = _factory(tmp_path, monkeypatch, act="torch.sigmoid")
    assert model_digest(other) != model_digest(first)
    assert not fp32_checkpoint("netcache:make", other, data, epochs=1, seed=0)["cached"]


def test_runs_of_several_seeds_from_one_fp32_seed_share_its_checkpoint(tmp_path, monkeypatch):
    """The initial weights are drawn with the FP32 seed (they are part of its checkpoint's key): --seed 1
    --fp32-seed 0 starts from the checkpoint --seed 0 trained, as the decisive benchmarks need."""
    from hwsearch.config import RunConfig
    from hwsearch.learn import build_model

    monkeypatch.setenv("HWSEARCH_CACHE", str(tmp_path))
    data = load_dataset("digits").subset(256, 64)
    first = build_model(RunConfig(seed=0, fp32_seed=0), data)[0]
    ck = fp32_checkpoint("resnet20", first, data, epochs=1, seed=0)
    again = build_model(RunConfig(seed=1, fp32_seed=0), data)[0]
    assert model_digest(again) == model_digest(build_model(RunConfig(seed=0), data)[0])
    assert fp32_checkpoint("resnet20", again, data, epochs=1, seed=0) == {**ck, "cached": True}
    # Without --fp32-seed each seed has a start of its own.
    assert model_digest(build_model(RunConfig(seed=1), data)[0]) != model_digest(first)


def _folder(root, per_class=3, classes=("a", "b")):
    from PIL import Image

    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (i * 40, 10, 200 if cls == "a" else 0)).save(root / split / cls / f"{i}.png")


def test_imagefolder_cache_follows_the_folders_content(tmp_path, caplog):
    _folder(tmp_path, per_class=4)
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert (len(data.y_train), len(data.y_test)) == (8, 8)
    for i in range(2):
        (tmp_path / "train" / "a" / f"{i}.png").unlink()
    (tmp_path / "test" / "b" / "3.png").unlink()
    with caplog.at_level(logging.INFO, logger="hwsearch"):
        again = load_dataset(f"imagefolder:{tmp_path}")
    assert (len(again.y_train), len(again.y_test)) == (6, 7)
    assert "changed since it was cached" in caplog.text
    assert again.content != data.content  # and so the FP32 checkpoints trained on it differ


def test_imagefolder_skips_files_that_are_not_images(tmp_path):
    _folder(tmp_path)
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0\1junk")
    (tmp_path / "train" / "b" / "Thumbs.db").write_bytes(b"junk")
    assert len(load_dataset(f"imagefolder:{tmp_path}").y_train) == 6


def test_imagefolder_whose_train_and_test_classes_differ_is_refused(tmp_path):
    _folder(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "test" / "b")
    with pytest.raises(ValueError, match=r"different classes \(only in train/: b\)"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_an_unreadable_image_is_named(tmp_path):
    _folder(tmp_path)
    bad = tmp_path / "test" / "a" / "9.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*9\.png"):
        load_dataset(f"imagefolder:{tmp_path}")
