"""The dashboard: a static page (HTML, JavaScript, CSS shipped in ``dcrouter/api/static``, no build step, no
CDN) that the management API serves at ``/`` without a token. The page holds no data: it asks the API with
the token the operator types in, kept in the tab's sessionStorage, and follows ``/api/v1/events`` with
``fetch()`` streaming (an ``EventSource`` cannot send an ``Authorization`` header). Served with a strict
Content-Security-Policy: scripts, styles and connections to this origin only, no inline code, no framing."""

from __future__ import annotations

from importlib import resources

from twisted.web.resource import Resource
from twisted.web.server import Request

#: Nothing but this origin's own files and API; no inline script or style, no framing, no forms, no plugins.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: URL path → (file in dcrouter/api/static, content type).
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


class DashboardFile(Resource):
    """One file of the dashboard, read once when built (a few kilobytes)."""

    isLeaf = True

    def __init__(self, name: str, content_type: str) -> None:
        super().__init__()
        self.body = resources.files("dcrouter.api").joinpath("static", name).read_bytes()
        self.content_type = content_type

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader("Allow", "GET, HEAD")
            return b""
        return super().render(request)  # type: ignore[no-any-return]

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("Content-Type", self.content_type)
        request.setHeader("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        request.setHeader("X-Content-Type-Options", "nosniff")
        request.setHeader("X-Frame-Options", "DENY")
        request.setHeader("Referrer-Policy", "no-referrer")
        request.setHeader("Cache-Control", "no-cache")
        return self.body

    def render_HEAD(self, request: Request) -> bytes:
        self.render_GET(request)
        return b""


def dashboard_files() -> dict[str, DashboardFile]:
    """Each path of the dashboard and the resource that serves it."""
    return {path: DashboardFile(name, content_type) for path, (name, content_type) in FILES.items()}
