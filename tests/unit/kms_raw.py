"""A keep-alive HTTP connection to a KMS under test that sends exact bytes (no client library in between) and
reconnects when the server closes it."""

from __future__ import annotations

import http.client


class RawConnection:
    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def send(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST ``body`` to / with ``headers``: (status, response body); one retry on a closed connection."""
        for attempt in (0, 1):
            try:
                self.conn.request("POST", "/", body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.conn.close()
                return response.status, data
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                if attempt:
                    raise
        raise AssertionError("unreachable")
