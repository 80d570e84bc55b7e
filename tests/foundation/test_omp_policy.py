"""``import napari_leakseg`` makes torch's OpenMP threads sleep instead of spin (benchmarks/bench_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = "import os, napari_leakseg; print(os.environ.get('OMP_WAIT_POLICY'))"


def _run(env_policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_sets_passive_wait_policy_unless_the_user_chose():
    assert _run(None) == "PASSIVE"
    assert _run("ACTIVE") == "ACTIVE"  # an explicit setting wins


def test_cli_process_sees_passive_before_torch_loads():
    """The policy is in the environment before torch (and its OpenMP runtime) is imported."""
    code = ("import sys, os; import napari_leakseg.cli.main; "
            "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "PASSIVE"]
