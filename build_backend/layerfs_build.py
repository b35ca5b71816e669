"""layerfs's build backend: setuptools', run on a copy of the source tree in a temporary
directory, so that ``pip install .`` (a wheel, an sdist) never writes into the checkout,
which may be read-only (a shared or mounted source tree) and stays as it was.

An editable install (``pip install -e .``) builds in place, as it must: it points at the
checkout, which is then writable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (build_editable, get_requires_for_build_editable,
                                   prepare_metadata_for_build_editable)

__all__ = ["build_editable", "build_sdist", "build_wheel", "get_requires_for_build_editable",
           "get_requires_for_build_sdist", "get_requires_for_build_wheel",
           "prepare_metadata_for_build_editable", "prepare_metadata_for_build_wheel"]

# Not source (what .gitignore lists, and git's own): never copied into a build.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache",
                                     ".hypothesis")


@contextlib.contextmanager
def _in_a_copy() -> Iterator[None]:
    """Run the block in a fresh copy of the source tree (the current directory)."""
    source = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="layerfs-build-") as tmp:
        copy = os.path.join(tmp, "src")
        shutil.copytree(source, copy, symlinks=True,
                        ignore=lambda d, names: _NOT_SOURCE(d, names) | ({"build"} if d == source else set()))
        os.chdir(copy)
        try:
            yield
        finally:
            os.chdir(source)


def get_requires_for_build_wheel(config_settings=None):
    with _in_a_copy():
        return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    with _in_a_copy():
        return _setuptools.get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    metadata_directory = os.path.abspath(metadata_directory)
    with _in_a_copy():
        return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    wheel_directory = os.path.abspath(wheel_directory)
    metadata_directory = metadata_directory and os.path.abspath(metadata_directory)
    with _in_a_copy():
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    sdist_directory = os.path.abspath(sdist_directory)
    with _in_a_copy():
        return _setuptools.build_sdist(sdist_directory, config_settings)
