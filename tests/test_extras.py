"""Optional dependencies (pacer[ray], pacer[plots]): commands that need a missing one stop at once, naming the extra."""

from __future__ import annotations

import sys

import pytest

from pacer.cli import main
from pacer.extras import MissingExtra, require


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # an import of it fails, as when it is not installed
    with pytest.raises(MissingExtra, match=r"engine replicas needs ray.*pip install 'pacer\[ray\]'"):
        require("ray", "ray", "engine replicas")
    assert require("json", "none", "anything").dumps(1) == "1"


def test_serve_with_replicas_without_ray_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["serve", "--replicas", "2"]) == 2
    error = capsys.readouterr().err
    assert "pacer serve --replicas/--ray-address" in error and "pip install 'pacer[ray]'" in error


def test_plots_without_matplotlib_fail_before_the_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["sim", "run", "--profile", str(tmp_path / "never-read.json"), "--plots", str(tmp_path)]) == 2
    assert "pip install 'pacer[plots]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
