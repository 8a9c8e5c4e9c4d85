"""
Sampling: noise to images through the guided denoiser.

- ``samplers``: ancestral (DDPM), DDIM and DPM-Solver++ as functions over the
  denoiser, and ``Sampler``, the one the flags choose.
- ``dpm_solver``: DPM-Solver++'s schedule and multistep updates, as the
  official code computes them.
- ``random_util``: ``BatchGenerator``, one seeded generator per position.
- ``drawer``: ``BatchDrawer`` and ``make_drawer``: one seeded batch from the
  flags, cast to uint8.

May import: ``guidance``, the diffusion maths, ``errors`` and
``run.pictures`` (the SAG pictures callback); nothing of the run on disk.
"""
