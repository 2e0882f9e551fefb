"""`pacer generate` end to end on the default model."""

from __future__ import annotations

import pytest

from pacer.cli import main

pytestmark = pytest.mark.slow


def test_generate_prints_the_completion(capsys):
    rc = main(["generate", "--prompt", "What is the capital of France?", "--max-tokens", "8", "--dtype", "float32",
               "--kv-cache-memory", "64MiB"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "The capital of France is Paris" in out
    assert "1 requests, " in err


def test_bad_flag_values_are_clear_errors(capsys):
    assert main(["generate", "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--scheduler", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
