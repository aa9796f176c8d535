"""Calling a pool's power hook: one signed JSON POST, retried with tenacity (docs/power.md).

A 2xx answer means the receiver took the request (the start or stop is under way; the probes say
when it is done). 408, 429, 5xx and transport errors are retried, each attempt signed afresh with a
new timestamp and the same delivery id (a receiver may drop repeats by it), until `retry_s` has
passed; any other answer is a refusal and is not retried.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from rdbroker_common import power as signing

log = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({408, 425, 429})
USER_AGENT = "rdbroker-power-hooks/1"


class HookFailed(Exception):
    """The hook did not take the request; the message says what it answered (or why none)."""


class _Again(HookFailed):
    """Worth another attempt."""


class HookClient:
    def __init__(
        self,
        secret: str,
        *,
        timeout_s: float = 10.0,
        retry_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("no power hook secret")
        self._secret = secret.encode("utf-8")
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._transport = transport
        self._clock = clock

    def request(self, payload: dict[str, Any], delivery: str) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one attempt."""
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
        timestamp = str(int(self._clock()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            signing.TIMESTAMP_HEADER: timestamp,
            signing.SIGNATURE_HEADER: signing.sign(self._secret, timestamp, body),
            signing.DELIVERY_HEADER: delivery,
        }
        return body, headers

    async def call(self, url: str, payload: dict[str, Any]) -> None:
        """POST `payload` to `url` until it is taken; raises HookFailed."""
        delivery = uuid.uuid4().hex
        async with httpx.AsyncClient(
            transport=self._transport, timeout=self.timeout_s, follow_redirects=False
        ) as client:
            retrying = AsyncRetrying(
                stop=stop_after_delay(self.retry_s),
                wait=wait_exponential(multiplier=0.5, max=10),
                retry=retry_if_exception_type(_Again),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    await self._once(client, url, payload, delivery)

    async def _once(
        self, client: httpx.AsyncClient, url: str, payload: dict[str, Any], delivery: str
    ) -> None:
        body, headers = self.request(payload, delivery)
        try:
            answer = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.info("power hook %s: %s (retrying)", url, exc)
            raise _Again(f"no answer from {url}: {exc}") from exc
        if answer.is_success:
            return
        text = answer.text[:200]
        if answer.status_code >= 500 or answer.status_code in RETRIED_STATUSES:
            log.info("power hook %s answered %d (retrying)", url, answer.status_code)
            raise _Again(f"{url} answered {answer.status_code}: {text}")
        raise HookFailed(f"{url} refused the request ({answer.status_code}): {text}")
