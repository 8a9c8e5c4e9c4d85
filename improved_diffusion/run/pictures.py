"""
Pictures written next to the samples: a grid of the first samples, and the
Self-Attention Guidance figures (mask and blurred prediction per step).

Everything works on uint8 NHWC arrays (the npz format); float tensors in
[-1, 1] go through :func:`to_pixels` first. PNGs are written atomically.
"""

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files.atomic import atomic_write

TEXT_HEIGHT = 14  # pixels of a caption line (Pillow's built-in font, no files needed)


def to_pixels(x):
    """
    A float batch in [-1, 1] (torch NCHW) as uint8 NHWC, with the samples'
    formula (``(x + 1) * 127.5``, clamped, truncated). Non-finite values
    show as black: these are pictures, not data.
    """
    import torch as th

    x = th.nan_to_num(x.detach().float().cpu(), nan=-1.0, posinf=1.0, neginf=-1.0)
    x = ((x + 1) * 127.5).clamp(0, 255).to(th.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def mask_to_pixels(mask):
    """A SAG mask (NCHW of 0/1) as uint8 NHWC: white where the blur applies."""
    import torch as th

    m = (mask.detach().float().cpu() > 0.5).to(th.uint8) * 255
    if m.shape[1] == 1:
        m = m.repeat(1, 3, 1, 1)
    return m[:, :3].permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images, ncols=None, pad=2, pad_value=255):
    """
    Tile uint8 images [N x H x W x 3] into one picture.

    :param ncols: images per row; default ceil(sqrt(N)).
    :param pad: pixels between (and around) the images.
    """
    images = np.asarray(images)
    assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8
    n, h, w, _ = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = max(1, math.ceil(n / ncols))
    grid = np.full(
        (pad + nrows * (h + pad), pad + ncols * (w + pad), 3), pad_value, dtype=np.uint8
    )
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_png(path, picture):
    """Write a uint8 HxWx3 array as PNG (temporary name, then rename)."""
    with atomic_write(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(picture)).save(f, format="PNG")
    return path


def save_grid(path, images, max_images=64, min_size=256):
    """
    A PNG grid of the first `max_images` images. Small images are enlarged
    (nearest neighbour) so that the grid is at least `min_size` pixels wide.
    """
    images = np.asarray(images[:max_images])
    grid = make_grid(images)
    scale = max(1, math.ceil(min_size / max(grid.shape[:2])))
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return save_png(path, grid)


def with_text(picture, left=None, top=None, left_width=0, title=None):
    """
    `picture` (uint8 HxWx3) with black text on white around it: `title` one
    line above everything, `top` a list of (x, text) captions on a line above
    the picture, `left` a list of (y, text) labels in a column of
    `left_width` pixels on its left.
    """
    font = ImageFont.load_default()
    h, w = picture.shape[:2]
    lines = (title is not None) + (top is not None)
    canvas = Image.new("RGB", (left_width + w, lines * TEXT_HEIGHT + h), "white")
    canvas.paste(Image.fromarray(np.ascontiguousarray(picture)), (left_width, lines * TEXT_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    y = 0
    if title is not None:
        draw.text((2, y + 1), title, fill="black", font=font)
        y += TEXT_HEIGHT
    for x, text in top or ():
        draw.text((left_width + x, y + 1), text, fill="black", font=font)
    for row_y, text in left or ():
        draw.text((2, lines * TEXT_HEIGHT + row_y), text, fill="black", font=font)
    return np.asarray(canvas)


def sag_figure(columns, scale=None, captions=None, title=None, pad=2):
    """
    One row per sample, one column per picture kind (e.g. final sample,
    x_0 prediction, SAG mask, blurred prediction), all uint8 NHWC of one size;
    `captions` name the columns on a line above them, `title` goes on top.
    """
    n = columns[0].shape[0]
    tiles = np.stack([col[i] for i in range(n) for col in columns])
    grid = make_grid(tiles, ncols=len(columns), pad=pad)
    if scale is None:
        scale = max(1, 128 // columns[0].shape[1])
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    if captions is None and title is None:
        return grid
    col_width = (columns[0].shape[2] + pad) * scale
    top = None if captions is None else [(i * col_width + pad * scale, c) for i, c in enumerate(captions)]
    return with_text(grid, top=top, title=title)


def class_rows(images, labels, class_names, per_class=8, scale=3, pad=2, label_width=70,
               more=(), captions=None):
    """
    One row per class: the first `per_class` samples drawn with that label
    (blank where there are fewer), the class name on the left.

    :param more: other image sets of the same positions (e.g. the same seeds
        drawn without SAG), each shown as a block of the same samples to the
        right, after one blank column.
    :param captions: one caption per block, on a line above it.
    """
    sets = [np.asarray(images)] + [np.asarray(m) for m in more]
    labels = np.asarray(labels)
    h, w = sets[0].shape[1:3]
    blank = np.full((h, w, 3), 255, dtype=np.uint8)
    tiles = []
    for c in range(len(class_names)):
        picks = np.flatnonzero(labels == c)[:per_class]
        for k, block in enumerate(sets):
            tiles += [blank] * (k > 0)  # the gap between blocks
            tiles += list(block[picks]) + [blank] * (per_class - len(picks))
    block_cols = per_class + 1  # a block and the gap after it
    grid = make_grid(np.stack(tiles), ncols=len(sets) * block_cols - 1, pad=pad)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    row, col = (h + pad) * scale, (w + pad) * scale
    left = [(pad * scale + r * row + row // 2 - TEXT_HEIGHT // 2, name)
            for r, name in enumerate(class_names)]
    top = None if captions is None else [(pad * scale + k * block_cols * col, text)
                                         for k, text in enumerate(captions)]
    return with_text(grid, left=left, top=top, left_width=label_width)


class AttentionMaskRecorder:
    """
    Keeps, for a few guided steps of one batch, the first pass's x_0
    prediction, the SAG mask and the blurred prediction (the sampler's step
    'sag_xstart', 'sag_mask', 'sag_degraded_xstart': no extra model calls),
    then writes one PNG per step with the final sample beside them.

    :param out_dir: where ``step_XXXX.png`` files go.
    :param guided: the indices (counting down) of the guided evaluations.
    :param max_steps: how many of them to keep (evenly spread).
    :param max_samples: rows per picture.
    :param timestep_map: index -> model timestep, for the file names.
    """

    # The columns: the final sample, the x_0 prediction of that step, the SAG
    # mask (white: where the blur applies), the blurred prediction.
    CAPTIONS = ("final", "x0 pred", "mask", "blurred")

    def __init__(self, out_dir, guided, max_steps=4, max_samples=8, timestep_map=None):
        self.out_dir = out_dir
        guided = sorted(guided, reverse=True)
        if len(guided) > max_steps:
            picks = [guided[round(j * (len(guided) - 1) / (max_steps - 1))] for j in range(max_steps)]
            guided = sorted(set(picks), reverse=True)
        self.steps = guided
        self.max_samples = max_samples
        self.timestep_map = timestep_map
        self.kept = {}

    def __call__(self, index, out):
        if index in self.steps and "sag_mask" in out:
            k = self.max_samples
            self.kept[index] = (
                to_pixels(out["sag_xstart"][:k]),
                mask_to_pixels(out["sag_mask"][:k]),
                to_pixels(out["sag_degraded_xstart"][:k]),
            )

    def batch_done(self, final_images):
        """Write the pictures (see :meth:`save`); returns a line for the log."""
        saved = self.save(final_images)
        if not saved:
            return "--save_attention_masks: no guided step in this run, no pictures"
        return f"saved SAG pictures of {len(saved)} steps in {self.out_dir}"

    def save(self, final_images):
        """Write the pictures; `final_images` is the batch's uint8 NHWC result."""
        if not self.kept:
            return []
        os.makedirs(self.out_dir, exist_ok=True)
        paths = []
        for index in sorted(self.kept, reverse=True):
            pred, mask, blurred = self.kept[index]
            final = np.asarray(final_images[: pred.shape[0]])
            name = f"step_{index:04d}"
            title = f"sampling step {index} (counting down)"
            if self.timestep_map is not None:
                name += f"_t{int(self.timestep_map[index]):04d}"
                title += f", model timestep {int(self.timestep_map[index])}"
            path = os.path.join(self.out_dir, name + ".png")
            figure = sag_figure([final, pred, mask, blurred], captions=self.CAPTIONS, title=title)
            paths.append(save_png(path, figure))
        return paths
