"""Plugins: ``--import MODULE`` and the ``torchslim.plugins`` entry points make user prefixes work from the CLI."""

from __future__ import annotations

import pytest
import yaml

from torchslim.cli import main
from torchslim.errors import InputError
from torchslim.plugins import ENTRY_POINT_GROUP, load_plugins

PLUGIN = """
from torchslim.data import register_data_prefix, resolve_data

@register_data_prefix("{prefix}")
def load(rest, seed=0):
    return resolve_data("builtin:digits", seed)

def register():
    global REGISTERED
    REGISTERED = True
"""


@pytest.fixture(autouse=True)
def _restore_data_prefixes():
    """Plugins register prefixes in the process-wide registry: put it back so other tests see the built-in set."""
    from torchslim.data import _DATA

    _DATA.prefixes()  # the built-in prefixes are registered before the snapshot
    before = dict(_DATA.resolvers)
    yield
    _DATA.resolvers.clear()
    _DATA.resolvers.update(before)


def test_import_flag_makes_a_plugin_prefix_usable_from_the_cli(tmp_path, capsys):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN.format(prefix="mydigits"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "builtin:tiny-test-cnn", "data": "mydigits:all",
                                      "measure": {"batch_size": 8, "repeats": 1, "warmup": 0}}))
    assert main(["compress", str(recipe), "--out", str(tmp_path / "a"), "--quiet", "--no-plugins"]) == 2
    assert "unknown data spec 'mydigits:all'" in capsys.readouterr().err
    assert main(["compress", str(recipe), "--out", str(tmp_path / "b"), "--quiet", "--import", str(plugin)]) == 0
    assert (tmp_path / "b" / "report.json").is_file()


def test_entry_points_are_loaded_and_a_broken_plugin_is_named(tmp_path, monkeypatch):
    (tmp_path / "entry_plugin_mod.py").write_text(PLUGIN.format(prefix="entrydigits"))
    info = tmp_path / "entry_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: entry-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nmine = entry_plugin_mod:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "entry_plugin_mod:register" in load_plugins()
    import entry_plugin_mod

    assert entry_plugin_mod.REGISTERED is True
    from torchslim.data import list_data_prefixes

    assert "entrydigits" in list_data_prefixes()
    assert load_plugins(entry_points=False) == []
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = no_such_module_here\n")
    with pytest.raises(InputError, match="plugin broken .*ModuleNotFoundError.*--no-plugins"):
        load_plugins()


def test_a_failing_import_is_bad_input(tmp_path):
    with pytest.raises(InputError, match="--import not_a_module_anywhere: ModuleNotFoundError"):
        load_plugins(["not_a_module_anywhere"], entry_points=False)
    with pytest.raises(InputError, match="file not found"):
        load_plugins([str(tmp_path / "absent.py")], entry_points=False)
