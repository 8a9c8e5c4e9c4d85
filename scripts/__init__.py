"""
The command-line programs. Each is run as ``python scripts/NAME.py`` (or
under ``mpiexec``) and is a thin layer over the package: its flags, a
``main(argv)``, and what it asks the package to do.

The folder is importable as ``scripts`` from the repository root so that the
tests, the demo and the top-level entry points (``image_sample.py``,
``classifier_sample.py``) call a program's ``main`` by importing it, never by
its file path. The programs themselves import the package, not each other
(the demo, which runs ``image_sample``'s main in its own process, aside).
"""
