"""Config loading: TOML + dotted overrides, type conversion, clear errors."""

from dataclasses import dataclass, field

import pytest

from yuyan.config import apply_overrides, load_config, parse_overrides
from yuyan.errors import UserError


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: str | None = None
    flag: bool = False


@dataclass
class Outer:
    train: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('tags = ["a"]\n[train]\nlr = 0.5\nsteps = 3\n')
    cfg = load_config(Outer, f, parse_overrides(["--train.steps", "7", "--train.flag", "--train.name=x"]))
    assert cfg.train.lr == 0.5 and cfg.train.steps == 7 and cfg.train.flag is True and cfg.train.name == "x"
    assert cfg.tags == ["a"]
    assert apply_overrides(cfg, {"train.lr": "3e-4"}).train.lr == pytest.approx(3e-4)


def test_bad_settings_are_clear(tmp_path):
    with pytest.raises(UserError, match="unknown setting --train.nope"):
        apply_overrides(Outer(), {"train.nope": "1"})
    with pytest.raises(UserError, match="expected int"):
        apply_overrides(Outer(), {"train.steps": "many"})
    with pytest.raises(UserError, match="not found"):
        load_config(Outer, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(Outer, bad)
