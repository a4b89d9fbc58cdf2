"""Where the shipped process files and Alembic migrations are, in a wheel and in a checkout.

The design keeps ``processes/`` and ``migrations/`` at the top of the repository, next to the
package. A wheel maps those folders into the package (``ratepay_oms/processes``,
``ratepay_oms/migrations``, see ``[tool.setuptools.package-dir]`` in ``pyproject.toml``), so an
installed engine finds them through :mod:`importlib.resources` from any working directory. In a
checkout (an editable install, or tests run from the source tree) the package folder does not
hold them, and the top-level folders are used. One function decides, for both.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED_FOLDERS = ("processes", "migrations")


class ShippedDataMissingError(RuntimeError):
    """Neither the installed package nor a checkout holds the folder: a broken installation."""


def shipped_path(name: str) -> Path:
    """The filesystem path of the shipped folder ``name`` (``processes`` or ``migrations``).

    Alembic and the process loader read plain files, so the folder must exist on disk: a wheel
    installed by pip unpacks it (zip imports are not supported and say so).
    """
    if name not in SHIPPED_FOLDERS:
        raise ValueError(f"not a shipped folder: {name!r} (one of {', '.join(SHIPPED_FOLDERS)})")
    packaged = resources.files("ratepay_oms").joinpath(name)
    if packaged.is_dir():
        if not isinstance(packaged, Path):
            raise ShippedDataMissingError(
                f"ratepay_oms/{name} is inside an archive ({packaged}); install the wheel with pip"
            )
        return packaged
    checkout = Path(str(resources.files("ratepay_oms"))).resolve().parent / name
    if checkout.is_dir():
        return checkout
    raise ShippedDataMissingError(
        f"the shipped {name}/ folder is missing (looked in {packaged} and {checkout}); "
        "reinstall ratepay-oms"
    )
