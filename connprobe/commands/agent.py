"""`connprobe agent --config FILE`: the agent (`connprobe/agent.py`) with its web server (`connprobe/web.py`),
run until SIGTERM or SIGINT; SIGHUP reloads the config and the web config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import IO

import prometheus_client

from connprobe.agent import Agent
from connprobe.config import ConfigError, is_blackbox_file
from prober.redact import install_log_redaction

log = logging.getLogger("connprobe.agent")  # the agent's own log lines

DEFAULT_LISTEN = "127.0.0.1:9516"


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", metavar="FILE",
                       help="probe configuration (YAML; a blackbox_exporter blackbox.yml is recognised and read as "
                            "with --blackbox-config)")
    which.add_argument("--blackbox-config", metavar="FILE",
                       help="a blackbox_exporter blackbox.yml instead: its modules serve /probe (no scheduled probes; "
                            "watched and reloaded like --config)")
    watch = p.add_mutually_exclusive_group()
    watch.add_argument("--config.watch", dest="config_watch", action="store_true", default=True,
                       help="reload the config when its file changes, a Kubernetes ConfigMap update included "
                            "(inotify; a stat every --config.watch-interval without it); on by default")
    watch.add_argument("--no-config-watch", dest="config_watch", action="store_false",
                       help="reload only on SIGHUP or POST /-/reload")
    p.add_argument("--config.watch-interval", dest="config_watch_interval", type=float, default=5.0,
                   metavar="SECONDS", help="how often the file is checked when inotify is not available (default 5)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address of /metrics, /probe, the status page and /-/ endpoints (default {DEFAULT_LISTEN})")
    p.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                   help="TLS, basic auth and headers of the web server, in exporter-toolkit's web-config.yml format "
                        "(re-read on reload)")
    p.add_argument("--web.allow-unauthenticated", dest="web_allow_unauthenticated", action="store_true",
                   help="listening beyond loopback without authentication, let anyone reach /probe, /-/reload, "
                        "/api/recent and the status page (default: loopback callers only)")
    p.add_argument("--web.probe-concurrency", dest="web_probe_concurrency", type=int, default=32, metavar="N",
                   help="/probe calls served at once; more get 429 (default 32)")
    p.add_argument("--web.probe-rate", dest="web_probe_rate", type=float, default=20.0, metavar="PER_SECOND",
                   help="/probe calls per second on average, bursts of twice as many; more get 429 (default 20)")
    p.add_argument("--no-kernel", action="store_true", help="do not load the kernel sensor")
    p.add_argument("--diagnose.socket", dest="diagnose_socket", metavar="PATH", default=None,
                   help="Unix socket on which `connprobe diagnose` on this node asks the agent to run its attempts "
                        "with the attached sensor; root only (default $CONNPROBE_DIAGNOSE_SOCKET or "
                        "/run/connprobe/diagnose.sock; empty: off)")
    p.add_argument("--log-json", metavar="FILE|-", help="also write every verdict as a JSON line to FILE (- = stdout)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    from connprobe.cluster.options import add_arguments as add_kubernetes_arguments

    add_kubernetes_arguments(p)
    from connprobe.cluster.options import add_mesh_arguments

    add_mesh_arguments(p)
    p.add_argument("--keep-capabilities", action="store_true",
                   help="keep every capability after start-up (default: drop all that the probes do not need)")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen: {value!r} must be HOST:PORT, e.g. 127.0.0.1:9516 or [::1]:9516")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    from connprobe.probepolicy import ProbeLimiter
    from connprobe.web import start_server
    from connprobe.webconfig import WebConfigError, load_web_config

    host, port = parse_listen(args.listen)
    web_config = getattr(args, "web_config_file", None)
    web = None
    if web_config:  # checked before anything starts (and before capabilities are dropped); re-read when serving
        try:
            web = await asyncio.to_thread(load_web_config, web_config)
        except WebConfigError as exc:
            print(f"connprobe agent: invalid --web.config.file: {exc}", file=sys.stderr)
            return 2
    stream: IO[str] | None = None
    if args.log_json == "-":
        stream = sys.stdout
    elif args.log_json:
        stream = open(args.log_json, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    blackbox = bool(getattr(args, "blackbox_config", None))
    config = args.blackbox_config if blackbox else args.config
    detected = not blackbox and is_blackbox_file(config)  # a blackbox.yml given to --config: read as one
    blackbox = blackbox or detected
    try:
        from connprobe.cluster.options import mesh_options, open_cluster_view

        mesh = mesh_options(args, port, web)  # checked before the cluster is reached
        if mesh is not None and mesh.k and host in ("127.0.0.1", "::1", "localhost"):
            log.warning("--kubernetes.mesh: this agent listens on %s only, so its peers cannot reach its /-/healthy "
                        "(listen on the node's address, as the DaemonSet does: --listen=$(NODE_IP):%d)", host, port)
        cluster = open_cluster_view(args, "connprobe agent", start=False)  # started after the capability drop
    except ValueError as exc:
        print(exc, file=sys.stderr)
        if stream not in (None, sys.stdout):
            stream.close()
        return 2
    targets = None
    if cluster is not None:
        from connprobe.targets import ConfigFile
        from connprobe.targets.cluster import ClusterTargets

        inner = ConfigFile(config, watch=getattr(args, "config_watch", False),
                           watch_options={"poll_interval": getattr(args, "config_watch_interval", 5.0)},
                           blackbox=blackbox)
        targets = ClusterTargets(inner, cluster, discovery=getattr(args, "kubernetes_discovery", False), mesh=mesh)
    agent = Agent(config, blackbox=blackbox, kernel=not args.no_kernel, log_stream=stream,
                  drop_capabilities=not args.keep_capabilities, watch_config=getattr(args, "config_watch", False),
                  watch_options={"poll_interval": getattr(args, "config_watch_interval", 5.0)}, targets=targets,
                  cluster=cluster)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if detected:
        log.info("%s: a blackbox_exporter blackbox.yml (only modules:, blackbox's module keys): read as with "
                 "--blackbox-config", config)
    try:
        await agent.start()
    except ConfigError as exc:
        if cluster is not None:
            cluster.close()
        print(f"connprobe agent: invalid configuration:\n{exc}", file=sys.stderr)
        if stream not in (None, sys.stdout):
            stream.close()
        return 2
    if cluster is not None:  # cross-node evidence: the destination's node's agent, found through the cluster
        from connprobe.cluster.peers import cluster_peers

        try:
            agent.set_cluster_resolver(cluster_peers(cluster, listen_port=port, web_config=web,
                                                     token=agent.peer_token))
        except ValueError as exc:
            await agent.stop()
            cluster.close()
            print(f"connprobe agent: {exc}", file=sys.stderr)
            if stream not in (None, sys.stdout):
                stream.close()
            return 2
    runner = None
    channel = None
    try:
        try:
            runner = await start_server(
                agent, host, port, web_config_path=web_config,
                allow_unauthenticated=getattr(args, "web_allow_unauthenticated", False),
                limiter=ProbeLimiter(getattr(args, "web_probe_concurrency", 32), getattr(args, "web_probe_rate", 20.0)))
        except WebConfigError as exc:
            print(f"connprobe agent: invalid --web.config.file: {exc}", file=sys.stderr)
            return 2
        channel = await _open_channel(agent, getattr(args, "diagnose_socket", None))
        agent.spawn(_freeze_heap_when_ready(agent), "connprobe-gc-freeze")
        scheme = "https" if runner.ssl_context is not None else "http"
        log.info("listening on %s://%s:%d/", scheme, f"[{host}]" if ":" in host else host, port)
        loop.add_signal_handler(signal.SIGHUP,
                                lambda: agent.spawn(runner.reload(trigger="signal"), "connprobe-sighup-reload"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
    except OSError as exc:
        hint = (" (a port below 1024 needs CAP_NET_BIND_SERVICE, which the agent drops before it listens: use "
                "another port or --keep-capabilities)" if agent.privileges.dropped and port < 1024 else "")
        print(f"connprobe agent: cannot listen on {args.listen}: {exc.strerror or exc}{hint}", file=sys.stderr)
        return 2
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if channel is not None:
            await channel.close()
        if runner is not None:
            await runner.cleanup()
        await agent.stop()
        if cluster is not None:
            await asyncio.to_thread(cluster.close)
        if stream not in (None, sys.stdout):
            stream.close()
    return 0


async def _open_channel(agent: Agent, path: str | None):  # -> DiagnoseChannel | None
    """The local diagnose channel (`connprobe/agentchannel.py`); a problem with it is one warning, not a stop."""
    from connprobe.agentchannel import ChannelError, DiagnoseChannel, default_socket

    if path == "":
        return None
    channel = DiagnoseChannel(agent, Path(path) if path else default_socket())
    try:
        await channel.start()
    except ChannelError as exc:
        log.warning("diagnose channel off: %s", exc)
        return None
    log.info("diagnose channel on %s (root only)", channel.path)
    return channel


async def _freeze_heap_when_ready(agent: Agent) -> None:
    """Once up, move everything allocated so far (modules, the config, every probe's metric series) out of the
    garbage collector's reach: a full collection then scans only what came later. Measured with 500 /probe
    calls at once: full collections held the event loop 44-100 ms each before, which delays every probe."""
    import gc

    await agent.wait_ready()
    gc.collect()
    gc.freeze()


def run(args: argparse.Namespace) -> int:
    # no `_created` series: about a fifth of the exposition at 1,000 probes, and nothing reads them
    prometheus_client.disable_created_metrics()
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()  # every line, tracebacks included, without the probes' secrets
    try:
        parse_listen(args.listen)
        if getattr(args, "web_probe_concurrency", 1) < 1 or not 0 < getattr(args, "web_probe_rate", 1.0) < 1e6:
            raise ValueError("--web.probe-concurrency and --web.probe-rate must be positive (the rate below a million)")
        if not 0.05 <= getattr(args, "config_watch_interval", 5.0) <= 3600:
            raise ValueError("--config.watch-interval must be between 0.05 and 3600 seconds")
    except ValueError as exc:
        print(f"connprobe agent: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop  # a welcome accelerator (~15-20 % less CPU per probe); plain asyncio works the same
    except ImportError:
        return asyncio.run(serve(args))
    return uvloop.run(serve(args))
