"""`ProbeEnv`: what every probe run shares — the local-port callback that announces each socket before
its first packet, an optional resolv.conf override, the long-lived HTTP clients, the overrun count.
"""

from __future__ import annotations

from prober.resolve import ResolvConf
from prober.sockets import PortCallback, close_socket_pools, no_callback


class ProbeEnv:
    """What probes share: the local-port callback and long-lived HTTP clients (one set per loop).

    Use as `async with ProbeEnv(on_local_port=cb) as env:`; closing it closes every client.
    """

    def __init__(self, on_local_port: PortCallback = no_callback, resolv_conf: ResolvConf | None = None):
        self.on_local_port = on_local_port
        self.resolv_conf = resolv_conf  # overrides every source's resolv.conf (tests, pods)
        self.clients: dict[object, object] = {}
        self.overruns = 0  # runs that did not end by their deadline (ended by a guard; reported as internal)

    async def aclose(self) -> None:
        close_socket_pools()
        clients, self.clients = self.clients, {}
        for client in clients.values():
            close = getattr(client, "aclose", None) or client.close
            await close()

    async def __aenter__(self) -> ProbeEnv:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
