"""Cluster state from the Kubernetes API server: list, then watch, and keep slim records in memory.

One `Reflector` per resource kind runs in its own (non-daemon) thread, the way client-go's reflector does:

- it lists (paged), remembers the list's `resourceVersion`, then watches from it with
  `allowWatchBookmarks=true`; a BOOKMARK only moves the version forward;
- a watch that ends (server timeout, dropped connection) is resumed from the last version seen;
- `410 Gone` — as the HTTP status or as an ERROR event carrying a `Status` with code 410 — means the version
  is too old: list again, and turn the difference into ADDED/MODIFIED/DELETED for the consumers;
- while the API server cannot be reached (or refuses the credentials) it retries with exponential backoff
  and jitter, keeps the last known state, and says so: `ClusterState.stale` / `stale_since` / `last_error`,
  and the `connprobe_cluster_state_stale` gauge from `collect()`.

What is watched: this node's Pods (field selector `spec.nodeName=NODE`) and the cluster's Services,
EndpointSlices (`discovery.k8s.io/v1`), Nodes and Namespaces. Objects are reduced to the few fields identity,
targets and the mesh need (`PodInfo`, `ServiceInfo`, ...) so memory grows with the object count, not with
the objects' size. Lists and watch events are decoded as plain JSON (not into the client's models).

Consumers read the store (`pod()`, `pods()`, `service()`, ...) or subscribe a callback
`(kind, event_type, old, new)` called from the watch thread after each change.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("connprobe.cluster")

POD, SERVICE, ENDPOINT_SLICE, NODE, NAMESPACE = "pods", "services", "endpointslices", "nodes", "namespaces"
KINDS = (POD, SERVICE, ENDPOINT_SLICE, NODE, NAMESPACE)
ANNOTATION_PREFIX = "connprobe.io/"


class ClusterConfigError(Exception):
    """The API server's address or credentials could not be loaded (one line, names the source)."""


class _Gone(Exception):
    """410: the resourceVersion is too old; list again."""


# ---------------------------------------------------------------------------------------------------------
# Slim records: only what identity, targets and the mesh read.


@dataclass(frozen=True, slots=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    node: str
    ips: tuple[str, ...]
    phase: str
    host_network: bool
    owner_kind: str | None
    owner_name: str | None
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def holds_ips(self) -> bool:
        """A pod holds its IPs until it terminates; a host-network pod's IP is the node's."""
        return not self.host_network and self.phase not in ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    addresses: tuple[str, ...]
    ready: bool
    pod_uid: str | None
    pod_namespace: str | None
    pod_name: str | None
    node: str | None


@dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    uid: str
    namespace: str
    name: str
    service: str | None
    endpoints: tuple[EndpointInfo, ...]
    ports: tuple[tuple[str | None, int | None, str], ...]


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    uid: str
    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]
    ports: tuple[tuple[str | None, int, str], ...]
    selector: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    uid: str
    ready: bool
    addresses: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _controller(meta: Mapping[str, Any]) -> tuple[str | None, str | None]:
    refs = meta.get("ownerReferences") or ()
    for ref in refs:
        if ref.get("controller"):
            return ref.get("kind"), ref.get("name")
    if refs:
        return refs[0].get("kind"), refs[0].get("name")
    return None, None


def slim_pod(obj: Mapping[str, Any]) -> PodInfo:
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    ips = tuple(p["ip"] for p in status.get("podIPs") or () if p.get("ip"))
    if not ips and status.get("podIP"):
        ips = (status["podIP"],)
    kind, name = _controller(meta)
    return PodInfo(
        uid=meta.get("uid", ""),
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        node=spec.get("nodeName") or "",
        ips=ips,
        phase=status.get("phase") or "Unknown",
        host_network=bool(spec.get("hostNetwork")),
        owner_kind=kind,
        owner_name=name,
        labels=dict(meta.get("labels") or {}),
    )


def slim_service(obj: Mapping[str, Any]) -> ServiceInfo:
    meta, spec = _meta(obj), obj.get("spec") or {}
    ips = tuple(ip for ip in spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []))
    ips = tuple(ip for ip in ips if ip and ip != "None")
    ports = tuple((p.get("name"), int(p.get("port", 0)), p.get("protocol", "TCP")) for p in spec.get("ports") or ())
    notes = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(ANNOTATION_PREFIX)}
    return ServiceInfo(
        uid=meta.get("uid", ""),
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        type=spec.get("type") or "ClusterIP",
        cluster_ips=ips,
        ports=ports,
        selector=dict(spec.get("selector") or {}),
        annotations=notes,
    )


def slim_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSliceInfo:
    meta = _meta(obj)
    endpoints = []
    for ep in obj.get("endpoints") or ():
        ref = ep.get("targetRef") or {}
        is_pod = ref.get("kind") == "Pod"
        ready = (ep.get("conditions") or {}).get("ready")
        endpoints.append(
            EndpointInfo(
                addresses=tuple(ep.get("addresses") or ()),
                ready=ready is not False,  # unset means ready (API semantics)
                pod_uid=ref.get("uid") if is_pod else None,
                pod_namespace=(ref.get("namespace") or meta.get("namespace")) if is_pod else None,
                pod_name=ref.get("name") if is_pod else None,
                node=ep.get("nodeName"),
            )
        )
    ports = tuple((p.get("name"), p.get("port"), p.get("protocol", "TCP")) for p in obj.get("ports") or ())
    return EndpointSliceInfo(
        uid=meta.get("uid", ""),
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        service=(meta.get("labels") or {}).get("kubernetes.io/service-name"),
        endpoints=tuple(endpoints),
        ports=ports,
    )


def slim_node(obj: Mapping[str, Any]) -> NodeInfo:
    meta, status = _meta(obj), obj.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    addresses = tuple((a.get("type", ""), a.get("address", "")) for a in status.get("addresses") or ())
    return NodeInfo(name=meta.get("name", ""), uid=meta.get("uid", ""), ready=ready, addresses=addresses)


def slim_namespace(obj: Mapping[str, Any]) -> NamespaceInfo:
    meta = _meta(obj)
    return NamespaceInfo(name=meta.get("name", ""), uid=meta.get("uid", ""), labels=dict(meta.get("labels") or {}))


def _key(kind: str, obj: Mapping[str, Any]) -> str:
    meta = _meta(obj)
    if kind == POD:
        return meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
    if kind in (SERVICE, ENDPOINT_SLICE):
        return f"{meta.get('namespace')}/{meta.get('name')}"
    return meta.get("name", "")


_SLIM: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    POD: slim_pod,
    SERVICE: slim_service,
    ENDPOINT_SLICE: slim_endpoint_slice,
    NODE: slim_node,
    NAMESPACE: slim_namespace,
}


# ---------------------------------------------------------------------------------------------------------
# Client configuration


def load_api_client(kubeconfig: str | os.PathLike[str] | None = None, *, context: str | None = None) -> k8s.ApiClient:
    """An ApiClient from a kubeconfig file, or, without one, from the pod's service account (in-cluster).

    Raises ClusterConfigError with one line naming the source when it cannot be loaded.
    """
    configuration = k8s.Configuration()
    if kubeconfig is not None:
        try:
            k8s_config.load_kube_config(
                config_file=os.fspath(kubeconfig), context=context, client_configuration=configuration
            )
        except (k8s_config.ConfigException, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ClusterConfigError(f"kubeconfig {os.fspath(kubeconfig)}: {_one_line(e)}") from None
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except (k8s_config.ConfigException, OSError) as e:
            raise ClusterConfigError(f"in-cluster config: {_one_line(e)}") from None
    # The reflectors retry with their own backoff (and say so); urllib3's silent retries would only hide it.
    configuration.retries = urllib3.util.Retry(total=0, redirect=0, raise_on_status=False)
    # One connection per watched kind, plus a spare for lists.
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, len(KINDS) + 1)
    return k8s.ApiClient(configuration)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _describe_error(kind: str, op: str, e: BaseException) -> str:
    if isinstance(e, ApiException):
        reason = e.reason or ""
        hint = {401: " (the token was refused)", 403: " (RBAC does not allow it)"}.get(e.status or 0, "")
        if e.status == 0:
            return f"{kind} {op}: {_one_line(Exception(reason))}"
        return f"{kind} {op}: HTTP {e.status} {reason}{hint}".rstrip()
    if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
        e = e.reason
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        return f"{kind} {op}: cannot connect to the API server ({_short_os_error(e)})"
    if isinstance(e, urllib3.exceptions.ProtocolError):
        inner = e.args[1] if len(e.args) > 1 else e
        return f"{kind} {op}: connection to the API server lost ({type(inner).__name__})"
    return f"{kind} {op}: {type(e).__name__}: {_one_line(e)}"


def _short_os_error(e: BaseException) -> str:
    text = str(e)
    marker = "] "
    return text.split(marker, 1)[1] if marker in text else _one_line(e)


# ---------------------------------------------------------------------------------------------------------
# The reflector: one thread per kind


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits between half and all of min(cap, base * 2**n)."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rnd: random.Random) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(attempt, 30)))
        return ceiling * (0.5 + rnd.random() / 2)


class Reflector:
    def __init__(
        self,
        state: ClusterState,
        kind: str,
        list_fn: Callable[..., Any],
        *,
        field_selector: str | None,
        watch_timeout: int,
        connect_timeout: float,
        backoff: Backoff,
        rnd: random.Random,
        page_size: int,
    ) -> None:
        self.kind = kind
        self._state = state
        self._list_fn = list_fn
        self._field_selector = field_selector
        self._watch_timeout = watch_timeout
        self._connect_timeout = connect_timeout
        self._backoff = backoff
        self._rnd = rnd
        self._page_size = page_size
        self._stop = threading.Event()
        self._resp: Any = None
        self._resp_lock = threading.Lock()
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.stale_since: float | None = None
        self.last_error: str | None = None
        self.relists = 0
        self.bookmarks = 0
        self.drops = 0
        self.thread = threading.Thread(target=self._run, name=f"connprobe-watch-{kind}", daemon=False)

    # -- the loop
    def _run(self) -> None:
        need_list, failures, quick = True, 0, 0
        while not self._stop.is_set():
            op = "list" if need_list else "watch"
            try:
                if need_list:
                    self._list()
                    need_list, failures = False, 0
                op = "watch"
                started = time.monotonic()
                carried = self._watch()
                failures = 0  # only a watch that was established and ended cleanly resets the backoff
                if carried == 0 and time.monotonic() - started < 1.0:
                    # A watch that ends at once with nothing in it, again and again, must not spin.
                    quick += 1
                    self._stop.wait(self._backoff.delay(quick - 1, self._rnd))
                else:
                    quick = 0
            except _Gone:
                log.info("%s: resourceVersion %s is gone (410): listing again", self.kind, self.resource_version)
                need_list = True
            except Exception as e:
                if self._stop.is_set():
                    break
                if isinstance(e, ApiException) and e.status == 410 and op == "watch":
                    need_list = True
                    continue
                self._mark_stale(_describe_error(self.kind, op, e))
                self._stop.wait(self._backoff.delay(failures, self._rnd))
                failures += 1

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"_preload_content": False}
        if self._field_selector:
            params["field_selector"] = self._field_selector
        return params

    def _list(self) -> None:
        objs: list[Mapping[str, Any]] = []
        token: str | None = None
        while True:
            params = self._params() | {"limit": self._page_size, "_request_timeout": (self._connect_timeout, 60)}
            if token:
                params["_continue"] = token
            resp = self._call(**params)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            objs.extend(body.get("items") or ())
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        if self._stop.is_set():
            return
        self.resource_version = meta.get("resourceVersion")
        if self.synced.is_set():
            self.relists += 1
        self._state._replace(self.kind, {_key(self.kind, o): _SLIM[self.kind](o) for o in objs})
        self._mark_fresh()
        self.synced.set()

    def _call(self, **params: Any) -> Any:
        if self._stop.is_set():
            raise _Stopped
        return self._list_fn(**params)

    def _watch(self) -> int:
        """Watch from the last version until the stream ends; the number of events it carried."""
        params = self._params() | {
            "watch": True,
            "resource_version": self.resource_version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": self._watch_timeout,
            # The read timeout is a backstop; a stop shuts the socket down.
            "_request_timeout": (self._connect_timeout, self._watch_timeout + 15),
        }
        resp = self._call(**params)
        with self._resp_lock:
            self._resp = resp
        if self._stop.is_set():
            self._shutdown_response()
        self._mark_fresh()
        events = 0
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return events
                if not line.strip():
                    continue
                self._handle(json.loads(line))
                events += 1
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError, OSError) as e:
            # The stream broke after it was established: resume from the last version at once; a server
            # that is really gone shows on the reconnect.
            if not self._stop.is_set():
                self.drops += 1
                log.info("%s watch dropped (%s): resuming from %s", self.kind, _one_line(e), self.resource_version)
        finally:
            with self._resp_lock:
                self._resp = None
            resp.close()
            resp.release_conn()
        return events

    def _handle(self, event: Mapping[str, Any]) -> None:
        etype, obj = event.get("type"), event.get("object") or {}
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise _Gone
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
        rv = _meta(obj).get("resourceVersion")
        if etype == "BOOKMARK":
            self.bookmarks += 1
        elif etype in ("ADDED", "MODIFIED"):
            self._state._upsert(self.kind, _key(self.kind, obj), _SLIM[self.kind](obj))
        elif etype == "DELETED":
            self._state._delete(self.kind, _key(self.kind, obj))
        else:
            log.warning("%s watch: unknown event type %r ignored", self.kind, etype)
            return
        if rv:
            self.resource_version = rv

    # -- staleness
    def _mark_stale(self, message: str) -> None:
        if self.stale_since is None:
            self.stale_since = self._state._clock()
        if message != self.last_error:
            log.warning("kubernetes API: %s; keeping the last known state", message)
        self.last_error = message

    def _mark_fresh(self) -> None:
        if self.stale_since is not None:
            log.info("kubernetes API: %s reachable again", self.kind)
        self.stale_since = None
        self.last_error = None

    # -- lifecycle
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._shutdown_response()

    def _shutdown_response(self) -> None:
        with self._resp_lock:
            resp = self._resp
        if resp is None:
            return
        conn = getattr(resp, "connection", None) or getattr(resp, "_connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Stopped(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
# The store


Listener = Callable[[str, str, Any, Any], None]

_INDEXED: dict[str, Callable[[Any], str]] = {
    POD: lambda pod: pod.namespace,
    SERVICE: lambda svc: svc.namespace,
    ENDPOINT_SLICE: lambda eps: f"{eps.namespace}/{eps.service}",
}


class ClusterState:
    """The informer: a store of slim records per kind, fed by one reflector thread per kind.

    `ClusterState(api_client, node_name="n1")`, then `start()`, `wait_synced(timeout)`, and `close()` (joins
    every thread; also a context manager). `api_client` comes from `load_api_client()`.
    """

    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        node_name: str,
        kinds: Iterable[str] = KINDS,
        watch_timeout: int = 300,
        connect_timeout: float = 5.0,
        backoff: Backoff = Backoff(),
        page_size: int = 500,
        clock: Callable[[], float] = time.time,
        rnd: random.Random | None = None,
        own_client: bool = True,
    ) -> None:
        if not node_name or not isinstance(node_name, str):
            raise ValueError(f"node_name: must be the name of this node, got {node_name!r}")
        kinds = tuple(kinds)
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"kinds: {kind!r} is not one of {', '.join(KINDS)}")
        self.node_name = node_name
        self._api_client = api_client
        self._own_client = own_client
        self._clock = clock
        self._lock = threading.RLock()
        self._store: dict[str, dict[str, Any]] = {kind: {} for kind in kinds}
        # Secondary indexes (client-go's Indexers): pods and services by namespace, slices by "ns/service".
        self._index: dict[str, dict[str, set[str]]] = {kind: {} for kind in _INDEXED if kind in kinds}
        self._listeners: list[Listener] = []
        core, discovery = k8s.CoreV1Api(api_client), k8s.DiscoveryV1Api(api_client)
        list_fns = {
            POD: core.list_pod_for_all_namespaces,
            SERVICE: core.list_service_for_all_namespaces,
            ENDPOINT_SLICE: discovery.list_endpoint_slice_for_all_namespaces,
            NODE: core.list_node,
            NAMESPACE: core.list_namespace,
        }
        rnd = rnd or random.Random()
        self.reflectors = {
            kind: Reflector(
                self,
                kind,
                list_fns[kind],
                field_selector=f"spec.nodeName={node_name}" if kind == POD else None,
                watch_timeout=watch_timeout,
                connect_timeout=connect_timeout,
                backoff=backoff,
                rnd=rnd,
                page_size=page_size,
            )
            for kind in kinds
        }
        self._started = False

    # -- lifecycle
    def start(self) -> ClusterState:
        if not self._started:
            self._started = True
            for r in self.reflectors.values():
                r.start()
        return self

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True when every kind has been listed once (client-go's HasSynced)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self.reflectors.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.synced.wait(left):
                return False
        return True

    @property
    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors.values())

    def close(self) -> None:
        for r in self.reflectors.values():
            r.stop()
        for r in self.reflectors.values():
            if r.thread.is_alive() or r.thread.ident is not None:
                r.thread.join()
        if self._own_client:
            self._api_client.close()

    def __enter__(self) -> ClusterState:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- staleness
    @property
    def stale(self) -> bool:
        return any(r.stale_since is not None for r in self.reflectors.values())

    @property
    def stale_since(self) -> float | None:
        times = [r.stale_since for r in self.reflectors.values() if r.stale_since is not None]
        return min(times) if times else None

    @property
    def last_error(self) -> str | None:
        for r in self.reflectors.values():
            if r.last_error:
                return r.last_error
        return None

    def collect(self) -> Iterator[Any]:
        """Prometheus collector: staleness, objects held and relists per kind."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stale = GaugeMetricFamily(
            "connprobe_cluster_state_stale",
            "1 while the Kubernetes API server cannot be read and the last known state is used",
        )
        stale.add_metric([], 1.0 if self.stale else 0.0)
        yield stale
        since = GaugeMetricFamily(
            "connprobe_cluster_state_stale_since_seconds",
            "Unix time since when the cluster state is stale (0 when fresh)",
        )
        since.add_metric([], self.stale_since or 0.0)
        yield since
        objects = GaugeMetricFamily("connprobe_cluster_objects", "Objects held per kind", labels=["kind"])
        relists = CounterMetricFamily(
            "connprobe_cluster_relists", "Lists after 410 Gone (watch too old) per kind", labels=["kind"]
        )
        up = GaugeMetricFamily(
            "connprobe_cluster_watch_up",
            "1 while a kind's list+watch is synced and its last request to the API server succeeded",
            labels=["kind"],
        )
        drops = CounterMetricFamily(
            "connprobe_cluster_watch_drops", "Watch streams broken after they were established, per kind",
            labels=["kind"],
        )
        bookmarks = CounterMetricFamily(
            "connprobe_cluster_watch_bookmarks", "BOOKMARK events received per kind", labels=["kind"]
        )
        with self._lock:
            counts = {kind: len(items) for kind, items in self._store.items()}
        for kind, r in self.reflectors.items():
            objects.add_metric([kind], counts[kind])
            relists.add_metric([kind], r.relists)
            up.add_metric([kind], 1.0 if r.synced.is_set() and r.stale_since is None else 0.0)
            drops.add_metric([kind], r.drops)
            bookmarks.add_metric([kind], r.bookmarks)
        yield objects
        yield relists
        yield up
        yield drops
        yield bookmarks

    # -- consumers
    def subscribe(self, listener: Listener, *, replay: bool = False) -> None:
        """Call `listener(kind, event_type, old, new)` after every change (from a watch thread).

        With `replay=True` it is first handed every object already held as ADDED, atomically with the
        subscription (client-go's AddEventHandler), so it misses nothing and sees no deletion out of order.
        """
        with self._lock:
            self._listeners.append(listener)
            if replay:
                for kind, items in self._store.items():
                    for item in items.values():
                        listener(kind, "ADDED", None, item)

    def items(self, kind: str, index: str | None = None) -> list[Any]:
        """Every object of `kind`, or those whose index value is `index` (kinds not watched: none)."""
        with self._lock:
            store = self._store.get(kind, {})
            if index is None:
                return list(store.values())
            return [store[key] for key in self._index[kind].get(index, ())]

    def _get(self, kind: str, key: str) -> Any:
        with self._lock:
            return self._store.get(kind, {}).get(key)

    def pods(self, namespace: str | None = None) -> list[PodInfo]:
        return self.items(POD, namespace)

    def pod(self, uid: str) -> PodInfo | None:
        return self._get(POD, uid)

    def services(self, namespace: str | None = None) -> list[ServiceInfo]:
        return self.items(SERVICE, namespace)

    def service(self, namespace: str, name: str) -> ServiceInfo | None:
        return self._get(SERVICE, f"{namespace}/{name}")

    def endpoint_slices(self, namespace: str | None = None, service: str | None = None) -> list[EndpointSliceInfo]:
        """All slices, a namespace's, or (both given) the slices of one service, from the index."""
        if namespace is not None and service is not None:
            return self.items(ENDPOINT_SLICE, f"{namespace}/{service}")
        return [s for s in self.items(ENDPOINT_SLICE) if namespace is None or s.namespace == namespace]

    @property
    def api_client(self) -> k8s.ApiClient:
        """The client it lists and watches with (its configuration: the API server's URL and CA)."""
        return self._api_client

    def nodes(self) -> list[NodeInfo]:
        return self.items(NODE)

    def node(self, name: str) -> NodeInfo | None:
        return self._get(NODE, name)

    def namespaces(self) -> list[NamespaceInfo]:
        return self.items(NAMESPACE)

    # -- fed by the reflectors
    def _notify(self, kind: str, etype: str, old: Any, new: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, etype, old, new)
            except Exception as e:
                log.error("cluster state listener %r failed on %s %s: %s", listener, etype, kind, _one_line(e))

    def _reindex(self, kind: str, key: str, old: Any, new: Any) -> None:
        index = self._index.get(kind)
        if index is None:
            return
        of = _INDEXED[kind]
        if old is not None:
            keys = index.get(of(old))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[of(old)]
        if new is not None:
            index.setdefault(of(new), set()).add(key)

    def _upsert(self, kind: str, key: str, new: Any) -> None:
        with self._lock:
            old = self._store[kind].get(key)
            self._store[kind][key] = new
            self._reindex(kind, key, old, new)
            if old != new:
                self._notify(kind, "MODIFIED" if old is not None else "ADDED", old, new)

    def _delete(self, kind: str, key: str) -> None:
        with self._lock:
            old = self._store[kind].pop(key, None)
            if old is not None:
                self._reindex(kind, key, old, None)
                self._notify(kind, "DELETED", old, None)

    def _replace(self, kind: str, items: dict[str, Any]) -> None:
        with self._lock:
            for key in [k for k in self._store[kind] if k not in items]:
                self._delete(kind, key)
            for key, new in items.items():
                self._upsert(kind, key, new)
