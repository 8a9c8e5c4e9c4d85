"""
Fashion-MNIST loading helpers (numpy only).

Reads the original idx files (``train-images-idx3-ubyte[.gz]`` etc.) as shipped
by Debian's ``dataset-fashion-mnist`` package under
``/usr/share/datasets/fashion-mnist`` and turns them into the 32x32 RGB form
used by the diffusion model and by ``evaluations/fashion_metrics.py``:
the 28x28 grayscale digits are padded by 2 px of black (0) on each side and the
gray channel is replicated to 3 channels.
"""

import gzip
import os

import numpy as np

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"

# Fashion-MNIST label order (label i -> CLASS_NAMES[i]); file-name safe, no "_".
CLASS_NAMES = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)

_PREFIX = {"train": "train", "test": "t10k"}


class FashionMNISTMissingError(FileNotFoundError):
    pass


def class_prefix(label):
    """File-name class prefix, e.g. 3 -> '03-dress'; sorted prefixes == label order."""
    return "%02d-%s" % (int(label), CLASS_NAMES[int(label)])


def _find(source_dir, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            return path
    raise FashionMNISTMissingError(
        "Fashion-MNIST file %s[.gz] not found in %s; run `make fashion-data` "
        "(or `apt-get install dataset-fashion-mnist`) or pass --source_dir"
        % (stem, source_dir)
    )


def read_idx(path):
    """Read an idx file (raw or gzipped) into a numpy array (uint8 data only)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("%s: not an idx file (bad magic)" % path)
    if data[2] != 0x08:
        raise ValueError("%s: only unsigned-byte idx files are supported" % path)
    ndim = data[3]
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 0
    if len(data) - offset != count:
        raise ValueError(
            "%s: expected %d data bytes for shape %s, got %d"
            % (path, count, shape, len(data) - offset)
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()


def load_fashion_mnist(split, source_dir=DEFAULT_SOURCE_DIR):
    """
    Return (images uint8 [N, 28, 28], labels int64 [N]) for split 'train' or 'test'.

    Raises FashionMNISTMissingError (a FileNotFoundError) with a one-line fix
    hint if the idx files are missing.
    """
    if split not in _PREFIX:
        raise ValueError("split must be 'train' or 'test', got %r" % (split,))
    p = _PREFIX[split]
    images = read_idx(_find(source_dir, "%s-images-idx3-ubyte" % p))
    labels = read_idx(_find(source_dir, "%s-labels-idx1-ubyte" % p))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            "inconsistent idx files in %s: images %s, labels %s"
            % (source_dir, images.shape, labels.shape)
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError("label out of range in %s" % source_dir)
    return images, labels.astype(np.int64)


def to_rgb32(images):
    """uint8 [N, 28, 28] -> uint8 [N, 32, 32, 3]: 2 px black padding, gray to RGB."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim != 3:
        raise ValueError("expected [N, H, W] grayscale images, got %s" % (images.shape,))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)), mode="constant", constant_values=0)
    return np.repeat(padded[..., None], 3, axis=-1)
