"""The back-office web console: ``create_app(engine)`` returns an ASGI app to run with uvicorn
(``ratepay-oms web serve``) or to mount in a shop's own backend.

Needs the ``web`` extra (``pip install 'ratepay-oms[web]'``: Starlette, Jinja2, uvicorn,
python-multipart). Users and sessions (``users``) need only the base install, so
``ratepay-oms web adduser`` works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["WEB_EXTRA_HINT", "create_app"]

WEB_EXTRA_HINT = "the web console needs the 'web' extra: pip install 'ratepay-oms[web]'"


def create_app(engine: Any, **options: Any) -> Starlette:
    """See ``ratepay_oms.web.app.create_app``."""
    from ratepay_oms.web.app import create_app as _create_app

    return _create_app(engine, **options)
