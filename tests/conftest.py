import os

# Several torch processes on 2 cores: don't let idle OpenMP threads spin (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = os.environ.get("PRUNEKIT_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's cache unless PRUNEKIT_CACHE is set by the CI."""
    if "PRUNEKIT_CACHE" not in os.environ:
        monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    if "PRUNEKIT_LATENCY_CACHE" not in os.environ:  # measured layer timings: one cache per test session
        monkeypatch.setenv("PRUNEKIT_LATENCY_CACHE", str(tmp_path_factory.getbasetemp() / "latency"))


@pytest.fixture(scope="session")
def shared_data():
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(os.path.join(path, "fashion-mnist")):
        pytest.skip("real data (../shared/data) not available")
    return path
