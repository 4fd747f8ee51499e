"""The code in docs/*.md runs as written (each file's python blocks in order, one namespace)."""
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("doc", ["custom_networks.md"])
def test_doc_code_runs(doc):
    text = (DOCS / doc).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"no python code in {doc}"
    namespace = {}
    for block in blocks:
        exec(compile(block, f"{doc}", "exec"), namespace)  # noqa: S102
