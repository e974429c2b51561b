"""The cluster as a target source (`--kubernetes`): another source's probes (the config file's) plus what its
probes written with cluster names expand to now, and, with discovery, the Services annotated for connprobe.

    load()   = the inner source's config; its templates (`source: pod ...`, selector sources, `svc/...` targets,
               `connprobe/cluster/targets.py`) and the annotated Services' (`connprobe/targets/discovery.py`)
               expanded against the watched state; with `mesh` the node mesh's probes (`connprobe/targets/mesh.py`:
               K peer agents and the node-local essentials); what cannot be expanded now is a note (`notes`), a bad
               annotation a problem (in `notes`, the log and `connprobe_discovery_invalid_services`)
    watch()  = the inner source's watch, and a reload (`changed()`) whenever the watched cluster changes what
               `load()` would give: on watch events (0.3 s debounce), and every `resync` seconds (a new pod's
               network namespace appears without an event)

The cluster view (`ClusterView`) is started by `watch()`, i.e. after the agent dropped its capabilities, so its
threads hold no more than the probes need; until its first list the templates expand to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from typing import Any

from connprobe.cluster.targets import expand
from connprobe.config import Config, ConfigError
from connprobe.targets.discovery import AnnotationSource
from connprobe.targets.mesh import MeshOptions, mesh_probes
from connprobe.targets.source import Changed, TargetSource
from prober.spec import ModuleSpec, ProbeSpec

log = logging.getLogger("connprobe.agent")


class ClusterTargets:
    def __init__(self, inner: TargetSource, view: Any, *, discovery: bool = False, resync: float = 5.0,
                 mesh: MeshOptions | None = None) -> None:
        self.inner = inner
        self.view = view
        self.discovery = discovery
        self.mesh = mesh
        self.resync = resync
        self.notes: tuple[str, ...] = ()
        self._last_inner: Config | None = None
        self._last_probes: tuple[ProbeSpec, ...] | None = None
        self._logged: set[str] = set()

    @property
    def describe(self) -> str:
        return self.inner.describe

    async def start(self) -> None:
        await self.inner.start()

    def load(self) -> Config:
        config = self.inner.load()
        self._last_inner = config
        out = self._expand(config)
        self._last_probes = out.probes
        return out

    def _expand(self, config: Config) -> Config:
        templates = list(config.templates)
        problems: list[str] = []
        if self.discovery:
            source = AnnotationSource(config.modules, config.limits.min_interval)
            found, problems = source.templates(self.view.state.services())
            templates += found
            self.view.discovery_problems = tuple(problems)
            for p in problems:
                if p not in self._logged:
                    log.warning("annotation discovery: %s", p)
            self._logged = set(problems)
        got = expand(templates, self.view, taken=(p.name for p in config.probes))
        probes, notes = [*config.probes, *got.probes], [*problems, *got.notes]
        if self.mesh is not None:
            try:
                found, mesh_notes = mesh_probes(self.mesh, self.view, config.modules,
                                                getattr(self.view.state, "api_client", None))
            except ValueError as exc:  # --kubernetes.mesh-module names no http module of this config
                raise ConfigError([str(exc)]) from None
            taken = {p.name for p in probes}
            for p in found:
                if p.name in taken:
                    mesh_notes.append(f"{p.name}: a probe of the config has this name; the mesh's is left out")
                else:
                    probes.append(p)
            notes += mesh_notes
        self.notes = tuple(notes)
        return replace(config, probes=tuple(probes), templates=())

    def privilege_standins(self) -> list[ProbeSpec]:
        """Capabilities for what comes and goes with the cluster: setns() into pods' namespaces, and reading
        pods' /proc/PID/ns/net (the netns scan)."""
        out = [ProbeSpec(name="--kubernetes (pods' network namespaces)", module=ModuleSpec(prober="tcp", timeout=1.0),
                         target="127.0.0.1:1", source="/proc/1/ns/net")]
        if self.mesh is not None and self.mesh.source != "host":  # peers come and go: the source stays
            out.append(ProbeSpec(name="--kubernetes.mesh-source", module=ModuleSpec(prober="tcp", timeout=1.0),
                                 target="127.0.0.1:1", source=self.mesh.source))
        return out

    async def watch(self, changed: Changed) -> None:
        loop = asyncio.get_running_loop()
        poke = asyncio.Event()
        self.view.state.subscribe(lambda *_: loop.call_soon_threadsafe(poke.set))
        self.view.start()
        inner = asyncio.create_task(self.inner.watch(changed), name="connprobe-targets-inner-watch")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poke.wait(), self.resync)
                await asyncio.sleep(0.3)  # a burst of watch events is one look
                poke.clear()
                if self._last_inner is None:
                    continue
                try:
                    probes = (await asyncio.to_thread(self._expand, self._last_inner)).probes
                except Exception as exc:  # a passing problem: logged, the last state stays
                    log.error("cluster targets: %s: %s", type(exc).__name__, exc)
                    continue
                if probes != self._last_probes:
                    await changed()
        finally:
            inner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inner
