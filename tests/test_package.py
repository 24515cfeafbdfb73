"""The distribution: one version, written once (t2i_flax.__version__)."""
import os

from setuptools.config.pyprojecttoml import read_configuration

import t2i_flax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_distribution_has_the_package_version():
    """pyproject.toml takes its version from t2i_flax.__version__, resolved here by setuptools as a build does."""
    project = read_configuration(os.path.join(ROOT, "pyproject.toml"))["project"]
    assert project["version"] == t2i_flax.__version__
    assert project["dynamic"] == ["version"]  # not also written in pyproject.toml
