"""`GET /users/{user_id}/recommendations?k=10&exclude_seen=true`: a user's top k now.

Every worker serves it on its HTTP port (the one with /metrics and /health). A user belongs to
one partition of `interactions` (murmur2 of its id, as the clients' producers place its
clicks), and only the worker that owns that partition holds its state. Any other worker
forwards the request to the owner and relays the owner's answer, so a client can call any
worker, or a load balancer in front of them, and needs nothing but HTTP. Forwarding rather
than a redirect: clients and balancers need not follow redirects, and the owner's address
(a worker's advertised URL) need not be reachable from outside the cluster. A request is
forwarded once at most: if the owner it reaches disagrees (a rebalance is moving the
partition), the answer is 503 with Retry-After.

The answer is computed by the owner's model thread (`ScoringAgent.answer`), between batches.
This module does what happens before and after: the path and its options, the optional bearer
token, routing, the JSON, and the window of popular items that users never seen get.
"""

from __future__ import annotations

import hmac
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass

from aiokafka.partitioner import murmur2

from streams.shared.clicks import MAX_ID_BYTES

MAX_K = 1000
OPTIONS = ("k", "exclude_seen")
FORWARDED = "X-Mlsa4rec-Forwarded-By"      # set on a request one worker sends another
SERVED_BY = "X-Mlsa4rec-Served-By"          # the worker whose state answered
RETRY_AFTER_S = 1
_PATH = re.compile(r"^/users/([^/]*)/recommendations$")


def partition_of(user_id: str, partitions: int) -> int:
    """The partition of `interactions` a user's clicks go to (Kafka's murmur2 partitioner,
    which the clients' producers use: streams/shared/clients.py)."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


class RequestError(Exception):
    """An HTTP error answer: status, the reason (the body), extra headers."""

    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


class NotReady(RequestError):
    """503: the owner cannot answer from current state now (restoring, rebalancing, busy)."""

    def __init__(self, reason: str):
        super().__init__(503, reason, {"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class Query:
    user_id: str
    k: int = 10
    exclude_seen: bool | None = None        # None: the worker's --exclude-seen


def parse(target: str, default_k: int = 10) -> Query | None:
    """The request target (path and query string) as a Query; None if the path is not this
    endpoint's; RequestError(400) with the reason for bad input."""
    path, _, query = target.partition("?")
    match = _PATH.match(path)
    if match is None:
        return None
    try:
        user_id = urllib.parse.unquote(match.group(1), errors="strict")
    except UnicodeDecodeError:
        raise RequestError(400, "the user id is not UTF-8 once percent-decoded") from None
    if not user_id:
        raise RequestError(400, "empty user id")
    if len(user_id.encode()) > MAX_ID_BYTES:
        raise RequestError(400, f"user id longer than {MAX_ID_BYTES} bytes")
    try:
        params = urllib.parse.parse_qs(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise RequestError(400, "the query string does not decode") from None
    unknown = sorted(set(params) - set(OPTIONS))
    if unknown:
        raise RequestError(400, f"unknown query option(s) {', '.join(unknown)}; "
                                f"known: {', '.join(OPTIONS)}")
    repeated = sorted(name for name, values in params.items() if len(values) > 1)
    if repeated:
        raise RequestError(400, f"query option(s) given more than once: {', '.join(repeated)}")
    out = Query(user_id, default_k)
    if "k" in params:
        text = params["k"][0]
        if not re.fullmatch(r"[0-9]{1,7}", text) or not 1 <= int(text) <= MAX_K:
            raise RequestError(400, f"k must be an integer in 1..{MAX_K}, not {text!r}")
        out.k = int(text)
    if "exclude_seen" in params:
        text = params["exclude_seen"][0].lower()
        if text not in ("true", "false"):
            raise RequestError(400, f"exclude_seen must be true or false, not {text!r}")
        out.exclude_seen = text == "true"
    return out


class PopularItems:
    """The most clicked items of the last `window_s` (two half-windows, so the count covers
    between one half and a whole window): what a user never seen gets. Counted from the
    clicks this worker applies, so from its partitions' traffic."""

    def __init__(self, window_s: float = 600.0):
        self.half = window_s / 2
        self.current, self.previous = Counter(), Counter()
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def add(self, item_ids: list[str]) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.started >= self.half:
                fresh = now - self.started >= 2 * self.half
                self.previous = Counter() if fresh else self.current
                self.current, self.started = Counter(), now
            self.current.update(item_ids)

    def top(self, k: int) -> list[tuple[str, int]]:
        with self.lock:
            total = self.current + self.previous
        return total.most_common(k)


class RecommendationsEndpoint:
    """Answers the endpoint's requests (from any HTTP thread).

    answer(query) -> dict: the local answer (the owner's model thread); raises NotReady.
    owner(user_id) -> "self", another worker's base URL, or None (no owner known now).
    """

    def __init__(self, answer, owner, self_url: str, token: str = "", timeout_s: float = 5.0,
                 default_k: int = 10):
        self.answer, self.owner, self.self_url = answer, owner, self_url
        self.token, self.timeout_s, self.default_k = token, timeout_s, default_k

    def handle(self, target: str, headers) -> tuple[int, dict, bytes] | None:
        """(status, headers, body) for a GET of `target`; None if it is not this endpoint's."""
        try:
            query = parse(target, self.default_k)
            if query is None:
                return None
            self._check_token(headers)
            owner = self.owner(query.user_id)
            if owner is None:
                raise NotReady("the user's partition has no owner now (a rebalance)")
            if owner == "self":
                return 200, {SERVED_BY: self.self_url}, _json(self.answer(query))
            if headers.get(FORWARDED):
                raise NotReady(f"forwarded here by {headers.get(FORWARDED)}, but this worker "
                               f"sees {owner} as the owner (a rebalance)")
            return self._forward(owner, target, headers)
        except RequestError as exc:
            return exc.status, exc.headers, _json({"error": exc.reason})

    def _check_token(self, headers) -> None:
        if not self.token:
            return
        given = headers.get("Authorization") or ""
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise RequestError(401, "a bearer token is required (Authorization: Bearer ...)"
                               if not given else "wrong bearer token",
                               {"WWW-Authenticate": 'Bearer realm="mlsa4rec"'})

    def _forward(self, owner: str, target: str, headers) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(owner.rstrip("/") + target,
                                         headers={FORWARDED: self.self_url})
        if headers.get("Authorization"):
            request.add_header("Authorization", headers["Authorization"])
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                status, body, reply = response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:           # the owner's own error answer
            status, body, reply = exc.code, exc.read(), exc.headers
        except OSError as exc:
            raise NotReady(f"the owner {owner} does not answer: {exc}") from None
        out = {name: reply[name] for name in (SERVED_BY, "Retry-After", "WWW-Authenticate")
               if reply.get(name)}
        return status, out, body


def _json(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()
