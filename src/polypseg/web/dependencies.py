"""What the routers get from the app, passed explicitly through ``Depends``.

``create_app`` puts the service, the settings and the samples folder on ``app.state``; handlers
ask for them with the ``Annotated`` aliases below instead of closing over ``create_app``'s locals.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from polypseg.data.review import ReviewStore
from polypseg.web.api_errors import ApiError
from polypseg.web.service import InferenceService
from polypseg.web.settings import WebSettings

bearer = HTTPBearer(auto_error=False, description="Needed only when the server was started with a token.")


def get_service(request: Request) -> InferenceService:
    """The app's inference service."""
    return request.app.state.service


def get_settings(request: Request) -> WebSettings:
    """The app's limits and options."""
    return request.app.state.settings


def get_samples_dir(request: Request) -> Path | None:
    """The folder of sample images the app serves, or ``None`` when it has none."""
    return request.app.state.samples_dir


def get_review_store(request: Request) -> ReviewStore | None:
    """The review folder's store (``--review-dir``), or ``None`` when the server keeps no reviews."""
    return request.app.state.review_store


ServiceDep = Annotated[InferenceService, Depends(get_service)]
SettingsDep = Annotated[WebSettings, Depends(get_settings)]
SamplesDirDep = Annotated[Path | None, Depends(get_samples_dir)]
ReviewStoreDep = Annotated[ReviewStore | None, Depends(get_review_store)]


async def require_token(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Refuse the request (401) unless it carries the server's token; no-op when the server has none."""
    if settings.token is None:
        return
    if credentials is None:
        raise ApiError(
            401,
            "this server needs an access token: send 'Authorization: Bearer <token>'",
            "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(credentials.credentials.encode(), settings.token.encode()):
        raise ApiError(
            401,
            "the access token was refused: it is not this server's token",
            "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )


TOKEN_REQUIRED = [Depends(require_token)]
