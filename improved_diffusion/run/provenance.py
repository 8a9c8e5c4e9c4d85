"""
What made a run's samples, for its config.json: package versions and the
repository's commit.
"""

import os
import platform

import numpy as np
import torch as th


def package_versions():
    """Versions of what made the samples, for config.json."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "torch": th.__version__, "numpy": np.__version__}
    for dist_name, key in (("improved-diffusion-sag", "improved_diffusion"), ("mpi4py", "mpi4py"),
                           ("tqdm", "tqdm"), ("Pillow", "Pillow"), ("blobfile", "blobfile")):
        try:
            versions[key] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            versions[key] = None
    versions["git_commit"] = _git_commit()
    return versions


def _git_commit():
    """The repository's HEAD commit (None outside a git checkout or without git)."""
    import subprocess

    root = os.path.dirname(os.path.abspath(__file__))  # inside the checkout, if it is one
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None
