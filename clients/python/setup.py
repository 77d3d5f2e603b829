"""Builds flywheel-client from the platform's sources (pyproject.toml holds the metadata): only the
modules below go into the wheel, so it cannot pull in a part of the platform by accident
(tests/app/test_client_package.py imports it with torch, transformers and redis blocked)."""

from setuptools import setup
from setuptools.command.build_py import build_py

CLIENT_MODULES = {
    "flywheel": {"__init__", "grpc_client", "api_keys", "tls"},
    "flywheel.v1": None,  # every generated stub
}


class ClientModulesOnly(build_py):
    def find_package_modules(self, package, package_dir):
        keep = CLIENT_MODULES.get(package)
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if keep is None or m[1] in keep]


setup(cmdclass={"build_py": ClientModulesOnly})
