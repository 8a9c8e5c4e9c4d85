"""
Checkpoints: what a ``.pt`` file holds and which flags it needs.

- ``loading``: safe loading and the one-line diagnosis of flags that do not
  fit the file.
- ``model_card``: the flags file beside a checkpoint (``name.json``).
- ``published``: the names and shapes of the published checkpoints.

May import: ``script_util`` (to build models), ``files``, ``errors``,
``dist_util``.
"""
