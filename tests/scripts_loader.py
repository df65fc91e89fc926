"""Load a file under ``scripts/`` as a module: scripts/ is a folder of tools, not a package."""
from __future__ import annotations

import importlib.util
from types import ModuleType

from conftest import ROOT

SCRIPTS = ROOT / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` executed once per call, under the module name ``name``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
