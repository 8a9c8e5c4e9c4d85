"""
Image folder dataset: an infinite generator of (NCHW images in [-1, 1], kwargs).
"""

import math
import random

import blobfile as bf
import numpy as np
import torch as th
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import dist_util

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp")


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    in_memory=False,
    seed=None,
    start_batch=0,
):
    """
    For a dataset, create a generator over (images, kwargs) pairs.

    Each images is an NCHW float tensor, and the kwargs dict contains zero or
    more keys, each of which map to a batched Tensor of their own.
    The kwargs dict can be used for class labels, in which case the key is "y"
    and the values are integer tensors of class labels.

    The files are sharded across ranks (see dist_util.get_rank()).

    :param data_dir: a dataset directory (searched recursively).
    :param batch_size: the batch size of each returned pair.
    :param image_size: the size to which images are resized.
    :param class_cond: if True, include a "y" key in returned dicts for class
                       label: the file name's part before the first "_";
                       sorted class names map to 0, 1, ...
    :param deterministic: if True, yield results in a deterministic order.
    :param random_crop: if True, randomly crop the images for augmentation.
    :param random_flip: if True, randomly flip the images for augmentation.
    :param in_memory: if True, decode this rank's images once into one uint8
        array and draw batches from it in this process (no loader worker,
        no per-step decoding); for datasets that fit in memory. Not with
        random_crop.
    :param seed, start_batch: in_memory only: with a seed, the order and
        flips of epoch e come from (seed, rank, e), so batch k is the same
        whenever it is drawn, and the generator starts at batch
        `start_batch` (the steps a resumed run has already taken).
    """
    if not data_dir:
        raise ValueError("unspecified data directory")
    all_files = _list_image_files_recursively(data_dir)
    if not all_files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {data_dir}")
    classes = None
    if class_cond:
        # Classes are the first part of the file name, before an underscore.
        class_names = [bf.basename(path).split("_")[0] for path in all_files]
        sorted_classes = {x: i for i, x in enumerate(sorted(set(class_names)))}
        classes = [sorted_classes[x] for x in class_names]
    dataset = ImageDataset(
        image_size,
        all_files,
        classes=classes,
        shard=dist_util.get_rank(),
        num_shards=dist_util.get_world_size(),
        random_crop=random_crop,
        random_flip=random_flip,
    )
    if len(dataset) < batch_size:
        # drop_last=True would otherwise make the generator spin forever.
        raise ValueError(
            f"this rank's shard has {len(dataset)} images, fewer than "
            f"batch_size={batch_size} (data_dir={data_dir})"
        )
    if in_memory:
        if random_crop:
            raise ValueError("in_memory data decodes each image once; it cannot take random_crop")
        yield from _in_memory_batches(
            dataset, batch_size, deterministic, random_flip,
            seed=seed, rank=dist_util.get_rank(), start_batch=start_batch,
        )
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not deterministic,
        num_workers=1,
        drop_last=True,
    )
    while True:
        yield from loader


def first_images(data_dir, n, image_size, class_cond=False):
    """
    The first `n` images of `data_dir` in file order, unflipped, as one
    (images, kwargs) batch like :func:`load_data`'s: fixed inputs for probes.
    """
    return next(load_data(data_dir=data_dir, batch_size=n, image_size=image_size,
                          class_cond=class_cond, deterministic=True, random_flip=False))


def _in_memory_batches(dataset, batch_size, deterministic, random_flip, seed=None, rank=0,
                       start_batch=0):
    """Endless (NCHW float batch in [-1, 1], kwargs) from the decoded dataset, epoch by epoch."""
    images = np.stack([dataset.decode(i) for i in range(len(dataset))])  # N, H, W, C uint8
    images = th.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    labels = None
    if dataset.local_classes is not None:
        labels = th.tensor(dataset.local_classes, dtype=th.int64)
    per_epoch = len(images) // batch_size
    unseeded = th.Generator()
    unseeded.seed()
    epoch, first = divmod(start_batch, per_epoch)
    while True:
        if seed is None:
            generator = unseeded
        else:
            key = np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0]
            generator = th.Generator().manual_seed(int(key))
        order = (th.arange(len(images)) if deterministic
                 else th.randperm(len(images), generator=generator))
        flips = th.rand(len(images), generator=generator) < 0.5
        for b in range(first, per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            batch = images[idx].float() / 127.5 - 1
            if random_flip:
                flip = flips[b * batch_size : (b + 1) * batch_size]
                batch[flip] = batch[flip].flip(-1)
            yield batch, ({} if labels is None else {"y": labels[idx]})
        epoch, first = epoch + 1, 0


def _list_image_files_recursively(data_dir):
    results = []
    for entry in sorted(bf.listdir(data_dir)):
        full_path = bf.join(data_dir, entry)
        ext = entry.split(".")[-1]
        if "." in entry and ext.lower() in IMAGE_EXTENSIONS:
            results.append(full_path)
        elif bf.isdir(full_path):
            results.extend(_list_image_files_recursively(full_path))
    return results


class ImageDataset(Dataset):
    def __init__(
        self,
        resolution,
        image_paths,
        classes=None,
        shard=0,
        num_shards=1,
        random_crop=False,
        random_flip=True,
    ):
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def decode(self, idx):
        """Image `idx` as an H x W x 3 uint8 array, centre-cropped to the resolution."""
        return center_crop_arr(self._open(idx), self.resolution)

    def _open(self, idx):
        with bf.BlobFile(self.local_images[idx], "rb") as f:
            pil_image = Image.open(f)
            pil_image.load()
        return pil_image.convert("RGB")

    def __getitem__(self, idx):
        pil_image = self._open(idx)
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution)
        else:
            arr = center_crop_arr(pil_image, self.resolution)

        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]

        arr = arr.astype(np.float32) / 127.5 - 1

        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.ascontiguousarray(np.transpose(arr, [2, 0, 1])), out_dict


def _downsample_box(pil_image, target_min_side):
    # BOX-downsample by powers of two first (like PIL's `reducing_gap`),
    # then the final resize is BICUBIC: better quality for large images.
    while min(*pil_image.size) >= 2 * target_min_side:
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size), resample=Image.BOX
        )
    scale = target_min_side / min(*pil_image.size)
    return pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )


def center_crop_arr(pil_image, image_size):
    arr = np.array(_downsample_box(pil_image, image_size))
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = random.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)

    arr = np.array(_downsample_box(pil_image, smaller_dim_size))
    crop_y = random.randrange(arr.shape[0] - image_size + 1)
    crop_x = random.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]
