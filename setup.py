"""Package list for setuptools (everything else is in pyproject.toml).

``processes/`` and ``migrations/`` stay at the top of the repository and ship inside the wheel
as ``ratepay_oms.processes`` and ``ratepay_oms.migrations`` (mapped in pyproject.toml's
``[tool.setuptools.package-dir]``); pyproject's ``packages.find`` cannot name mapped folders next to discovered ones, so this does.
"""

from setuptools import find_packages, setup

SHIPPED_DATA_PACKAGES = [
    "ratepay_oms.processes",
    "ratepay_oms.processes.subprocesses",
    "ratepay_oms.migrations",
    "ratepay_oms.migrations.versions",
]

WEB_DATA_PACKAGES = ["ratepay_oms.web.static", "ratepay_oms.web.templates"]
"""The web console's templates and static files: folders without ``__init__.py``, which
``find_packages`` leaves out and setuptools would stop shipping as package data of
``ratepay_oms.web`` (its warning: "absent from the `packages` configuration")."""

setup(
    packages=[
        *find_packages(include=["ratepay_oms", "ratepay_oms.*"]),
        *SHIPPED_DATA_PACKAGES,
        *WEB_DATA_PACKAGES,
    ]
)
