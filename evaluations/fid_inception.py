"""
The FID Inception-v3 network in PyTorch.

This is the 2015-12-05 TensorFlow Inception graph (``classify_image_graph_def.pb``)
that FID is defined on and that guided-diffusion's evaluator runs, written as a
PyTorch module whose ``state_dict`` has exactly the names and shapes of
pytorch-fid's port of those weights, ``pt_inception-2015-12-05-6726825d.pth``.

How it differs from a stock Inception-v3 (as the TensorFlow graph does it):
  * the input is resized to 299x299 with TensorFlow 1's ``ResizeBilinear``
    (no half-pixel centres: source coordinate = destination * in / out), then
    scaled as ``(x - 128) / 128`` from 0..255 floats;
  * the average pools inside the mixed blocks do not count the zero padding;
  * the last mixed block (Mixed_7c) pools its fourth branch with a max pool;
  * the classifier has 1008 classes.

Outputs used by the evaluator:
  * ``pool`` (pool_3): the 2048 features after the final average pool;
  * ``spatial`` (mixed_6/conv): the first 7 channels of Mixed_6d's 1x1 branch
    (17x17, after its ReLU), flattened in TensorFlow's (h, w, c) order: 2023 values;
  * ``class_probabilities(pool)``: softmax over the 1008 logits, computed the
    way the published evaluator does, i.e. ``pool @ W`` *without* the bias.
"""

import hashlib
import os
import sys
import urllib.error
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from improved_diffusion.files.atomic import atomic_write

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub naming convention: the suffix is the start of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"

POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_CLASSES = 1008
INPUT_SIZE = 299


class EvaluationError(ValueError):
    """A problem with the user's input; the message reads 'problem; fix'."""


# ----------------------------------------------------------------------------
# Network


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 0.001, as the TF graph) -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_same(x):
    # TensorFlow's SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """mixed, mixed_1, mixed_2 (Mixed_5b/5c/5d): 35x35."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """mixed_3 (Mixed_6a): 35x35 -> 17x17."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """mixed_4 .. mixed_7 (Mixed_6b..6e): 17x17 with factorised 7x7 convolutions."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x, return_branch1x1=False):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_avg_pool_same(x))
        out = torch.cat([b1, b7, bd, bp], 1)
        if return_branch1x1:
            return out, b1
        return out


class InceptionD(nn.Module):
    """mixed_8 (Mixed_7a): 17x17 -> 8x8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """mixed_9, mixed_10 (Mixed_7b, Mixed_7c): 8x8 with split 1x3/3x1 outputs."""

    def __init__(self, in_channels, max_pool_branch):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool_branch:
            # The 2015 graph's last block max-pools here (unlike the paper).
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_same(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


def _tf1_resize_coords(in_size, out_size):
    """Source rows/cols and weights of TF1 ResizeBilinear (align_corners=False,
    half_pixel_centers=False), computed in float32 as TensorFlow does."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    lerp = (src - floor).astype(np.float32)
    return lower, upper, lerp


def tf1_resize_bilinear(x, out_h, out_w):
    """
    Resize NCHW float32 images like TensorFlow 1's ``tf.image.resize_bilinear``
    with ``align_corners=False`` (the op in the FID Inception graph):
    source coordinate = destination coordinate * in / out, no half-pixel centres;
    interpolated as ``top + (bottom - top) * y_lerp`` with
    ``top = top_left + (top_right - top_left) * x_lerp``.
    """
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x
    dev = x.device
    y0, y1, yl = (torch.from_numpy(a).to(dev) for a in _tf1_resize_coords(in_h, out_h))
    x0, x1, xl = (torch.from_numpy(a).to(dev) for a in _tf1_resize_coords(in_w, out_w))
    yl = yl.view(1, 1, out_h, 1)
    xl = xl.view(1, 1, 1, out_w)
    top = x.index_select(2, y0)
    bottom = x.index_select(2, y1)
    top_left, top_right = top.index_select(3, x0), top.index_select(3, x1)
    top = top_left + (top_right - top_left) * xl
    del top_left, top_right
    bottom_left, bottom_right = bottom.index_select(3, x0), bottom.index_select(3, x1)
    bottom = bottom_left + (bottom_right - bottom_left) * xl
    del bottom_left, bottom_right
    return top + (bottom - top) * yl


class FIDInceptionV3(nn.Module):
    """
    The FID Inception-v3. ``forward`` takes NHWC images with values 0..255
    (uint8 or float) of any size and returns ``(pool, spatial)``:
    ``pool`` [N, 2048] (pool_3) and ``spatial`` [N, 2023] (mixed_6/conv[..., :7]).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    @staticmethod
    def preprocess(images):
        """NHWC 0..255 -> NCHW, resized to 299x299 (TF1 bilinear), (x - 128) / 128."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        x = tf1_resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images):
        # channels_last runs the oneDNN convolutions ~25% faster on CPU; same values.
        x = self.preprocess(images).contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5b(x)
        x = self.Mixed_5c(x)
        x = self.Mixed_5d(x)
        x = self.Mixed_6a(x)
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x, branch1x1 = self.Mixed_6d(x, return_branch1x1=True)
        # TensorFlow flattens NHWC: (h, w, c) order, first 7 channels.
        spatial = branch1x1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        x = self.Mixed_6e(x)
        x = self.Mixed_7a(x)
        x = self.Mixed_7b(x)
        x = self.Mixed_7c(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool, spatial

    def class_probabilities(self, pool):
        """
        Softmax over the 1008 logits from pool_3 features. Like the published
        evaluator (which takes the weight input of ``softmax/logits/MatMul``),
        the logits are ``pool @ W`` without the classifier's bias.
        """
        return torch.softmax(pool.to(self.fc.weight.dtype) @ self.fc.weight.t(), dim=1)


# ----------------------------------------------------------------------------
# Weights


def load_fid_inception(path, device="cpu"):
    """Build the network and load pytorch-fid's weights file (strict layout check)."""
    fix = f"pass pytorch-fid's FID Inception weights {FID_WEIGHTS_FILENAME} ({FID_WEIGHTS_URL})"
    if not os.path.isfile(path):
        raise EvaluationError(f"Inception weights {path} not found; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling / zip / format errors all mean "not this file"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EvaluationError(
            f"cannot read Inception weights {path} ({type(exc).__name__}: {reason[:200]}); {fix}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise EvaluationError(f"{path} does not hold a state_dict of tensors; {fix}")

    model = FIDInceptionV3()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (want {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        if wrong:
            parts.append(f"{len(wrong)} of another shape, e.g. {wrong[0]}")
        raise EvaluationError(
            f"{path} is not in the layout of {FID_WEIGHTS_FILENAME} ({'; '.join(parts)}); {fix}"
        )
    not_float = [k for k, v in state.items() if not k.endswith("num_batches_tracked") and not v.is_floating_point()]
    if not_float:
        raise EvaluationError(f"{path}: {not_float[0]} is not a floating-point tensor; {fix}")
    model.load_state_dict(state, strict=True)
    model.eval()
    model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def default_cache_dir():
    """$XDG_CACHE_HOME/improved_diffusion_sag, else ~/.cache/improved_diffusion_sag."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "improved_diffusion_sag")


def download_file(url, dest, sha256_prefix=None, progress=True, timeout=60):
    """
    Download ``url`` to ``dest`` with a progress bar: written to a temporary
    name in the same folder, checked (size, sha256 prefix), then renamed
    atomically, so an interrupted download never leaves a partial ``dest``.
    """
    from tqdm.auto import tqdm

    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fix = f"download {url} by hand and pass --inception_path PATH"
    try:
        digest = hashlib.sha256()
        size = 0
        with atomic_write(dest, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"downloading {os.path.basename(dest)}",
                disable=not progress,
            ) as bar:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
            # Checked before the rename: a bad download never becomes `dest`.
            if total is not None and size != total:
                raise EvaluationError(f"download of {url} stopped after {size} of {total} bytes; {fix}")
            got = digest.hexdigest()
            if sha256_prefix and not got.startswith(sha256_prefix):
                raise EvaluationError(
                    f"{url} has sha256 {got[:16]}..., expected {sha256_prefix}...; {fix}"
                )
    except (urllib.error.URLError, OSError) as exc:
        raise EvaluationError(f"could not download {url} ({exc}); {fix}") from None
    return dest


def resolve_inception_weights(
    path=None,
    cache_dir=None,
    url=FID_WEIGHTS_URL,
    sha256_prefix=FID_WEIGHTS_SHA256_PREFIX,
    progress=True,
):
    """
    The weights file to use: ``path`` when given (never downloads); otherwise
    the cached copy in ``cache_dir`` (default :func:`default_cache_dir`), or
    pytorch-fid's copy in the torch hub cache, else downloaded once into the cache.
    """
    if path is not None:
        if not os.path.isfile(path):
            raise EvaluationError(
                f"--inception_path {path} does not exist; download {FID_WEIGHTS_URL} there"
            )
        return path
    use_hub = cache_dir is None
    cache_dir = cache_dir or default_cache_dir()
    dest = os.path.join(cache_dir, FID_WEIGHTS_FILENAME)
    if os.path.isfile(dest):
        return dest
    if use_hub:
        hub_copy = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILENAME)
        if os.path.isfile(hub_copy):
            return hub_copy
    print(f"downloading the FID Inception weights to {dest}", file=sys.stderr, flush=True)
    return download_file(url, dest, sha256_prefix=sha256_prefix, progress=progress)
