"""One way to hide secrets wherever the node shows configuration: `config show`, the API,
the dashboard and the audit trail.

A secret is a password or token value, the password part of a URL's user information
(``scheme://user:password@host``, including an empty user as in ``redis://:pw@host`` and a
password that itself holds ``@``), and URL query parameters whose name says they are one
(``token``, ``password``, ``key``, ...). What is masked becomes :data:`MASK`; a masked value
sent back unchanged is recognised by :func:`is_masked` and means "keep the secret".
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

MASK = "**********"
_SECRET_PARAMS = re.compile(r"(?i)(pass|pwd|token|secret|key|auth|signature|credential)")


def mask_url(url: str) -> str:
    """``url`` with the password in its user information and secret query values masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK  # not a URL anyone can read safely: show nothing of it
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")  # the last "@": a password may hold one
    if at:
        user, colon, password = userinfo.partition(":")
        if colon and password:
            netloc = f"{user}:{MASK}@{host}"
        elif not colon and _SECRET_PARAMS.search(user) is None and len(user) > 24:
            netloc = f"{MASK}@{host}"  # a long bare userinfo is a token (https://TOKEN@host)
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAMS.search(name) for name, _ in pairs):
            query = urlencode(
                [(n, MASK if _SECRET_PARAMS.search(n) else v) for n, v in pairs], safe="*"
            )
    # Replace in place rather than reassemble: urlunsplit would rewrite "sqlite:////path".
    masked = url.replace(parts.netloc, netloc, 1) if netloc != parts.netloc else url
    return masked.replace(f"?{parts.query}", f"?{query}", 1) if query != parts.query else masked


def mask_value(value: object) -> object:
    """A secret setting's value as shown: None stays None, anything else is :data:`MASK`."""
    return None if value is None else MASK


def is_masked(value: object) -> bool:
    """True for a value that is, or holds, the mask: a secret sent back as it was shown."""
    return isinstance(value, str) and MASK in value
