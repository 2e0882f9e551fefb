"""Building pacer's C++ kernels: a build killed half-way leaves torch's `lock` file in the build directory, and no
later start may wait on it forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pacer.model import cpu_kernels as K
from tests.strict import kernel_ops

REPO = Path(__file__).resolve().parents[2]

# A build that dies holding the directory: pacer's flock taken, torch's lock file created, then SIGKILL.
KILLED_BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from torch.utils.file_baton import FileBaton
    from pacer.model import cpu_kernels
    with cpu_kernels._exclusive(Path(sys.argv[1])):
        assert FileBaton(sys.argv[1] + "/lock").try_acquire()
        print("building", flush=True)
        time.sleep(600)
""")


def in_thread(target, timeout_s: float) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return thread


def test_a_stale_lock_file_is_removed(tmp_path):
    (tmp_path / "lock").touch()
    with K._exclusive(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert not (tmp_path / "lock").exists()


def test_a_live_build_is_waited_for_and_a_killed_one_is_not(tmp_path):
    builder = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert builder.stdout.readline() == "building\n"
        entered = threading.Event()

        def enter() -> None:
            with K._exclusive(tmp_path):
                entered.set()

        waiter = in_thread(enter, timeout_s=0.5)
        assert waiter.is_alive() and not entered.is_set()  # the builder is alive: wait for it
        assert (tmp_path / "lock").exists()  # and leave its lock file alone
        os.kill(builder.pid, signal.SIGKILL)  # which it leaves behind
        waiter.join(timeout=10)
        assert entered.is_set() and not (tmp_path / "lock").exists()
    finally:
        builder.kill()
        builder.wait()


def test_a_start_after_a_killed_build_loads_the_cached_kernels():
    """The real build directory with a stale lock file in it: a fresh process loads the cached build in seconds
    (torch's own wait would never return)."""
    kernel_ops(K.layer_ops(), "C++ kernels")  # built and cached by now
    lock = K.build_directory() / "lock"
    lock.touch()
    try:
        load = "from pacer.model import cpu_kernels; raise SystemExit(0 if cpu_kernels.load() else 1)"
        done = subprocess.run([sys.executable, "-c", load], cwd=REPO, timeout=120, capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stderr
        assert "left by a build of pacer's C++ kernels that was killed" in done.stderr
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_the_build_directory_is_per_checkout_under_the_extensions_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = K.build_directory()
    assert path.parent == tmp_path / "pacer" and path.name.startswith("pacer_cpu_")
    monkeypatch.setattr(K, "__file__", str(tmp_path / "elsewhere" / "cpu_kernels.py"))
    assert K.build_directory() != path


@pytest.mark.parametrize("enabled", [True, False])
def test_running_without_kernels_says_once_what_it_costs(monkeypatch, caplog, enabled):
    from pacer.model.runner import ModelRunner
    from tests.tiny import tiny_model

    def no_compiler(*args, **kwargs):
        raise OSError("no c++")

    monkeypatch.setattr(K, "_loader", K._KernelLoader())
    if enabled:
        monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    else:
        monkeypatch.setenv(K.NO_KERNEL_ENV, "1")
    model = tiny_model()
    for _ in range(2):
        ModelRunner.warn_without_kernels(model)
    costs = [r.getMessage() for r in caplog.records if K.FALLBACK_COST in r.getMessage()]
    assert len(costs) == (1 if enabled else 2)  # the build fails once; each runner turned off says so
    assert ("no c++" in costs[0]) == enabled
