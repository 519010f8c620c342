"""hsvkernels.data: the bundled digits split and image_folder on a tiny folder of PNGs."""
import pytest
import torch

from hsvkernels import data

pytest.importorskip("sklearn")


def test_digits_shapes_labels_and_split():
    train, test = data.digits(size=16)
    assert len(train) == 1437 and len(test) == 360
    x, y = train.tensors
    assert x.shape == (1437, 1, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    # Stratified: every class is in the test set in about its share (~36 each).
    counts = torch.bincount(test.tensors[1], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    # Normalised with the training split's statistics.
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_digits_deterministic_per_seed_and_three_channels():
    a, _ = data.digits(size=8, seed=1)
    b, _ = data.digits(size=8, seed=1)
    c, _ = data.digits(size=8, seed=2)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[1], c.tensors[1])
    rgb, _ = data.digits(size=8, seed=1, channels=3)
    assert rgb.tensors[0].shape[1] == 3
    assert torch.equal(rgb.tensors[0][:, 2], a.tensors[0][:, 0])


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        data.digits(channels=2)
    with pytest.raises(ValueError, match="size"):
        data.digits(size=4)


def _write_pngs(root, classes, per_class=2):
    from PIL import Image
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), (40 * k, 10 * i, 200)).save(root / name / ("%d.png" % i))


def test_image_folder_reads_classes_and_applies_transforms(tmp_path):
    pytest.importorskip("torchvision")
    _write_pngs(tmp_path, ["cat", "dog"])
    ds = data.image_folder(tmp_path, size=24)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    x, y = ds[3]
    assert x.shape == (3, 24, 24) and y == 1
    x_train, _ = data.image_folder(tmp_path, size=20, train=True)[0]
    assert x_train.shape == (3, 20, 20)


def test_image_folder_errors(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.image_folder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no class folders with images"):
        data.image_folder(tmp_path)
