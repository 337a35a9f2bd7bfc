"""Security headers on every HTTP response, and the API description behind a token.

Every answer says ``X-Content-Type-Options: nosniff`` (a browser never second-guesses a
DICOM, JSON or report body as something it would run) and carries a Content-Security-Policy
that lets a page load only the node's own scripts and styles and never be framed by another
site. The interactive API description (Swagger UI, which loads its code from a CDN and runs
one inline script) gets a policy that allows exactly that, on its own page only.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'self'"
)
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "img-src 'self' data: https://fastapi.tiangolo.com; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
DOCS_PATH = "/docs"


class SecurityHeaders:
    """ASGI middleware: adds the headers to every response, errors and streams included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_CSP if scope.get("path") == DOCS_PATH else CSP

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() not in (b"x-content-type-options", b"content-security-policy")
                ]
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"content-security-policy", policy.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
