"""`moetune ARGS` through the real entry point, in the test's own process (no interpreter start-up)."""
from __future__ import annotations

import sys

import pytest


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `moetune *args` via moetune.cli.main; returns (exit code, stdout, stderr)."""
    from moetune.cli import main
    monkeypatch.setattr(sys, "argv", ["moetune", *args])
    with pytest.raises(SystemExit) as ei:
        main()
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err
