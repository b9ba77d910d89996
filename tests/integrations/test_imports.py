"""``import grng`` imports no framework helper, and a helper without its framework
raises ImportError naming the pip package. One fresh interpreter checks both (starting
one costs more than the checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

_CHECK = """
import json, sys
import grng
found = {"loaded": sorted(m for m in sys.modules if m.split(".")[0] in
         ("transformers", "accelerate", "lightning", "pytorch_lightning")
         or m.startswith("grng.integrations"))}
# A None entry in sys.modules makes `import name` raise ImportError.
for name in ("transformers", "lightning", "pytorch_lightning"):
    sys.modules[name] = None
for helper in ("huggingface", "lightning"):
    try:
        __import__("grng.integrations." + helper)
        found[helper] = "imported"
    except ImportError as error:
        found[helper] = str(error)
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def found() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_import_grng_imports_no_framework(found: dict[str, Any]) -> None:
    assert found["loaded"] == []


@pytest.mark.parametrize(
    ("helper", "package"),
    [
        ("huggingface", "pip install 'transformers>=4.40' 'accelerate>=0.26'"),
        ("lightning", "pip install 'lightning>=2.2'"),
    ],
)
def test_a_helper_without_its_framework_names_the_package(
    found: dict[str, Any], helper: str, package: str
) -> None:
    assert package in found[helper]
