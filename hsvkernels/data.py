"""Small real data sets for the demo and for fine-tuning: digits() and image_folder().

digits() needs no download: scikit-learn ships the 1,797 8x8 handwritten digits
(UCI optdigits test set), so the demo runs offline and fast. image_folder()
reads a user's own ImageNet/CIFAR-style class-per-folder tree.
"""
import os

import torch
from torch.utils.data import TensorDataset

# ImageNet statistics: what torchvision's pretrained models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def digits(size=32, seed=0, *, channels=1, test_size=360):
    """scikit-learn's digits as (train, test) TensorDatasets of (image, label).

    Images are upsampled bilinearly from 8x8 to size x size so that 3x3 conv
    stacks have room to work, and have `channels` channels: 1 (default; the
    images are grey) or 3 (the grey plane repeated, for models that expect RGB).
    They are normalised with the training split's mean and std. The split is
    stratified and fixed by `seed`: 1,437 train / 360 test images by default.
    Labels are int64 in 0..9.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("hsvkernels.data.digits needs scikit-learn: pip install scikit-learn") from exc
    if channels not in (1, 3):
        raise ValueError("channels must be 1 or 3, got %r" % (channels,))
    if size < 8:
        raise ValueError("size must be at least 8 (the images are 8x8), got %r" % (size,))
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(bunch.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=test_size, random_state=seed, stratify=y.numpy())
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    # Statistics from the training split only, so the test set stays unseen.
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def image_folder(root, size=224, *, train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A torchvision ImageFolder over root/<class>/<image> with the standard transforms.

    train=False: resize the short side to size * 8/7 (256 for 224), centre-crop size.
    train=True: random resized crop to size and horizontal flips (augmentation).
    Both convert to tensors normalised with mean/std (ImageNet's by default).
    Raises FileNotFoundError if root is missing and ValueError if it holds no
    class folder with images.
    """
    from torchvision import datasets, transforms

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError("image folder %r does not exist or is not a directory" % root)
    classes = [d.name for d in os.scandir(root) if d.is_dir() and _has_image(d.path)]
    if not classes:
        raise ValueError("image folder %r has no class folders with images; expected root/<class>/<image>.png "
                         "(extensions: %s)" % (root, ", ".join(IMAGE_EXTENSIONS)))
    if train:
        resize = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        resize = [transforms.Resize(round(size * 8 / 7)), transforms.CenterCrop(size)]
    transform = transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(mean, std)])
    # ImageFolder loads with PIL in RGB mode, so grey or RGBA files also give 3 channels.
    return datasets.ImageFolder(root, transform=transform, allow_empty=True)


def _has_image(folder):
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False
