"""Test settings shared by every test: offline, deterministic, quiet."""

import os

# Nothing may reach the network at test time (the Hub is not reachable here anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_home(tmp_path_factory, monkeypatch):
    """Every test starts from the same seed and a private HF cache."""
    torch.manual_seed(0)
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_MODULES_CACHE", str(home / "modules"))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Benchmarks and the CLI's --threads set torch's thread count for the process; a test that leaves it changed
    would make later bit-exact comparisons with a subprocess (which starts with torch's default) depend on order."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
