"""The console scripts npmask-train/-compare/-pretrain/-predict, built as an installer builds them.

setuptools turns ``[project.scripts]`` into the package's ``entry_points.txt`` (run here with
``egg_info`` on a copy of the project, offline), and pip's own script maker (distlib) writes the
launchers from it -- the two steps of ``pip install``. Each launcher must then start its command.
"""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"npmask-train": "npmask.train", "npmask-compare": "npmask.compare",
            "npmask-pretrain": "npmask.pretrain", "npmask-predict": "npmask.predict"}


@pytest.fixture(scope="module")
def launchers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scripts")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "npmask", src / "npmask", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                           "egg_info", "--egg-base", str(tmp)], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ep = configparser.ConfigParser()
    ep.read(tmp / "npmask.egg-info" / "entry_points.txt")
    specs = dict(ep["console_scripts"])
    pip_distlib = pytest.importorskip("pip._vendor.distlib.scripts")
    maker = pip_distlib.ScriptMaker(None, str(tmp / "bin"))
    maker.executable = sys.executable
    maker.variants = {""}
    maker.make_multiple([f"{name} = {target}" for name, target in specs.items()])
    return specs, tmp / "bin"


def test_pyproject_declares_the_four_commands(launchers):
    specs, _ = launchers
    assert specs == {name: f"{module}:main" for name, module in COMMANDS.items()}


@pytest.mark.parametrize("name", COMMANDS)
def test_each_launcher_starts_its_command(launchers, name):
    _, bin_dir = launchers
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ")


def test_a_launcher_reports_a_user_mistake_in_one_line(launchers, tmp_path):
    _, bin_dir = launchers
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([str(bin_dir / "npmask-predict"), str(tmp_path / "no-run"), "--domain", "a",
                           "x.png"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"python -m npmask.predict: error: {tmp_path / 'no-run'}: no such folder"]
