import os
import sys
import tempfile
from pathlib import Path

import pytest

# As `import vram` does when it loads before torch (see vram/__init__.py): idle OpenMP threads
# sleep instead of spinning, so the reader thread gets a core. conftest imports torch first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The planner's calibration file: not the user's, and fresh per test session.
os.environ["LOWVRAM_CALIBRATION"] = os.path.join(tempfile.mkdtemp(prefix="lowvram-test-"), "calibration.json")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU; skipped without CUDA")
    config.addinivalue_line("markers", "slow: builds a model of a GiB or more")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def release_managed_models():
    """Each test starts with a manager holding nothing: a test that fails half-way must not
    leave its models (and their caps) behind for the next one."""
    yield
    import vram
    for record in vram.get_manager().models():
        try:
            vram.release(record.module)
        except Exception:
            vram.get_manager().unregister(record)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """``tiny_family(name)``: the folder of a tiny pipeline of that family (see families.py),
    built once per session. Tests that might write must copy it first."""
    import families
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = families.build_family(name, root / name)
        return built[name]
    return get


@pytest.fixture(scope="session")
def app_server(tiny_family, tmp_path_factory):
    """``python app.py`` serving on a free port, with the tiny SDXL pipeline as the local model
    ``tiny-sdxl`` (see app_harness.py); shared by the app's tests, stopped at the end."""
    from app_harness import AppServer
    server = AppServer(tmp_path_factory.mktemp("app"), tiny_family("sdxl"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def app_client(app_server):
    from gradio_client import Client
    return Client(app_server.url, verbose=False)
