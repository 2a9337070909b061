"""The packages of the ``ddk`` distribution, found rather than listed: every folder under ``services/`` (the
import name is ``ddk``, see ``package-dir`` in pyproject.toml) becomes ``ddk.<folder>``, data-only folders such as
``controller/static`` included (namespace packages, so their ``package-data`` ships). Everything else is in
pyproject.toml; setuptools' ``find`` has no option for the ``ddk.`` prefix, hence this file.
``tests/e2e/test_wheel.py`` builds the wheel and imports every module from a fresh venv.
"""

from setuptools import find_namespace_packages, setup

setup(packages=["ddk", *(f"ddk.{p}" for p in find_namespace_packages("services", exclude=["*__pycache__*"]))])
