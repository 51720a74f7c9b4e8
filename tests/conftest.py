"""Shared pytest fixtures. Each section is self-contained; keep new sections below this one."""

from __future__ import annotations

# ======================================================================================================
# Local Hub (tests/hub_server.py): a Hub-compatible HTTP server on 127.0.0.1 for push/pull tests.
#
# Why this section runs at import time:
#   huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET once, when it is first imported (its
#   `constants` module), and transformers / datasets import it. pytest imports this conftest before any
#   test module, so the variables are set here, before anything imports huggingface_hub. A port is
#   reserved now by binding a socket without listening on it: connections are refused at once until a
#   test asks for the server, and no other process can take the port in the meantime.
#   - HF_ENDPOINT points every Hub call of the test session at that port, never at huggingface.co.
#   - HF_HUB_DISABLE_XET=1: with hf_xet installed, huggingface_hub 2.x uploads through Xet; the variable
#     forces the git-LFS batch protocol that the test server implements.
#   - HF_HUB_DISABLE_IMPLICIT_TOKEN=1: a token saved on the machine is never sent to the test server;
#     tests pass tokens explicitly.
#
# HF_HUB_OFFLINE: the test command sets HF_HUB_OFFLINE=1 for the whole session, and huggingface_hub
#   turns it into `huggingface_hub.constants.HF_HUB_OFFLINE` at import. Every offline check (the HTTP
#   client's request hook, `is_offline_mode()`, which transformers calls before each download) reads that
#   module attribute at call time, so the `local_hub` fixture sets it to False for the duration of one
#   test with `monkeypatch` and restores it afterwards: other tests keep running offline. Subprocesses
#   (e.g. `trust_remote_code` loading without the package) get HF_HUB_OFFLINE=0 in their environment
#   instead, see `local_hub_subprocess_env`.
# ======================================================================================================
import os
import sys

import pytest

if os.path.dirname(__file__) not in sys.path:  # pytest's default import mode already put it there
    sys.path.insert(0, os.path.dirname(__file__))
from hub_server import LocalHubServer, reserve_local_port

_HUB_IMPORTED_EARLY = "huggingface_hub" in sys.modules  # True only if a plugin imported it before us
_HUB_SOCKET = reserve_local_port()
LOCAL_HUB_URL = "http://{}:{}".format(*_HUB_SOCKET.getsockname()[:2])
os.environ["HF_ENDPOINT"] = LOCAL_HUB_URL
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory):
    """The session's local Hub server (started on first use, stopped at the end of the session)."""
    import huggingface_hub.constants as hub_constants

    if _HUB_IMPORTED_EARLY or hub_constants.ENDPOINT != LOCAL_HUB_URL:
        pytest.fail(
            f"huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT (it uses "
            f"{hub_constants.ENDPOINT!r}, expected {LOCAL_HUB_URL!r}). Remove the early import (a pytest "
            "plugin or a conftest above tests/) so that the local Hub tests cannot reach another host."
        )
    server = LocalHubServer(tmp_path_factory.mktemp("local_hub_store"), sock=_HUB_SOCKET).start()
    yield server
    server.stop()


@pytest.fixture
def local_hub(
    hub_server: LocalHubServer, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    """The local Hub, with this test online (HF_HUB_OFFLINE off) and a fresh, empty HF cache.

    The cache is redirected so that downloads from the test server never land in (or come from) the
    user's real cache, whose folder names do not record the endpoint.
    """
    import huggingface_hub.constants as hub_constants

    cache_dir = tmp_path_factory.mktemp("hf_hub_cache")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # read by code that checks the environment directly
    hub_server.clear_faults()
    hub_server.clear_requests()  # so that a test sees only its own requests
    yield hub_server
    hub_server.clear_faults()


@pytest.fixture
def local_hub_subprocess_env(
    local_hub: LocalHubServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """A minimal environment for a child Python that talks to the local Hub.

    No PYTHONPATH (the child does not see `src/`), online, a private HF_HOME (cache and remote-code modules).
    """
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    env.update(
        HF_ENDPOINT=LOCAL_HUB_URL,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path_factory.mktemp("child_hf_home")),
        HOME=str(tmp_path_factory.mktemp("child_home")),
    )
    return env


# ======================================================================================================
# End of the local Hub section.
# ======================================================================================================
