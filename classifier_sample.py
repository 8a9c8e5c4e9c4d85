"""
Entry point kept at the top level so the seed's commands work as written
(`mpiexec -n 8 python classifier_sample.py ...`); the script itself is scripts/classifier_sample.py.
"""

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "classifier_sample.py"),
        run_name="__main__",
    )
