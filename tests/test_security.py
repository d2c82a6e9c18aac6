"""No code runs from data: the sources of koopkit/ and plugins/ never unpickle, eval or shell out.

The check reads the syntax tree (not the text), so comments and docstrings that mention
``pickle`` do not count and aliases (``import numpy as np``, ``from torch import load``) do.
Every finding is reported as ``path:line: what``. A new occurrence fails the suite; if one is
ever truly needed, it must be argued for in review and listed in ALLOWED with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("koopkit", "plugins")

# Modules whose only purpose is to serialise Python objects (loading them runs code).
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}
# Calls that run code from data or a shell, whatever their arguments.
UNSAFE_CALLS = {
    "eval": "eval() runs code from a string",
    "exec": "exec() runs code from a string",
    "compile": "compile() turns a string into code",
    "os.system": "os.system() runs a shell",
    "os.popen": "os.popen() runs a shell",
    "subprocess.getoutput": "subprocess.getoutput() runs a shell",
    "subprocess.getstatusoutput": "subprocess.getstatusoutput() runs a shell",
    "yaml.unsafe_load": "yaml.unsafe_load() builds arbitrary objects",
    "yaml.full_load": "yaml.full_load() builds Python objects",
    "pandas.read_pickle": "pandas.read_pickle() unpickles",
    "torch.jit.load": "torch.jit.load() loads TorchScript code",
    "torch.package.PackageImporter": "torch.package imports pickled code",
    "numcodecs.Pickle": "the Pickle codec unpickles chunks",
    "joblib.load": "joblib.load() unpickles",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}

# path:line -> reason, for an occurrence that was reviewed and accepted. Keep it empty.
ALLOWED: dict[str, str] = {}


def sources():
    for top in SCANNED:
        yield from sorted((ROOT / top).rglob("*.py"))


class Scanner(ast.NodeVisitor):
    """Collects ``(line, message)`` findings for one module."""

    def __init__(self):
        self.aliases: dict[str, str] = {}  # local name -> dotted name it stands for
        self.findings: list[tuple[int, str]] = []
        self.numpy_loads: list[tuple[int, bool]] = []  # (line, passes allow_pickle=False)

    # -- names -----------------------------------------------------------------------------

    def visit_Import(self, node):
        for alias in node.names:
            self._module(node, alias.name)
            local = alias.asname or alias.name.split(".")[0]
            self.aliases[local] = alias.name if alias.asname else alias.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        module = node.module or ""
        self._module(node, module)
        for alias in node.names:
            full = f"{module}.{alias.name}" if module else alias.name
            self._module(node, full)
            self.aliases[alias.asname or alias.name] = full
            if full in UNSAFE_CALLS:
                self.findings.append((node.lineno, f"imports {full}: {UNSAFE_CALLS[full]}"))
        self.generic_visit(node)

    def _module(self, node, name):
        if name.split(".")[0] in UNSAFE_MODULES:
            self.findings.append((node.lineno, f"imports {name}: unpickling runs code"))

    def qualified(self, node) -> str | None:
        """``np.load`` -> ``numpy.load`` through the module's imports; None if not a name."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        parts.append(self.aliases.get(node.id, node.id))
        return ".".join(reversed(parts))

    # -- calls -----------------------------------------------------------------------------

    def visit_Call(self, node):
        name = self.qualified(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        splat = any(k.arg is None for k in node.keywords)
        line = node.lineno
        if name in UNSAFE_CALLS:
            self.findings.append((line, f"{name}(): {UNSAFE_CALLS[name]}"))
        elif name and name.split(".")[0] in UNSAFE_MODULES:
            self.findings.append((line, f"{name}(): unpickling runs code"))
        elif name in ("importlib.import_module", "__import__") and node.args:
            target = node.args[0]  # a computed name (a lazy-import table) is not data
            if isinstance(target, ast.Constant) and str(target.value).split(".")[0] in (
                UNSAFE_MODULES
            ):
                self.findings.append((line, f"imports {target.value} dynamically"))
        if name == "torch.load" and not _is_true(keywords.get("weights_only")):
            self.findings.append((line, "torch.load() without weights_only=True"))
        if name == "yaml.load":
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            loader_name = self.qualified(loader) if loader is not None else None
            if not loader_name or loader_name.split(".")[-1] not in SAFE_YAML_LOADERS:
                self.findings.append((line, "yaml.load() without a safe Loader"))
        if name in ("numpy.load", "numpy.lib.format.read_array"):
            allow = keywords.get("allow_pickle")
            explicit_false = isinstance(allow, ast.Constant) and allow.value is False
            self.numpy_loads.append((line, explicit_false))
            if (allow is not None and not explicit_false) or splat:
                self.findings.append((line, f"{name}() with allow_pickle not False"))
        if "shell" in keywords and not _is_false(keywords["shell"]):
            self.findings.append((line, f"{name or 'call'}() with shell=True"))
        self.generic_visit(node)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def scan(source: str) -> Scanner:
    scanner = Scanner()
    scanner.visit(ast.parse(source))
    return scanner


def all_findings():
    found, numpy_loads = [], []
    for path in sources():
        rel = path.relative_to(ROOT).as_posix()
        scanner = scan(path.read_text(encoding="utf-8"))
        found += [f"{rel}:{line}: {message}" for line, message in scanner.findings]
        numpy_loads += [(f"{rel}:{line}", ok) for line, ok in scanner.numpy_loads]
    return found, numpy_loads


# --------------------------------------------------------------------------------------------
# the sources


def test_the_sources_are_scanned():
    files = list(sources())
    assert len(files) > 20
    assert ROOT / "koopkit" / "store" / "importers.py" in files
    assert any(path.is_relative_to(ROOT / "plugins") for path in files)


def test_no_unpickling_eval_or_shell_in_koopkit_or_plugins():
    found, _ = all_findings()
    new = [f for f in found if f.split(": ", 1)[0] not in ALLOWED]
    assert not new, "unsafe code in koopkit/ or plugins/:\n" + "\n".join(new)


def test_numpy_load_refuses_pickles_explicitly():
    _, numpy_loads = all_findings()
    assert numpy_loads, "the .npy importer calls numpy.load: the scanner should see it"
    missing = [where for where, ok in numpy_loads if not ok]
    assert not missing, "numpy.load without allow_pickle=False at:\n" + "\n".join(missing)


def test_every_torch_load_is_weights_only():
    """The importers load checkpoints, so there are torch.load calls; each passes the check."""
    calls = []
    for path in sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                    keywords = {k.arg: k.value for k in node.keywords}
                    calls.append((path.name, _is_true(keywords.get("weights_only"))))
    assert calls and all(ok for _, ok in calls), calls


# --------------------------------------------------------------------------------------------
# the scanner itself: it finds what it must and nothing else

UNSAFE_SNIPPETS = {
    "import pickle": "import pickle\n",
    "import pickle as p": "import pickle as p\np.loads(b'')\n",
    "from pickle import loads": "from pickle import loads\n",
    "import cPickle": "import cPickle\n",
    "import dill": "import dill\n",
    "import marshal": "import marshal\n",
    "from _pickle import Unpickler": "from _pickle import Unpickler\n",
    "importlib pickle": "import importlib\nimportlib.import_module('pickle')\n",
    "torch.load bare": "import torch\ntorch.load('x.pt')\n",
    "torch.load weights_only=False": "import torch\ntorch.load('x.pt', weights_only=False)\n",
    "torch.load weights_only computed": "import torch\ntorch.load('x', weights_only=flag)\n",
    "from torch import load": "from torch import load\nload('x.pt')\n",
    "import torch as t": "import torch as t\nt.load('x.pt', map_location='cpu')\n",
    "torch.jit.load": "import torch\ntorch.jit.load('m.pt')\n",
    "eval": "eval('1 + 1')\n",
    "exec": "exec(text)\n",
    "compile": "compile(text, 'f', 'exec')\n",
    "shell=True": "import subprocess\nsubprocess.run('ls', shell=True)\n",
    "shell computed": "import subprocess\nsubprocess.Popen(cmd, shell=use_shell)\n",
    "os.system": "import os\nos.system('ls')\n",
    "os.popen": "import os\nos.popen('ls')\n",
    "yaml.load": "import yaml\nyaml.load(text)\n",
    "yaml.load Loader": "import yaml\nyaml.load(text, Loader=yaml.Loader)\n",
    "yaml.unsafe_load": "import yaml\nyaml.unsafe_load(text)\n",
    "np.load allow_pickle=True": "import numpy as np\nnp.load('x.npy', allow_pickle=True)\n",
    "numpy.load allow_pickle var": "import numpy\nnumpy.load('x.npy', allow_pickle=flag)\n",
    "np.load **kwargs": "import numpy as np\nnp.load('x.npy', **options)\n",
    "numcodecs Pickle": "from numcodecs import Pickle\n",
    "pandas.read_pickle": "import pandas as pd\npd.read_pickle('x')\n",
}

SAFE_SNIPPETS = {
    "docstring": '"""We never import pickle or call eval(), torch.load or os.system."""\n',
    "comment": "# import pickle; eval(x); subprocess.run(x, shell=True)\nx = 1\n",
    "string": "message = 'refused: pickle.loads would run code; use weights_only=True'\n",
    "torch.load weights_only": "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)\n",
    "np.load allow_pickle=False": "import numpy as np\nnp.load('x.npy', mmap_mode='r', allow_pickle=False)\n",
    "yaml.safe_load": "import yaml\nyaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)\n",
    "shell=False": "import subprocess\nsubprocess.run(['ls'], shell=False)\n",
    "re.compile": "import re\nre.compile('a+')\n",
    "method named eval": "model.eval()\nobj.exec()\n",
    "json": "import json\njson.loads('{}')\n",
    "importlib constant": "import importlib\nimportlib.import_module('koopkit.api')\n",
}


@pytest.mark.parametrize("snippet", UNSAFE_SNIPPETS.values(), ids=UNSAFE_SNIPPETS)
def test_scanner_flags(snippet):
    assert scan(snippet).findings


@pytest.mark.parametrize("snippet", SAFE_SNIPPETS.values(), ids=SAFE_SNIPPETS)
def test_scanner_passes(snippet):
    assert scan(snippet).findings == []


def test_scanner_records_numpy_loads_and_whether_they_refuse_pickles():
    scanner = scan("import numpy as np\nnp.load('a.npy', allow_pickle=False)\nnp.load('b.npy')\n")
    assert scanner.numpy_loads == [(2, True), (3, False)]
