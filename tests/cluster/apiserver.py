"""A stand-in Kubernetes API server for tests: the list/watch protocol as the official client uses it.

- `GET /api/v1/pods?fieldSelector=spec.nodeName=N` (and services, nodes, namespaces,
  `/apis/discovery.k8s.io/v1/endpointslices`): a `...List` with `metadata.resourceVersion`.
- `?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=T`: a chunked stream of JSON lines
  `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}` replaying every change after N, then
  following new ones until the timeout.
- A version older than the compaction point is 410 Gone: as an ERROR event with a `Status` object (what a
  real server does for watches) or, with `gone_as_http=True`, as the HTTP status.
- Bearer token auth (401 Status without the right token), dropped connections (`drop_watches()`), a server
  that is down for a while (`stop()`, then `start()` on the same port).
- Every request is recorded (`requests`: path and decoded query).
"""

from __future__ import annotations

import copy
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATHS = {
    "/api/v1/pods": ("Pod", "v1"),
    "/api/v1/services": ("Service", "v1"),
    "/api/v1/nodes": ("Node", "v1"),
    "/api/v1/namespaces": ("Namespace", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
}
KIND_PATH = {kind: path for path, (kind, _) in PATHS.items()}


def status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeApiServer:
    def __init__(self, token: str = "s3cret-token", tls: tuple[str, str] | None = None) -> None:
        """`tls`: (certificate file, key file) to serve HTTPS, as a real API server does."""
        self.token = token
        self.tls = tls
        self.gone_as_http = False
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._rv = 100
        self._objects: dict[str, dict[str, dict]] = {path: {} for path in PATHS}
        self._events: list[tuple[int, str, str, dict]] = []  # (rv, path, type, object)
        self._compacted = 0
        self._generation = 0  # bumped to drop every open watch
        self._pending_bookmarks: dict[str, int] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self._running = False
        self._conns: set[socket.socket] = set()

    # -- lifecycle
    def start(self) -> FakeApiServer:
        server = self

        class Handler(_Handler):
            api = server

        httpd = _QuietServer(("127.0.0.1", self.port), Handler, bind_and_activate=False)
        httpd.allow_reuse_address = True
        httpd.daemon_threads = False
        httpd.block_on_close = True
        httpd.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        httpd.server_bind()
        httpd.server_activate()
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        with self._cond:
            self._running = True
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=False)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (a server that is down)."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive connections too
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()  # joins the handler threads
            self._httpd = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def kubeconfig(self, path, token: str | None = None) -> str:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": token if token is not None else self.token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "agent"}}],
            "current-context": "stand-in",
        }
        path.write_text(json.dumps(cfg))
        return str(path)

    # -- the data
    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def apply(self, obj: dict, type_: str | None = None) -> int:
        """Create or update `obj` (a dict shaped as the API returns it); returns its new resourceVersion."""
        kind = obj["kind"]
        path = KIND_PATH[kind]
        with self._cond:
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["apiVersion"] = PATHS[path][1]
            obj["metadata"]["resourceVersion"] = str(self._rv)
            key = _key(obj)
            existed = key in self._objects[path]
            self._objects[path][key] = obj
            self._events.append((self._rv, path, type_ or ("MODIFIED" if existed else "ADDED"), obj))
            self._cond.notify_all()
            return self._rv

    def delete(self, kind: str, namespace: str | None, name: str) -> int:
        path = KIND_PATH[kind]
        with self._cond:
            key = f"{namespace}/{name}" if namespace else name
            obj = self._objects[path].pop(key)
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._events.append((self._rv, path, "DELETED", obj))
            self._cond.notify_all()
            return self._rv

    def compact(self) -> None:
        """Forget every event so far: a watch from an older version gets 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._events.clear()

    def bump_silently(self, n: int = 1) -> int:
        """Changes elsewhere in the cluster: the version moves on, nothing for this watch."""
        with self._cond:
            self._rv += n
            return self._rv

    def bookmark(self, kind: str) -> None:
        with self._cond:
            self._pending_bookmarks[KIND_PATH[kind]] = self._pending_bookmarks.get(KIND_PATH[kind], 0) + 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def watches_of(self, kind: str) -> list[dict[str, str]]:
        path = KIND_PATH[kind]
        return [q for p, q in list(self.requests) if p == path and q.get("watch") == "true"]

    def lists_of(self, kind: str) -> list[dict[str, str]]:
        path = KIND_PATH[kind]
        return [q for p, q in list(self.requests) if p == path and q.get("watch") != "true"]

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.01)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # clients hanging up is part of the tests
        pass


def _key(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


def _selected(obj: dict, field_selector: str | None) -> bool:
    if not field_selector:
        return True
    for term in field_selector.split(","):
        name, _, value = term.partition("=")
        if name == "spec.nodeName" and (obj.get("spec") or {}).get("nodeName") != value:
            return False
        if name == "metadata.name" and obj["metadata"]["name"] != value:
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: FakeApiServer

    def setup(self) -> None:
        super().setup()
        with self.api._cond:
            self.api._conns.add(self.connection)

    def finish(self) -> None:
        with self.api._cond:
            self.api._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        api = self.api
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        api.requests.append((url.path, query))
        scheme, _, credentials = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or credentials != api.token:  # the scheme is case-insensitive (RFC 7235)
            self._send_json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        if url.path not in PATHS:
            self._send_json(404, status(404, "NotFound", f"the server could not find {url.path}"))
            return
        kind, api_version = PATHS[url.path]
        selector = query.get("fieldSelector")
        if query.get("watch") == "true":
            self._watch(url.path, query, selector)
            return
        with api._cond:
            items = [copy.deepcopy(o) for o in api._objects[url.path].values() if _selected(o, selector)]
            rv = api._rv
        for item in items:  # list items carry no kind/apiVersion, as in the real API
            item.pop("kind", None)
            item.pop("apiVersion", None)
        self._send_json(
            200,
            {
                "kind": f"{kind}List",
                "apiVersion": api_version,
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            },
        )

    def _chunk(self, obj: dict) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, path: str, query: dict[str, str], selector: str | None) -> None:
        api = self.api
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        with api._cond:
            too_old = since < api._compacted
            generation = api._generation
        if too_old and api.gone_as_http:
            self._send_json(410, status(410, "Expired", f"too old resource version: {since} ({api._compacted})"))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if too_old:
                self._chunk(
                    {
                        "type": "ERROR",
                        "object": status(410, "Expired", f"too old resource version: {since} ({api._compacted})"),
                    }
                )
                self.wfile.write(b"0\r\n\r\n")
                return
            sent = since
            while True:
                with api._cond:
                    while True:
                        if not api._running or api._generation != generation:
                            # dropped: cut the connection without the closing chunk
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        pending = [e for e in api._events if e[0] > sent and e[1] == path]
                        bookmarks = api._pending_bookmarks.pop(path, 0)
                        if pending or bookmarks:
                            break
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self.wfile.write(b"0\r\n\r\n")
                            return
                        api._cond.wait(min(left, 0.05))
                    current = api._rv
                for rv, _, type_, obj in pending:
                    sent = rv
                    if _selected(obj, selector):
                        self._chunk({"type": type_, "object": obj})
                for _ in range(bookmarks):
                    kind, api_version = PATHS[path]
                    self._chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": kind,
                                "apiVersion": api_version,
                                "metadata": {"resourceVersion": str(current)},
                            },
                        }
                    )
                    sent = max(sent, current)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
