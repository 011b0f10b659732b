"""llamafactory-minorsft: the MinorSFT and SFT-using-DPO stages for LLaMA-Factory 0.9.5.

Installing the distribution places ``llamafactory_minorsft.pth`` in site-packages. Python runs it at
start-up; it only registers an import hook (no torch, no LLaMA-Factory import), and the plugin
patches LLaMA-Factory the moment a program imports it. That is how ``llamafactory-cli``, torchrun
workers and LLaMA-Board's training subprocesses see the new stages without an extra import.
"""

import os
import re
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_FILE = "llamafactory_minorsft.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithPth(build_py):
    """Regular wheels: put the .pth at the root of the wheel, i.e. into site-packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(os.path.join(HERE, PTH_FILE), os.path.join(self.build_lib, PTH_FILE))


class EditableWheelWithPth(editable_wheel):
    """Editable wheels: setuptools writes its own root-level .pth files in ``_install_namespaces``;
    ours goes next to them. Its name sorts after ``__editable__.*.pth``, so the package is already
    importable when it runs."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(os.path.join(HERE, PTH_FILE), os.path.join(installation_dir, PTH_FILE))


def read(path):
    with open(os.path.join(HERE, path), encoding="utf-8") as f:
        return f.read()


def version():
    """``__version__`` from plugin/__init__.py, read as text: the one place the version is written (importing the
    package at build time would need its dependencies)."""
    match = re.search(r'^__version__ = "([^"]+)"$', read("plugin/__init__.py"), re.MULTILINE)
    if match is None:
        raise RuntimeError('plugin/__init__.py: no line `__version__ = "X.Y.Z"`')
    return match.group(1)


setup(
    name="llamafactory-minorsft",
    version=version(),
    description="MinorSFT (Xie et al. 2024, arXiv 2408.10642) and SFT-using-DPO as LLaMA-Factory stages",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # LLaMA-Factory 0.9.5 requires it
    packages=[
        "llamafactory_minorsft",
        *(f"llamafactory_minorsft.{name}" for name in ("train", "hooks", "evaluation", "sweep", "report", "bench")),
        "llamafactory_minorsft.benchmarks",
    ],
    # The benchmark definitions (top-level evaluation/, data only) ship as a package of their own.
    package_dir={"llamafactory_minorsft": "plugin", "llamafactory_minorsft.benchmarks": "evaluation"},
    package_data={
        "llamafactory_minorsft.benchmarks": ["README.md", "tasks/*.json", "prompts/*.txt"],
    },
    install_requires=[
        # The plugin hooks into LLaMA-Factory internals, so it is pinned to the version it was checked on.
        "llamafactory==0.9.5",
        "torch==2.11.0",
        "torchvision==0.26.0",
        "torchaudio==2.11.0",
        "transformers>=4.55.0,<=5.6.0",
        "trl>=0.18.0,<=0.24.0",
        "peft>=0.18.0,<0.19.0",
        # The paper's recipes train under ZeRO-3 (examples/deepspeed/). PyPI has only an sdist; it builds without
        # torch (build isolation is fine: no op is pre-compiled) and compiles its ops at first use.
        "deepspeed==0.19.8",
        "gguf>=0.10.0",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
    ],
    extras_require={
        # .ci/run lints with ruff before pytest; pytest-xdist runs the suite on two workers (pyproject.toml addopts)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "playwright>=1.40", "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["minorsft = llamafactory_minorsft.cli:main"]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
