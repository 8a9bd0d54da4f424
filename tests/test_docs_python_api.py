"""The code blocks of docs/python-api.md and docs/artifacts.md run as written: every method config's snippet
applies its method to the docs' example models and must change them."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).parents[1] / "docs"


def snippets(page: str) -> dict[str, str]:
    text = (DOCS / page).read_text()
    return dict(re.findall(r"<!-- snippet: ([\w-]+) -->\s*```python\n(.*?)```", text, re.S))


def run(page: str, name: str, namespace: dict) -> dict:
    code = snippets(page)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the docs use no deprecated name
        exec(compile(code, f"docs/{page}:{name}", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def setup() -> dict:
    return run("python-api.md", "setup", {"__name__": "snippet"})


def test_every_method_config_has_a_snippet_that_uses_it():
    import torchslim

    text = "\n".join(snippets("python-api.md").values())
    missing = [e.config_cls.__name__ for e in torchslim.list_methods() if e.config_cls.__name__ not in text]
    assert missing == []


@pytest.mark.parametrize("name", [n for n in snippets("python-api.md") if n != "setup"])
def test_python_api_snippet_runs(name, setup):
    namespace = run("python-api.md", name, dict(setup))
    results = [v for k, v in namespace.items() if k.startswith("result") and k not in setup]
    assert results or name in ("chain", "save-load")
    for result in results:  # each method changed the model it was given
        model = setup["clicks"] if type(result.model).__name__ == "Clicks" else setup["cnn"]
        if result.runtime == "torch":
            before, after = model.state_dict(), result.model.state_dict()
            assert set(before) != set(after) or any(not torch.equal(before[k], after[k]) or
                                                    before[k].shape != after[k].shape for k in before), name


def test_artifacts_snippet_runs():
    namespace = run("artifacts.md", "artifacts", {"__name__": "snippet"})
    assert set(namespace["folder"].iterdir()) == {namespace["folder"] / n for n in ("pruned", "int8", "int4")}
