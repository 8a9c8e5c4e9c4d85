"""
Convert Fashion-MNIST idx files to a directory of 32x32 RGB PNGs for training.

Each 28x28 grayscale image is padded by 2 px of black (value 0) on every side
to 32x32 (no resampling, so the garment keeps its native pixels) and the gray
channel is replicated to 3 channels.

Files are named ``{label:02d}-{classname}_{index:05d}.png``, e.g.
``03-dress_00012.png``.  The training code (image_datasets.py) takes the
prefix before the first ``_`` as the class and numbers the *sorted* prefixes;
the two-digit label prefix makes that sorted order equal to the Fashion-MNIST
label order 0..9.  ``index`` is the image's position in the split.

The output directory is written atomically: everything goes to a temporary
sibling directory that is renamed to --out_dir at the end.

    python scripts/fashion_mnist_to_images.py --split train --out_dir data/fashion_train
"""

import argparse
import os
import shutil
import sys
import tempfile

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from evaluations.fashion_mnist import (  # noqa: E402
    DEFAULT_SOURCE_DIR,
    FashionMNISTMissingError,
    class_prefix,
    load_fashion_mnist,
    to_rgb32,
)


def image_filename(label, index):
    return "%s_%05d.png" % (class_prefix(label), index)


def convert(split, out_dir, source_dir=DEFAULT_SOURCE_DIR, limit=None, overwrite=False):
    """Write the PNGs; returns the number of images written."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(
            "%s exists and is not empty; pass --overwrite to replace it" % out_dir
        )
    images, labels = load_fashion_mnist(split, source_dir=source_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    rgb = to_rgb32(images)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".%s.tmp-" % os.path.basename(out_dir), dir=parent)
    try:
        for i, (img, label) in enumerate(zip(rgb, labels)):
            Image.fromarray(img).save(os.path.join(tmp, image_filename(label, i)))
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".%s.old-" % os.path.basename(out_dir), dir=parent)
            os.rename(out_dir, os.path.join(old, "d"))
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(rgb)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=["train", "test"], required=True)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--source_dir", default=DEFAULT_SOURCE_DIR)
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = p.parse_args(argv)
    try:
        n = convert(args.split, args.out_dir, args.source_dir, args.limit, args.overwrite)
    except (FashionMNISTMissingError, FileExistsError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    print("wrote %d images to %s" % (n, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
