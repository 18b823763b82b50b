"""The README's Python examples run as written (in a scratch folder)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(section: str) -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


@pytest.mark.parametrize("section", ["## MiniViT weight multiplexing", "## Low-rank compression"])
def test_readme_python_examples_run(section, tmp_path, monkeypatch):
    blocks = python_blocks(section)
    assert blocks, f"no python example under {section}"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, f"README {section}", "exec"), {"__name__": "__readme__"})
