"""The web playground: ``GET /`` and its static files (``api/static/``: plain HTML, CSS and JavaScript
modules, no build step, nothing from a CDN). The page is public, like any static asset; everything it
shows comes from the key-protected REST API, called from the browser with the key the user enters
(docs/API.md, "Web page")."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parents[1] / "static"

#: Only this origin may serve scripts, styles and connections: the page works offline and can load
#: nothing from elsewhere. Images come from the API as blobs (they need the key), hence ``blob:``.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
#: The page changes with the service version; a browser revalidates rather than keep a stale script.
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(tags=["page"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_HEADERS)


class _Static(StaticFiles):
    """StaticFiles with the page's headers on every file."""

    async def get_response(self, path: str, scope: Scope):  # type: ignore[no-untyped-def]
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


static_files = _Static(directory=STATIC)
