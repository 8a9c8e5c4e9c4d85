"""
Files written so that a crash never leaves half of one: atomic writes and
sha256 (``atomic``), npz files streamed, verified and memory-mapped
(``npz``, also used by ``evaluations``). Imports nothing of the package.
"""
