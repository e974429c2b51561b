from __future__ import annotations

import threading

import pytest

from connprobe.cluster.state import Backoff, ClusterState, load_api_client
from tests.cluster.apiserver import FakeApiServer


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("connprobe-watch-")]


@pytest.fixture
def api():
    server = FakeApiServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_state(api, tmp_path):
    """ClusterState against the stand-in, through a kubeconfig with a bearer token; closed at teardown,
    and no watch thread may be left behind."""
    made: list[ClusterState] = []

    def make(token: str | None = None, **kwargs) -> ClusterState:
        client = load_api_client(api.kubeconfig(tmp_path / f"kubeconfig-{len(made)}", token=token))
        kwargs.setdefault("watch_timeout", 30)
        kwargs.setdefault("backoff", Backoff(base=0.02, cap=0.2))
        state = ClusterState(client, node_name="n1", **kwargs)
        made.append(state)
        return state

    yield make
    for state in made:
        state.close()
    assert _watch_threads() == []
