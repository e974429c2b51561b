"""Cross-node evidence with --kubernetes: which agent answers for a destination address, from the cluster.

    destination IP --ClusterView.node_of--> node --its InternalIP (else ExternalIP)--> SCHEME://ADDR:PORT

PORT and SCHEME are this agent's own (`--listen`, TLS of `--web.config.file`): the DaemonSet runs every agent
alike, on the node's address (hostNetwork). Over https a peer must present the shared certificate (the web
config's `cert_file`, trusted as the anchor: pinned, whatever name it carries). The credential is the
`node.peer_token_file` bearer token every agent shares. A Service's virtual IP has no node: the asker looks up
the endpoint the connection was DNAT'ed to (conntrack) and asks this resolver again for that endpoint.

`ClusterPeers.no_peer_reason(addr)` says why nobody is asked about an address: "no agent known for IP …" when the
cluster does not place it (outside the cluster, a pod no EndpointSlice names, a node without an address) — a
fact in the verdict; None when the address is on this node (its own evidence is the node's).
"""

from __future__ import annotations

import ipaddress
import ssl
from typing import Any

from connprobe.crossnode import Peer
from connprobe.targets.mesh import node_address  # the node mesh reaches a peer agent the same way


def pinned_context(cert_file: str) -> ssl.SSLContext:
    """A client TLS context that trusts exactly the shared certificate (OSError/SSLError when unreadable)."""
    ctx = ssl.create_default_context(cafile=cert_file)
    ctx.check_hostname = False  # peers are reached by address; the certificate itself is the anchor
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


class ClusterPeers:
    """A `connprobe.crossnode.Resolver` over a `ClusterView`: destination IP → pod → node → that node's agent."""

    def __init__(self, view: Any, *, port: int, scheme: str = "http", token: bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None, timeout: float = 0.5):
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme: {scheme!r} must be http or https")
        if not 0 < port < 65536:
            raise ValueError(f"port: {port} is out of range (1..65535)")
        self.view, self.port, self.scheme = view, port, scheme
        self.token, self.ssl_context, self.timeout = token, ssl_context, timeout
        self._peers: dict[str, Peer] = {}

    def __bool__(self) -> bool:
        return True

    def _node(self, addr: str) -> str | None:
        try:
            ip = str(ipaddress.ip_address(addr.split("%", 1)[0]))
        except ValueError:
            return None
        return self.view.node_of(ip)

    def peer_for(self, addr: str) -> Peer | None:
        node = self._node(addr)
        if node is None or node == self.view.node_name:
            return None
        info = self.view.state.node(node)
        host = node_address(info) if info is not None else None
        if host is None:
            return None
        host = str(ipaddress.ip_address(host))
        url = f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"
        peer = self._peers.get(url)
        if peer is None:
            if len(self._peers) > 4096:  # node addresses change rarely; never grow without bound
                self._peers.clear()
            peer = self._peers[url] = Peer(url, self.token, self.ssl_context, self.timeout)
        return peer

    def no_peer_reason(self, addr: str) -> str | None:
        node = self._node(addr)
        if node is not None and node == self.view.node_name:
            return None
        if node is None:
            return f"no agent known for IP {addr}"
        return f"no agent known for IP {addr}: node {node} has no address"



def cluster_peers(view: Any, *, listen_port: int, web_config: Any = None, token: bytes | None = None,
                  timeout: float = 0.5) -> ClusterPeers:
    """The agent's cluster resolver: peers listen as this agent does (the same port; https with the shared
    certificate, also presented as this agent's client certificate, when `web_config` has TLS). ValueError: one
    line naming the file."""
    tls = getattr(web_config, "tls", None)
    ctx = None
    if tls is not None:
        from prober.tlsinfo import EncryptedKey, no_passphrase

        try:
            ctx = pinned_context(tls.cert_file)
            ctx.load_cert_chain(tls.cert_file, tls.key_file, password=no_passphrase)
        except EncryptedKey as exc:
            raise ValueError(f"--kubernetes: peers' TLS: key_file {tls.key_file}: {exc}") from None
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--kubernetes: peers' TLS: {tls.cert_file}: {exc}") from None
    return ClusterPeers(view, port=listen_port, scheme="https" if tls is not None else "http", token=token,
                        ssl_context=ctx, timeout=timeout)
