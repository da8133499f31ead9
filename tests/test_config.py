"""Typed params parsing: unknown keys, wrong types and bad values are one-line errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from lib.config import load_params, parse, positive, section
from lib.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    n: int
    rate: float = 0.5


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    parts: dict[str, Inner] = field(default_factory=dict)
    size: int | None = None

    def validate(self, where: str) -> None:
        if self.inner.n < 0:
            raise ConfigError(f"params: {where}.inner.n must be >= 0")


def test_parse_builds_nested_objects():
    obj = parse(Outer, {"name": "x", "inner": {"n": 2, "rate": 1}, "mode": "b", "tags": ["t"],
                        "parts": {"p": {"n": 3}}, "size": None}, "cfg")
    assert obj == Outer("x", Inner(2, 1.0), "b", ["t"], {"p": Inner(3)}, None)
    assert isinstance(obj.inner.rate, float)


@pytest.mark.parametrize("value, match", [
    ({"name": "x", "inner": {"n": 1}, "extra": 1}, "unknown key 'cfg.extra'"),
    ({"inner": {"n": 1}}, "missing key 'cfg.name'"),
    ({"name": "x", "inner": {"n": "1"}}, "cfg.inner.n must be of type int"),
    ({"name": "x", "inner": {"n": True}}, "cfg.inner.n must be a number"),
    ({"name": "x", "inner": {"n": 1}, "mode": "c"}, "cfg.mode = 'c' is not one of 'a', 'b'"),
    ({"name": "x", "inner": {"n": 1}, "tags": "t"}, "cfg.tags must be a list"),
    ({"name": "x", "inner": {"n": 1}, "parts": {"p": {"m": 1}}}, "unknown key 'cfg.parts.p.m'"),
    ({"name": "x", "inner": {"n": 1}, "size": "big"}, "cfg.size must be of type int, got .big."),
    ({"name": "x", "inner": {"n": -1}}, "cfg.inner.n must be >= 0"),
    ("x", "cfg must be a mapping"),
])
def test_parse_errors(value, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse(Outer, value, "cfg")
    assert "\n" not in str(info.value)


def test_load_params_errors(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("section:\n  inner: {n: 1}\n  name: y\n")
    assert section(load_params(tmp_path / "params.yaml"), "section", Outer).name == "y"
    with pytest.raises(ConfigError, match="missing section 'other'"):
        section(load_params(tmp_path / "params.yaml"), "other", Outer)


def test_committed_params_parse():
    """The committed params.yaml is valid for every stage that exists."""
    from lib.data.convert import PrepareParams, parse_dataset_spec
    from stages.synthesize import SynthesizeParams
    params = load_params()
    section(params, "synthesize", SynthesizeParams)
    section(params, "prepare", PrepareParams)
    for name, spec in params["datasets"].items():
        parse_dataset_spec(name, spec)


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    """`dvc exp run -S lr=5e-5` writes `5e-05`; YAML 1.1 (PyYAML) would read a string, DVC a float."""
    path = tmp_path / "params.yaml"
    path.write_text("a: 5e-05\nb: 1E3\nc: -2.5e+2\nd: 6.0e-5\ne: 5e\nf: e5\ng: 10\nh: '5e-05'\n")
    params = load_params(path)
    assert params == {"a": 5e-05, "b": 1000.0, "c": -250.0, "d": 6e-5, "e": "5e", "f": "e5", "g": 10, "h": "5e-05"}
    assert all(isinstance(params[k], float) for k in "abcd") and isinstance(params["g"], int)
    assert yaml.safe_load("a: 5e-05")["a"] == "5e-05"          # the stock loader is left as it is


def test_duplicate_keys_are_refused(tmp_path):
    """PyYAML keeps the last of two equal keys without a word (DVC refuses them): a dataset listed twice
    is one line naming the line."""
    path = tmp_path / "params.yaml"
    path.write_text("datasets:\n  a: {root: x}\n  a: {root: y}\nbase: &b {n: 1}\nmerged: {<<: *b, m: 2}\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML \(line 3: duplicate key 'a' \(first on line 2\)"):
        load_params(path)
    path.write_text("base: &b {n: 1}\nmerged: {<<: *b, n: 2}\n")      # a merge key may be overridden
    assert load_params(path)["merged"] == {"n": 2}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="must be a finite number"):
        positive(value, "x.lr")
