"""The wheel's packages, found rather than typed.

The repository root is the package `backdoor_seal` (ComfyUI loads custom_nodes/<pack>/__init__.py),
which pyproject.toml's own discovery cannot name, so setuptools' find_packages runs under the root and
its names get the prefix. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Leaves this script out of the root package (the PEP 517 backend does not skip it by itself)."""

    def find_package_modules(self, package, package_dir):
        found = super().find_package_modules(package, package_dir)
        return [m for m in found if (m[0], m[1]) != ("backdoor_seal", "setup")]


setup(
    packages=["backdoor_seal", *(f"backdoor_seal.{p}" for p in find_packages(include=["core*", "nodes*"]))],
    cmdclass={"build_py": BuildPy},
)
