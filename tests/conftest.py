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
    config.addinivalue_line("markers", "standin: runs twice, computing on the CPU and on the stand-in accelerator")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("standin") is not None:
        metafunc.parametrize("computation", ["cpu", "standin"], indirect=True)


def _to_standin(value):
    return "standin" if str(value).strip().lower() == "cpu" else value


@pytest.fixture(autouse=True)
def computation(request, monkeypatch):
    """Where a test's models compute. In a test marked ``standin`` this is "cpu", then
    "standin": there every config that computes on the CPU computes on the stand-in
    accelerator instead (its preparing and computation device; onload/offload "cpu" stay the
    host's RAM), and the presets fill ``{device}`` with it, so the same test runs the CUDA
    code paths under the stand-in's copy engine (vram/standin.py)."""
    kind = getattr(request, "param", "cpu")
    if kind == "standin":
        import vram
        import presets.files
        from_dict = vram.VramConfig.from_dict.__func__

        def standin_from_dict(cls, config, **overrides):
            if isinstance(config, dict):
                config = dict(config)
                for key in ("preparing_device", "computation_device"):
                    config[key] = _to_standin(config.get(key, "cpu"))
            return from_dict(cls, config, **overrides)
        monkeypatch.setattr(vram.VramConfig, "from_dict", classmethod(standin_from_dict))
        monkeypatch.setattr(presets.files, "default_compute", lambda: (vram.config.STANDIN, torch.float32))
    yield kind


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def release_managed_models(computation):
    """Each test starts with a manager holding nothing: a test that fails half-way must not
    leave its models (and their caps) behind for the next one. Under the stand-in, nothing
    it allocated may outlive them. The ledger's device peaks start from the test's start."""
    import vram
    manager = vram.get_manager()
    for device in manager.stats()["devices"]:
        manager.reset_peak(device)
    yield
    for record in vram.get_manager().models():
        try:
            vram.release(record.module)
        except Exception:
            vram.get_manager().unregister(record)
    from vram import standin
    for engine in standin.engines():
        engine.synchronize()
        assert engine.live_buffers == 0, \
            f"{engine.live_buffers} buffers on {vram.config.device_name(engine.device)} outlived their models"


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
