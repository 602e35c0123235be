"""A small synchronous mTLS client for the broker's API, used by the command line."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from broker.errors import BrokerError


class RemoteError(BrokerError):
    """The broker answered with a problem document."""

    def __init__(self, status: int, code: str, detail: str, request_id: str) -> None:
        super().__init__(f"{status} {code}: {detail}" + (f" (request {request_id})" if request_id else ""))
        self.http_status = status
        self.problem_code = code
        self.problem_detail = detail
        self.request_id = request_id

    @classmethod
    def of(cls, answer: Answer) -> RemoteError:
        """The error an answer with an error status stands for (its problem document, or what it sent)."""
        doc = answer.body if isinstance(answer.body, dict) else {}
        return cls(
            answer.status,
            str(doc.get("code") or "error"),
            str(doc.get("detail") or doc.get("title") or "no detail"),
            str(doc.get("request_id") or ""),
        )


class Unreachable(BrokerError):
    pass


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any


class BrokerClient:
    def __init__(self, address: str, context: ssl.SSLContext, timeout: float = 30) -> None:
        self.address = self._address = address.rstrip("/")
        self._context = context
        self._timeout = timeout

    def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = ()) -> Any:
        """Send one request; return the JSON answer, or raise :class:`RemoteError` for an error status."""
        answer = self.raw(method, path, body)
        if answer.status >= 400 and answer.status not in ok:
            raise RemoteError.of(answer)
        return answer.body

    def raw(self, method: str, path: str, body: Any = None) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - https:// only, checked by the caller
            self._address + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            # S310: the address is checked to be https:// where the client is built.
            with urllib.request.urlopen(request, context=self._context, timeout=self._timeout) as resp:  # noqa: S310
                return Answer(resp.status, _json(resp.read()))
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, _json(exc.read()))
        except (urllib.error.URLError, OSError) as exc:
            # urlopen wraps connection errors in URLError; an alert read later comes bare (SSLError).
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, ssl.SSLError):
                raise Unreachable(
                    f"TLS with the broker at {self._address} failed ({reason.reason or reason}): check that "
                    "--ca-cert/KEYBROKER_CACERT is the CA of the broker's certificate and that your "
                    "certificate comes from the broker's client CA and has not expired"
                ) from None
            if isinstance(reason, ConnectionResetError):  # http.client.RemoteDisconnected among them
                raise Unreachable(
                    f"the broker at {self._address} closed the connection without answering; it does that to "
                    "a client certificate not from its client CA (check --client-cert/KEYBROKER_CLIENT_CERT)"
                ) from None
            if isinstance(reason, OSError) and reason.strerror:
                reason = reason.strerror
            raise Unreachable(f"cannot reach the broker at {self._address}: {reason}") from None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {"detail": raw[:200].decode(errors="replace")}
