"""Shared fixtures: a live server in a child process and a client talking to it."""

from __future__ import annotations

import pytest

from tests.serverproc import ServerProcess, serving


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """One real server for the session's read-only integration tests."""
    with serving(tmp_path_factory.mktemp("live") / "home") as server:
        yield server


@pytest.fixture
def server_factory(tmp_path):
    """Starts servers a test owns (to stop, signal or misconfigure); kills leftovers."""
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs) -> ServerProcess:
        server = ServerProcess(tmp_path / f"home{len(started)}", *args, **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def client(live_server):
    import tlserve.client as tlclient

    with tlclient.Client(live_server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def tl(server):
    """A client of the module's own `server` fixture: each integration module
    starts the server its tests need (home, flags) and shares this client."""
    import tlserve.client as tlclient

    with tlclient.Client(server.address, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests in one thread: steadier on a shared 2-core machine, and the
    same numbers from run to run."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_datasets(tmp_path):
    """`make_datasets(*flags)`: the Datasets domain object over a fresh home (one per
    test; extra flags go to Settings), its stores closed afterwards."""
    from tlserve.service.config import Settings
    from tlserve.service.datasets import Datasets
    from tlserve.service.store.metadata import MetadataStore

    stores = []

    def make(*flags: str) -> Datasets:
        settings = Settings.load(
            ["--home", str(tmp_path / "home"), "--data-root", str(tmp_path / "data"), *flags], environ={}
        )
        settings.resolved_data_root.mkdir(exist_ok=True)
        store = MetadataStore(settings.database_path)
        stores.append(store)
        return Datasets(settings, store)

    yield make
    for store in stores:
        store.close()
