"""
The sampling run on disk: a log directory that survives crashes and resumes.

- ``sample_run``: ``sample_to_npz``, the run (log directory, resume,
  assembly, config.json).
- ``shards``: batch planning, the flags' fingerprint, shard files.
- ``heartbeat``: progress reports between ranks.
- ``pictures``: the PNG grid and the SAG-mask pictures.

May import: ``files``, ``checkpoints``, ``cli``, ``errors``, ``dist_util``,
``logger``, ``allocator``; never ``sampling`` or ``guidance`` (a run is told
how to draw a batch by the script that starts it).
"""
