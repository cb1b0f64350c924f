"""The wheel a user installs: one namespace, importable outside the repo, and the layer rule.

The repo keeps its folders (shared/, functions/, gateway/, lookalike/); the wheel must
hold them all under ``lookalike`` only, so nothing named ``shared`` or ``functions`` lands
in a user's site-packages. The import-linter contracts in pyproject.toml (layers,
forbidden imports, independent handlers, no loops) are checked on that built layout, so a
wrong import fails this test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, built from the repo and unpacked as site-packages would hold it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("lookalike-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def run_outside(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_installs_one_namespace(installed):
    top = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"lookalike"}
    assert (installed / "lookalike" / "gateway" / "static" / "index.html").is_file()
    # the int8 ranges are data: without them an installed embedder would quietly run fp32
    assert list((installed / "lookalike" / "shared" / "int8_ranges").glob("efficientnet_lite0-*.json"))


def test_the_installed_package_imports_and_runs_outside_the_repo(installed, tmp_path):
    # GIVEN a directory that is not the repo (nothing to pick up from the working directory)
    code = ("import lookalike.shared.messages as m, lookalike.functions.wiring, lookalike.gateway.app, "
            "lookalike.cli, lookalike.stack; print(m.__file__)")
    imported = run_outside(installed, [sys.executable, "-c", code], tmp_path)
    # THEN every layer imports from the installed wheel
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().startswith(str(installed))
    # AND the command and a function alone answer from there
    usage = run_outside(installed, [sys.executable, "-m", "lookalike", "--help"], tmp_path)
    assert usage.returncode == 0 and "index" in usage.stdout and "dlq" in usage.stdout
    alone = run_outside(installed, [sys.executable, "-m", "lookalike.functions", "nope"], tmp_path)
    assert alone.returncode != 0 and "ingest,detect,embed,query" in alone.stderr


def test_the_layer_rule_holds(installed, tmp_path):
    # The import-linter contracts of pyproject.toml, on the installed layout.
    lint = run_outside(installed, [str(Path(sys.executable).with_name("lint-imports")), "--no-cache",
                                   "--config", str(REPO_ROOT / "pyproject.toml")], tmp_path)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "4 kept, 0 broken" in lint.stdout
