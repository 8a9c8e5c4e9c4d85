"""
The package's shape: upstream module paths import, the fork's subpackages
import only what their docstrings allow, no import cycle, no script loaded
by its file path, no module of the fork's own over 500 lines.

The import graph is read from the source (``ast``), so a cycle hidden in a
function-level import counts too.
"""

import ast
import importlib
import os
import re


from conftest import ROOT

PACKAGE = os.path.join(ROOT, "improved_diffusion")
# Module paths that code written for guided-diffusion / improved-diffusion imports.
UPSTREAM = ("unet", "gaussian_diffusion", "respace", "script_util", "train_util", "dist_util",
            "logger", "image_datasets", "nn", "fp16_util", "losses", "resample")
# What each subpackage of the fork may import from the package (besides itself).
ALLOWED = {
    "errors": set(),
    "files": set(),
    "guidance": {"unet", "nn", "gaussian_diffusion", "errors"},
    "sampling": {"guidance", "gaussian_diffusion", "respace", "errors", "dist_util", "run.pictures"},
    "run": {"files", "checkpoints", "cli", "errors", "dist_util", "logger", "allocator"},
    "allocator": set(),
    "checkpoints": {"script_util", "image_datasets", "files", "errors", "dist_util"},
}


def package_modules():
    """{dotted name relative to the package: path} of every module in improved_diffusion."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), PACKAGE)[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith("__init__") else rel] = os.path.join(folder, name)
    return found


def imports_of(name, path, modules):
    """The package modules `name` imports, anywhere in its source (relative dotted names)."""
    tree = ast.parse(open(path).read())
    is_package = path.endswith("__init__.py")
    here = name.split(".") if is_package else name.split(".")[:-1]
    if name == "__init__":
        here = []
    found = set()

    def add(dotted):
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        if dotted and dotted != name:
            found.add(dotted)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("improved_diffusion"):
                target = node.module[len("improved_diffusion"):].lstrip(".")
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("improved_diffusion."):
                    add(alias.name[len("improved_diffusion."):])
    return found


def import_graph():
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_upstream_module_paths_import():
    for name in UPSTREAM:
        importlib.import_module(f"improved_diffusion.{name}")


def find_cycle(graph):
    """One import cycle of `graph` as a list of names (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_reads_imports_and_finds_cycles():
    """The graph holds edges known from the source; an added back edge is a cycle."""
    graph = import_graph()
    assert "cli" in graph["run.sample_run"]  # from ..cli import agree, on_rank0
    assert "errors" in graph["guidance.sag"]  # from ..errors import UsageError
    assert "guidance.sag_ops" in graph["guidance.sag"]  # from . import sag_ops
    assert "guidance.sag" in graph["script_util"]  # from .guidance.sag import sag_defaults
    graph["guidance.sag"] = graph["guidance.sag"] | {"cli"}  # the old cli -> script_util -> sag -> cli
    assert find_cycle(graph) is not None


def test_subpackages_import_only_what_they_may():
    graph = import_graph()
    wrong = []
    for name, targets in graph.items():
        top = name.split(".")[0]
        if top not in ALLOWED:
            continue
        allowed = ALLOWED[top]
        for target in targets:
            if target.split(".")[0] == top:
                continue
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def _python_files(*folders):
    for folder in folders:
        for base, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(base, name)


def test_nothing_loads_a_script_by_its_file_path():
    pattern = re.compile(r"spec_from_file_location|\brunpy\b|run_path\(|exec_module\(")
    offenders = [os.path.relpath(p, ROOT) for p in _python_files(
        "improved_diffusion", "scripts", "tests", "evaluations", "benchmarks")
        if p != os.path.abspath(__file__) and pattern.search(open(p).read())]
    offenders += [name for name in ("image_sample.py", "classifier_sample.py")
                  if pattern.search(open(os.path.join(ROOT, name)).read())]
    assert not offenders, offenders


def test_no_fork_module_over_500_lines():
    upstream = {os.path.join(PACKAGE, f"{name}.py") for name in UPSTREAM}
    long = {os.path.relpath(p, ROOT): n for p in _python_files("improved_diffusion", "scripts", "evaluations")
            if p not in upstream and (n := sum(1 for _ in open(p))) > 500}
    assert not long, long


def test_the_install_provides_both_packages(tmp_path):
    """
    ``pip install -e .`` (what ``make`` runs) makes ``improved_diffusion``,
    its subpackages and ``evaluations`` importable from anywhere, without
    the checkout on sys.path.
    """
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import evaluations.sweep_scores, improved_diffusion.guidance.denoiser, "
            "improved_diffusion.run.sample_run, improved_diffusion.sampling.samplers; "
            "print(evaluations.__file__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, "not installed? run: pip install -e .\n" + res.stderr[-2000:]
    assert res.stdout.strip().startswith(ROOT), res.stdout


def test_the_architecture_doc_names_every_module_of_the_fork():
    """docs/ARCHITECTURE.md's tree lists each subpackage's modules, under their subpackage."""
    doc = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")).read()
    tree = doc.split("```")[1]
    listed, folder = set(), None
    for line in tree.splitlines():
        m = re.match(r"^  (\S+)/\s", line)
        if m:
            folder = m.group(1)
            continue
        m = re.match(r"^    (\w+)\.py\s", line)
        if m and folder:
            listed.add(f"{folder}.{m.group(1)}")
    fork = {name for name in package_modules()
            if "." in name and name.split(".")[0] in ALLOWED and not name.endswith("__init__")}
    assert fork and fork <= listed, f"not in docs/ARCHITECTURE.md: {sorted(fork - listed)}"
