"""``/docs`` and ``/redoc`` that say what they need when they cannot load.

FastAPI's pages load Swagger UI and ReDoc from cdn.jsdelivr.net. No installed package ships
those files (FastAPI does not; ``swagger-ui-bundle`` or ``fastapi-offline`` would, and neither
is a dependency), so they are not served from here, and a browser without internet access
showed a blank page. The pages below are FastAPI's with a note at the top, in plain HTML that
needs no script: what the page loads from where, and that the schema itself is served by this
service at ``/openapi.json``. A small inline script removes the note once the viewer has
loaded, so online nothing changes.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

NOTE = (
    '<div id="offline-note" style="font-family: sans-serif; padding: 1em; '
    'background: #fff4ce; border-bottom: 1px solid #d6b656">'
    "This page loads {viewer} from {cdn}. If you can read this note and nothing below it, "
    "that host cannot be reached from your browser. The API schema itself is served by this "
    'service: <a href="{openapi}">{openapi}</a> (OpenAPI JSON, readable by any OpenAPI viewer '
    "or editor). The viewer's files are not served locally: no installed package ships them."
    "</div>"
)
CDN = "cdn.jsdelivr.net"


def _with_note(page: HTMLResponse, viewer: str, ready_when: str, openapi: str) -> HTMLResponse:
    """``page`` with the note after ``<body>`` and a script that drops it once ``ready_when``
    (a JavaScript expression) is true."""
    note = NOTE.format(viewer=viewer, cdn=CDN, openapi=openapi)
    drop = (
        "<script>window.addEventListener('load', function () {"
        f"if ({ready_when}) document.getElementById('offline-note').remove();"
        "});</script>"
    )
    html = bytes(page.body).decode()
    html = html.replace("<body>", "<body>\n" + note, 1).replace("</body>", drop + "\n</body>", 1)
    return HTMLResponse(html)


def install_docs(app: FastAPI) -> None:
    """``GET /docs`` (Swagger UI) and ``GET /redoc``; create the app with ``docs_url=None,
    redoc_url=None``. ``/openapi.json`` stays FastAPI's."""
    openapi = app.openapi_url or "/openapi.json"

    async def swagger() -> HTMLResponse:
        page = get_swagger_ui_html(openapi_url=openapi, title=f"{app.title} - Swagger UI")
        return _with_note(page, "Swagger UI", "window.SwaggerUIBundle", openapi)

    async def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url=openapi, title=f"{app.title} - ReDoc")
        return _with_note(page, "ReDoc", "window.Redoc", openapi)

    app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
