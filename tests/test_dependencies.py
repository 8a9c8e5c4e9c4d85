"""
Everything the package, the evaluations and the scripts import installs
through setup.py's install_requires (what `make demo`'s venv has), except
imports guarded by ``except ImportError`` (optional extras such as
matplotlib). Read from the source with ast, not by importing it: the test
venv has the test extras, which would hide a missing runtime requirement
(as scipy once was: `make demo` from a fresh clone failed at its scores).
"""

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Distribution name in install_requires -> the module it provides.
MODULE_OF = {"Pillow": "PIL"}
PROJECT = {"improved_diffusion", "evaluations", "scripts", "conftest", "image_sample", "classifier_sample"}
SOURCES = ("improved_diffusion", "evaluations", "scripts", "image_sample.py", "classifier_sample.py")


def install_requires():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            names = [re.split(r"[<>=!~ \[]", elt.value)[0] for elt in node.value.elts]
            return {MODULE_OF.get(n, n) for n in names}
    raise AssertionError("setup.py has no install_requires")


def python_files():
    for entry in SOURCES:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
        for root, _, files in os.walk(path):
            yield from (os.path.join(root, f) for f in files if f.endswith(".py"))


def _guarded(node, parents):
    """Whether an import sits in a try whose handlers catch ImportError."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            for handler in parent.handlers:
                names = ast.dump(handler.type) if handler.type is not None else "bare"
                if "ImportError" in names or "ModuleNotFoundError" in names or names == "bare":
                    return True
        node = parent
    return False


def required_imports(path):
    """Top-level module names imported by `path` outside ImportError guards."""
    tree = ast.parse(open(path).read(), path)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if not _guarded(node, parents):
            found.update(n.split(".")[0] for n in names)
    return found


def test_every_required_import_is_installed_by_setup_py():
    allowed = install_requires() | PROJECT | set(sys.stdlib_module_names)
    missing = {}
    for path in python_files():
        for name in required_imports(path) - allowed:
            missing.setdefault(name, []).append(os.path.relpath(path, ROOT))
    assert not missing, f"imports that install_requires does not provide: {missing}"


def test_the_scan_sees_guards_and_plain_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import numpy\nfrom scipy import linalg\ntry:\n    import matplotlib\n"
                      "except ImportError:\n    matplotlib = None\n"
                      "def f():\n    import yaml\n")
    assert required_imports(str(source)) == {"numpy", "scipy", "yaml"}
    assert {"torch", "numpy", "PIL", "scipy", "tqdm"} <= install_requires()
