import os

import pytest
import torch

from cost_models import profile
from hwsearch.data import load_dataset
from hwsearch.models import create_model, list_models, models


@pytest.mark.parametrize("name", models.names())
def test_every_registered_model_adapts_to_dataset_and_profiles(name):
    model = create_model(name, num_classes=7, in_channels=1).eval()
    size = 32
    out = model(torch.zeros(2, 1, size, size))
    assert out.shape == (2, 7)
    table = profile(model, (1, 1, size, size))
    assert table.macs > 0 and all(layer.name in dict(model.named_modules()) for layer in table.layers)


@pytest.mark.parametrize(("name", "params"), [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6)])
def test_cifar_resnets_have_published_sizes(name, params):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.02)


def test_resnet20_runs_on_8x8_digits():
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_torchvision_models_by_name_and_unknown_names():
    assert "efficientnet_b0" in list_models("efficientnet*")
    model = create_model("efficientnet_b0", num_classes=5, in_channels=1).eval()
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 5)
    with pytest.raises(KeyError, match="resnet20"):
        create_model("no_such_model")


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "mynet.py").write_text(
        "import torch.nn as nn\n"
        "def make(num_classes=10, in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def broken():\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("mynet:make", num_classes=3, in_channels=1)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 3)
    with pytest.raises(ValueError, match="factory failed.*boom"):
        create_model("mynet:broken")
    with pytest.raises(ValueError, match="no callable 'nothing'"):
        create_model("mynet:nothing")


def test_digits_dataset_and_device_augmentation():
    data = load_dataset("digits")
    assert data.x_train.dtype == torch.uint8 and data.x_train.shape[1:] == (1, 8, 8)
    assert len(data.y_train) + len(data.y_test) == 1797
    g = torch.Generator().manual_seed(0)
    batches = list(data.train_batches(128, g))
    assert len(batches) == len(data.y_train) // 128
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and xb.shape == (128, 1, 8, 8) and yb.shape == (128,)


def test_augmentation_crops_are_shifted_copies():
    data = load_dataset("digits")
    x = data.x_train[:16]
    out = data.augment(x, torch.Generator().manual_seed(1))
    pad = data.pad
    xp = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(16):  # every output equals some window of the padded input
        assert any(torch.equal(out[i], xp[i, :, dy:dy + 8, dx:dx + 8])
                   for dy in range(2 * pad + 1) for dx in range(2 * pad + 1))


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 10, 200 if cls == "a" else 0)).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.x_train.shape == (6, 3, 8, 8) and data.num_classes == 2
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="no such path"):
        load_dataset(f"imagefolder:{tmp_path}/missing")
    with pytest.raises(KeyError, match="digits"):
        load_dataset("mnist-ish")


def _load_in_process(spec: str, cache: str, queue) -> None:
    import os

    os.environ["HWSEARCH_CACHE"] = cache
    data = load_dataset(spec)
    queue.put((data.x_train.sum().item(), data.x_test.sum().item(), len(data.y_train)))


def _image_tree(tmp_path, per_class: int):
    """A tiny ImageFolder tree (train/ and test/, two classes of 8x8 JPEGs) and a .tar.gz of it."""
    import tarfile

    from PIL import Image

    root = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (i * 5, 10, 200 if cls == "a" else 0)).save(root / split / cls / f"{i}.jpg")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="tree")
    return root, archive


def test_concurrent_workers_unpack_and_decode_an_archive_once(tmp_path):
    import multiprocessing as mp

    _, archive = _image_tree(tmp_path, 40)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_process, args=(f"imagefolder:{archive}", str(tmp_path / "cache"), queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = {queue.get(timeout=5) for _ in procs}
    assert len(results) == 1 and next(iter(results))[2] == 80


def test_an_archive_copied_or_touched_keeps_its_dataset_name(tmp_path, monkeypatch):
    """The unpacked folder (and so the dataset's name, which keys FP32 checkpoints) follows the
    archive's bytes: a re-created copy with a new mtime is the same dataset; other bytes are not."""
    import shutil
    import tarfile

    monkeypatch.setenv("HWSEARCH_CACHE", str(tmp_path / "cache"))
    root, archive = _image_tree(tmp_path, 3)
    first = load_dataset(f"imagefolder:{archive}").name
    os.utime(archive, ns=(10**18, 10**18))  # same bytes, another mtime (as a fresh copy of the data gets)
    copy = tmp_path / "elsewhere" / "data.tar.gz"
    copy.parent.mkdir()
    shutil.copyfile(archive, copy)
    assert load_dataset(f"imagefolder:{archive}").name == first
    assert load_dataset(f"imagefolder:{copy}").name == first
    with tarfile.open(archive, "w:gz") as tar:  # other content
        tar.add(root / "train", arcname="tree/train")
        tar.add(root / "train", arcname="tree/test")
    assert load_dataset(f"imagefolder:{archive}").name != first


def test_mobilenet_v2_cifar_macs_equal_a_count_by_hand():
    """MACs of a conv = out_channels · (in_channels/groups) · k² · output pixels; every kind of block."""
    from hwsearch.profiling import profile_model

    table, _ = profile_model("mobilenet_v2_cifar", (1, 3, 32, 32))
    macs = {layer.name: layer.macs for layer in table.layers}

    def conv(cout, cin_per_group, k, side):
        return cout * cin_per_group * k * k * side * side

    expected = {
        "features.0.0": conv(32, 3, 3, 32),             # stem, stride 1
        "features.1.conv.0.0": conv(32, 1, 3, 32),      # t=1 block: depthwise 3x3 ...
        "features.1.conv.1": conv(16, 32, 1, 32),       # ... and the linear projection
        "features.2.conv.0.0": conv(96, 16, 1, 32),     # t=6 block at stride 1: pointwise expansion,
        "features.2.conv.1.0": conv(96, 1, 3, 32),      # depthwise,
        "features.2.conv.2": conv(24, 96, 1, 32),       # projection
        "features.4.conv.0.0": conv(144, 24, 1, 32),    # t=6 block at stride 2: expansion at 32x32,
        "features.4.conv.1.0": conv(144, 1, 3, 16),     # depthwise down to 16x16,
        "features.4.conv.2": conv(32, 144, 1, 16),      # projection at 16x16
        "features.18.0": conv(1280, 320, 1, 4),         # last pointwise conv
        "classifier.1": 1280 * 10,
    }
    assert {n: macs[n] for n in expected} == expected
    assert table.macs == 87_976_448
    depthwise = sum(m for n, m in macs.items() if n.endswith("conv.1.0") or n == "features.1.conv.0.0")
    assert 0.06 < depthwise / table.macs < 0.07
