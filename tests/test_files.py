"""moetune.core.files.save_figure: a picture is written whole, with the ordinary file mode, or not at all."""
from __future__ import annotations

import os

import pytest
from matplotlib.figure import Figure

from moetune.core.files import save_figure


def _figure() -> Figure:
    fig = Figure(figsize=(2, 1))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def test_png_written_with_the_umask_mode(tmp_path):
    old = os.umask(0o007)
    try:
        out = save_figure(_figure(), tmp_path / "a.png", dpi=50)
    finally:
        os.umask(old)
    assert out == tmp_path / "a.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert oct(out.stat().st_mode & 0o777) == "0o660"         # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_failed_draw_keeps_the_old_picture_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"old picture")

    class Broken:
        def savefig(self, tmp, dpi):
            with open(tmp, "wb") as f:
                f.write(b"half")                                # partly written, then the draw fails
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_figure(Broken(), path)
    assert path.read_bytes() == b"old picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_jsonl_keeps_unicode_and_a_failed_write_keeps_the_old_file(tmp_path):
    from moetune.core.files import write_jsonl
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": "é"}, {"b": [1, 2]}])
    assert path.read_bytes() == '{"a": "é"}\n{"b": [1, 2]}\n'.encode()

    def rows():
        yield {"c": 1}
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_bytes() == '{"a": "é"}\n{"b": [1, 2]}\n'.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
