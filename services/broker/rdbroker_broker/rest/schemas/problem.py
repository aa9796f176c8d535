"""The error shape of every route (RFC 9457); rest/problems.py writes it."""

from __future__ import annotations

from pydantic import BaseModel


class FieldError(BaseModel):
    location: str
    message: str


class Problem(BaseModel):
    """An error (RFC 9457, `application/problem+json`)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    errors: list[FieldError] | None = None
