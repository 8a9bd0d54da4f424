from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from torchslim._config import FieldError, check, from_dict, to_dict


@dataclass
class Inner:
    rate: float = 0.5

    def __post_init__(self):
        check(0 <= self.rate <= 1, "rate", f"must be in [0, 1], got {self.rate}")


@dataclass
class Outer:
    count: int = 1
    mode: Literal["a", "b"] = "a"
    names: list[str] = field(default_factory=list)
    inner: Inner | None = field(default_factory=Inner)


def test_converts_types_and_nested_configs():
    config = from_dict(Outer, {"count": 3, "mode": "b", "names": ["x", "y"], "inner": {"rate": 1}})
    assert config.count == 3 and config.mode == "b" and config.names == ["x", "y"]
    assert isinstance(config.inner.rate, float) and config.inner.rate == 1.0
    assert from_dict(Outer, {"inner": None}).inner is None
    assert from_dict(Outer, to_dict(config)) == config


@pytest.mark.parametrize("data, field_name", [
    ({"count": "3"}, "count"), ({"mode": "c"}, "mode"), ({"names": "x"}, "names"), ({"names": [1]}, "names[0]"),
    ({"inner": {"rate": 3}}, "inner.rate"), ({"inner": {"speed": 1}}, "inner.speed"), ({"extra": 1}, "extra"),
])
def test_errors_name_the_field(data, field_name):
    with pytest.raises(FieldError) as error:
        from_dict(Outer, data)
    assert error.value.field == field_name


@dataclass
class Renamed:
    skip: list[str] = field(default_factory=list)
    renamed_fields: ClassVar[dict[str, str]] = {"ignore": "skip"}


def test_an_old_spelling_names_the_new_one():
    assert from_dict(Renamed, {"skip": ["a*"]}).skip == ["a*"]
    with pytest.raises(FieldError) as error:
        from_dict(Outer, {"inner": {"rate": 0.1}, "count": 2, "x": 1}, prefix="step.")
    assert "unknown key" in str(error.value)
    with pytest.raises(FieldError) as error:
        from_dict(Renamed, {"ignore": ["a*"]}, prefix="prune.")
    assert error.value.field == "prune.ignore" and str(error.value).startswith("prune.ignore: was renamed to skip")
