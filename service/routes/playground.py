"""``GET /``: the playground, a page a person can label a dialogue with (service/static/).

The files are a fixed set read from the package, so no request path reaches the file system.
``ERC_PLAYGROUND=false`` turns the page off: ``/`` and its files then answer 404 in the
service's error body.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from service.errors import error_response

router = APIRouter()

STATIC = Path(__file__).resolve().parent.parent / "static"

#: What the page may load, by name: nothing from another host, no inline script or style (the
#: bars' widths are set through the CSSOM, which style-src does not govern).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load: a new release's page and script are never mixed with old ones.
    "Cache-Control": "no-cache",
}

ASSETS = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def _off(request: Request) -> JSONResponse | None:
    if request.app.state.settings.playground:
        return None
    return error_response(404, ["path"], "the playground is turned off (ERC_PLAYGROUND=false)", "not_found")


def _file(name: str, media_type: str) -> Response:
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)


@router.get("/", include_in_schema=False)
async def page(request: Request) -> Response:
    return _off(request) or _file("index.html", "text/html; charset=utf-8")


@router.get("/playground/{name}", include_in_schema=False)
async def asset(request: Request, name: str) -> Response:
    if (off := _off(request)) is not None:
        return off
    if name not in ASSETS:
        return error_response(404, ["path"], "no such playground file", "not_found")
    return _file(name, ASSETS[name])
