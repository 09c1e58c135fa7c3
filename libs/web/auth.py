"""The token check of the API: anything that changes the experiment needs
`Authorization: Bearer TOKEN`; reading needs none. Where the token comes from: access.py.
"""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="the web process's token (printed at its start, or in "
                                                   "its --token-file)")


def requires(token: str):
    """A FastAPI dependency: 401 without credentials, 403 with a wrong token."""

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "commands need the token: send 'Authorization: Bearer TOKEN' (the token is "
                                     "printed when the web process starts, or kept in its --token-file)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(403, "wrong token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    return check
