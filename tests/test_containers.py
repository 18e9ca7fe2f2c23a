"""Deployment: deploy/Dockerfile built and run for real with Debian's podman (as root, no registry: the base
image is made here with mmdebstrap), deploy/compose.yaml's swarm answering a chat through its gateway on
host networking, and deploy/k8s/ validated against the Kubernetes schema."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from swarmlm.launch.peers import free_port

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/swarmlm-test-base:bookworm"
IMAGE = "localhost/swarmlm:test"
MODEL = "SmolLM2-135M-Instruct"


def test_the_kubernetes_manifests_validate() -> None:
    manifests = sorted(str(p) for p in (ROOT / "deploy" / "k8s").glob("*.yaml"))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", *manifests],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = done.stdout + done.stderr
    for kind in ("statefulset/swarmlm-peer", "deployment/swarmlm-gateway", "service/swarmlm-gateway"):
        assert f"passed for resource {kind}" in kinds


def _why_no_podman() -> str | None:
    if os.geteuid() != 0:
        return "podman runs as root here (make test installs it when it runs as root)"
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed (make test installs them with apt as root)" if missing else None


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """How podman runs on these machines (../shared/NOTES.md): runc, and no default ulimits."""
    if (why := _why_no_podman()) is not None:
        pytest.skip(why)
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n')
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def run(cmd: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd[:4])}...: {(done.stdout + done.stderr)[-3000:]}"
    return done


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Dockerfile built on a Debian base made here, pip configured as this machine's (its local wheels
    and its proxy's certificate mounted for the build only)."""
    if subprocess.run(["podman", "image", "exists", BASE], env=podman_env).returncode != 0:
        rootfs = tmp_path_factory.mktemp("rootfs") / "rootfs.tar"
        run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
            ],
            podman_env,
        )
        run(["podman", "import", str(rootfs), BASE], podman_env)
    build = ["podman", "build", "--format", "docker", "--network", "host", "-f", "deploy/Dockerfile", "-t", IMAGE]
    build += ["--build-arg", f"BASE={BASE}"]
    wheels, cert = os.environ.get("PIP_FIND_LINKS"), os.environ.get("PIP_CERT")
    if wheels and Path(wheels).is_dir():  # torch from the local wheels, not the CPU index
        build += [
            "--build-arg",
            "TORCH_INDEX=",
            "--build-arg",
            f"PIP_FIND_LINKS={wheels}",
            "-v",
            f"{wheels}:{wheels}:ro",
        ]
    if cert and Path(cert).is_file():
        build += ["--build-arg", f"PIP_CERT={cert}", "-v", f"{cert}:{cert}:ro"]
    run([*build, str(ROOT)], podman_env, timeout=1500)
    return IMAGE


@pytest.fixture(scope="module")
def compose_swarm(image: str, podman_env: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    api = free_port()
    env = {**podman_env, "SWARMLM_IMAGE": image, "SWARM_PORT": str(free_port()), "API_PORT": str(api)}
    compose = [str(Path(sys.executable).parent / "podman-compose"), "-p", f"swarmlm{api}", "-f", "deploy/compose.yaml"]
    subprocess.run([*compose, "up", "-d"], env=env, cwd=ROOT, capture_output=True, timeout=300, check=True)
    try:
        yield f"http://127.0.0.1:{api}", env | {"PROJECT": f"swarmlm{api}"}
    finally:
        subprocess.run([*compose, "down", "-v"], env=env, cwd=ROOT, capture_output=True, timeout=300)


@pytest.mark.slow
def test_the_compose_swarm_answers_a_chat_through_its_gateway(compose_swarm: tuple[str, dict[str, str]]) -> None:
    base, env = compose_swarm
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}
    deadline, answer = time.monotonic() + 420, None
    while time.monotonic() < deadline:  # the peers load and measure themselves, on cores the test shares
        try:
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
            if r.status_code == 200:
                answer = r.json()
                break
        except httpx.HTTPError:
            pass
        time.sleep(3)
    assert answer is not None, "the gateway never answered"
    assert answer["choices"][0]["message"]["content"] and answer["usage"]["completion_tokens"] == 8
    gateway = f"{env['PROJECT']}_gateway_1"
    run(["podman", "healthcheck", "run", gateway], env)  # the image's HEALTHCHECK: /health answers 200
    assert run(["podman", "exec", gateway, "id", "-u"], env).stdout.strip() == "10001"  # not root
