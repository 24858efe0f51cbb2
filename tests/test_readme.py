"""Every Python snippet of the README runs as pasted, each on its own, in a fresh namespace.

A snippet is a fenced ``python`` block; it may use only what it imports or defines itself. They run
in a temporary working directory (they write TensorBoard runs and checkpoints there) with
``AMSTREAM_DATA`` pointing at the real data files, as a user's shell would.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_pasted(index, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMSTREAM_DATA", str(data_root))
    code = compile(SNIPPETS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__main__"})  # noqa: S102 - the README's own code
