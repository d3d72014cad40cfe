"""ImageFolder sets as users have them, held in memory or streamed from disk per batch."""

import json
import logging

import pytest
import torch

from hwsearch.cli import main
from hwsearch.config import RunConfig
from hwsearch.learn import load_data


def _folder(root, sizes=((12, 12),), gray=False, per_class=6):
    """Two classes told apart by brightness; image sizes cycle through ``sizes``."""
    from PIL import Image

    for split in ("train", "test"):
        for c, cls in enumerate(("dark", "light")):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = sizes[i % len(sizes)]
                value = 40 + 150 * c + 5 * i
                im = Image.new("L", size, value) if gray else Image.new("RGB", size, (value, 255 - value, i * 20))
                im.save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_both_modes_read_the_same_images_in_the_same_shape(tmp_path, mode):
    root = _folder(tmp_path)
    data = load_data(RunConfig(dataset=f"imagefolder:{root}", data_mode=mode, batch_size=4, loader_workers=1),
                     torch.device("cpu"))
    assert data.input_shape == (1, 3, 12, 12) and data.num_classes == 2
    assert data.steps_per_epoch(4) == 3
    xs = list(data.train_batches(4, torch.Generator().manual_seed(0)))
    assert len(xs) == 3 and all(x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 for x, _ in xs)
    assert sorted(torch.cat([y for _, y in xs]).tolist()) == [0] * 6 + [1] * 6


def test_a_stream_run_trains_evaluates_and_applies(tmp_path, capsys):
    root = _folder(tmp_path, per_class=8)
    out = tmp_path / "run"
    args = ["--dataset", f"imagefolder:{root}", "--data-mode", "stream", "--loader-workers", "1",
            "--batch-size", "8", "--fp32-epochs", "2", "--epochs", "1", "--quiet"]
    assert main(["run", "--bits", "4", "--out", str(out), *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["top1"] <= 1
    plan = json.loads((out / "plan.json").read_text())
    assert plan["provenance"]["hyperparameters"]["data_mode"] == "stream"
    capsys.readouterr()
    assert main(["apply", str(out / "plan.json"), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["top1"] == metrics["top1"]


def test_auto_streams_a_set_larger_than_the_memory_limit_and_says_so(tmp_path, monkeypatch, caplog):
    root = _folder(tmp_path)
    monkeypatch.setenv("HWSEARCH_MEMORY_LIMIT", "1KB")
    with caplog.at_level(logging.INFO, logger="hwsearch"):
        data = load_data(RunConfig(dataset=f"imagefolder:{root}", batch_size=4), torch.device("cpu"))
    assert type(data).__name__ == "StreamData"
    assert "stream mode (decoded 0.00 GB exceeds the memory limit 0.00 GB)" in caplog.text
    monkeypatch.setenv("HWSEARCH_MEMORY_LIMIT", "1GB")
    with caplog.at_level(logging.INFO, logger="hwsearch"):
        assert type(load_data(RunConfig(dataset=f"imagefolder:{root}"), torch.device("cpu"))).__name__ == "TensorData"
    assert "memory mode (decoded" in caplog.text


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_images_of_different_sizes_are_resized_and_grayscale_stays_one_channel(tmp_path, mode):
    root = _folder(tmp_path, sizes=((12, 12), (20, 16), (9, 14)), gray=True)
    data = load_data(RunConfig(dataset=f"imagefolder:{root}", data_mode=mode, image_size=10, batch_size=4,
                               loader_workers=1), torch.device("cpu"))
    assert data.input_shape == (1, 1, 10, 10)
    x, _ = next(iter(data.test_batches(4)))
    assert x.shape[1:] == (1, 10, 10)


def test_large_images_train_with_random_resized_crops_on_the_device(tmp_path):
    from hwsearch.tensors import resized_crop

    root = _folder(tmp_path, sizes=((80, 80),), per_class=2)
    data = load_data(RunConfig(dataset=f"imagefolder:{root}", data_mode="memory"), torch.device("cpu"))
    assert data.recipe == "resized-crop"
    x = torch.arange(2 * 3 * 80 * 80, dtype=torch.float32).reshape(2, 3, 80, 80).remainder(256).to(torch.uint8)
    out = resized_crop(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)


def test_no_flip_turns_flips_off(tmp_path):
    root = _folder(tmp_path)
    assert load_data(RunConfig(dataset=f"imagefolder:{root}", data_mode="memory"), torch.device("cpu")).flip
    assert not load_data(RunConfig(dataset=f"imagefolder:{root}", data_mode="memory", flip=False),
                         torch.device("cpu")).flip


def test_streaming_a_set_that_cannot_stream_is_refused(tmp_path, capsys):
    assert main(["run", "--data-mode", "stream", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data-mode stream: 'digits' cannot stream" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_both_modes_take_the_same_fixed_subset(tmp_path):
    root = _folder(tmp_path, per_class=8)
    picked = {}
    for mode in ("memory", "stream"):
        data = load_data(RunConfig(dataset=f"imagefolder:{root}", data_mode=mode, max_train=5, max_test=3,
                                   batch_size=5, loader_workers=0), torch.device("cpu"))
        (x, y), = list(data.train_batches(5, torch.Generator().manual_seed(0)))
        test = torch.cat([t for _, t in data.test_batches(10)])
        picked[mode] = (sorted(y.tolist()), test.tolist())
    assert picked["memory"] == picked["stream"]


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_load_lists_the_folder_once(tmp_path, monkeypatch, mode):
    """Listing a split walks its whole tree (a million files on ImageNet): deciding the mode, surveying,
    the content key and decoding all read the one listing the load made."""
    import hwsearch.data as data_module

    root = _folder(tmp_path)
    walked = []
    real = data_module._image_files
    monkeypatch.setattr(data_module, "_image_files", lambda split_dir, classes: walked.append(split_dir.name)
                        or real(split_dir, classes))
    load_data(RunConfig(dataset=f"imagefolder:{root}", data_mode=mode, batch_size=4, loader_workers=1),
              torch.device("cpu"))
    assert sorted(walked) == ["test", "train"]


def test_an_archive_nested_in_folders_is_found_at_its_shallowest_train_and_test(tmp_path):
    import tarfile

    from hwsearch.data import imagefolder_root

    _folder(tmp_path / "src" / "outer" / "cifar")
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "outer", arcname="outer")
    root, classes = imagefolder_root(archive)
    assert root.name == "cifar" and classes == ["dark", "light"]
