"""The support dashboard: static files served by the API itself (nothing from a CDN), so it
works on a closed network. The pages call the REST API with the key the user signs in with."""

from pathlib import Path
from typing import Final

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR: Final = Path(__file__).parent / "static"
# Scripts and styles from this origin only: no inline script can run even if data were
# ever rendered as markup.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    """The dashboard is the API's home page."""
    return RedirectResponse("/dashboard/")


@router.get("/dashboard/")
def dashboard() -> FileResponse:
    """The single page; routes after ``#`` are the dashboard's own."""
    return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)


def install(app: FastAPI) -> None:
    """Serve the dashboard's page and its static files."""
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
