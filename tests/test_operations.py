"""What operators set besides flags: a TOML config file and SWARMLM_* environment variables (precedence
flag > environment > file > default), where logs go and in which format, and HTTPS for the API, through
the real command line and a real server."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarmlm.launch.peers import free_port
from tests.test_cli_errors import USAGE, assert_error


def swarmlm(*args: str, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SWARMLM_SERVE_")} | (env or {})
    cmd = [sys.executable, "-m", "swarmlm.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=environment, **kwargs)  # type: ignore[call-overload]


def test_flag_over_environment_over_file_over_default(tmp_path: Path) -> None:
    """Each source's port is out of range, so the error names the one that won."""
    config = tmp_path / "swarmlm.toml"
    config.write_text("[serve]\nport = 70001\nmax-batch-seqs = 4\n")
    assert_error(swarmlm("--config", str(config), "serve"), USAGE, "70001")
    env = {"SWARMLM_SERVE_PORT": "70002"}
    assert_error(swarmlm("--config", str(config), "serve", env=env), USAGE, "70002")
    assert_error(swarmlm("--config", str(config), "serve", "--port", "70003", env=env), USAGE, "70003")
    assert_error(swarmlm("serve", env={"SWARMLM_CONFIG": str(config)}), USAGE, "70001")  # the file by variable


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[serve\nport = 1", "not TOML"),
        ("[serv]\nport = 8000", "[serv] is not a command"),
        ("[serve]\nprot = 8000", "`serve` has no option --prot"),
        ('[serve]\nport = "eight"', "Invalid value for '--port'"),
    ],
)
def test_a_bad_config_file(tmp_path: Path, text: str, words: str) -> None:
    config = tmp_path / "swarmlm.toml"
    config.write_text(text)
    assert_error(swarmlm("--config", str(config), "serve"), USAGE, words)


def test_bad_log_settings_and_tls_files(tmp_path: Path) -> None:
    assert_error(swarmlm("--log-level", "loud", "serve"), USAGE, "--log-level 'loud'")
    assert_error(swarmlm("--log-format", "xml", "serve"), USAGE, "--log-format 'xml'")
    assert_error(swarmlm("--config", str(tmp_path / "none.toml"), "serve"), USAGE, "cannot be read")
    assert_error(swarmlm("serve", "--ssl-certfile", "cert.pem"), USAGE, "go together")
    missing = ("--ssl-certfile", str(tmp_path / "c.pem"), "--ssl-keyfile", str(tmp_path / "k.pem"))
    assert_error(swarmlm("serve", *missing), USAGE, "--ssl-certfile")


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certfile, keyfile


def test_an_https_server_set_up_by_file_and_environment_logs_json(tiny_llama: Path, tmp_path: Path) -> None:
    """The file gives the model, port and TLS files, the environment the served name; the API answers over
    HTTPS only, and every log line (uvicorn's access lines too) is a JSON object in the log file."""
    certfile, keyfile = self_signed(tmp_path)
    port = free_port()
    config = tmp_path / "swarmlm.toml"
    config.write_text(
        f'[serve]\nmodel = "{tiny_llama}"\nport = {port}\nssl-certfile = "{certfile}"\nssl_keyfile = "{keyfile}"\n'
    )
    log = tmp_path / "swarmlm.log"
    args = ["--config", str(config), "--log-format", "json", "--log-file", str(log), "serve"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMLM_SERVE_")}
    cmd = [sys.executable, "-m", "swarmlm.cli", *args]
    proc = subprocess.Popen(cmd, env=env | {"SWARMLM_SERVE_SERVED_MODEL_NAME": "ops-model"}, start_new_session=True)
    try:
        with httpx.Client(base_url=f"https://localhost:{port}", verify=str(certfile), timeout=5) as client:
            for _ in range(240):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert proc.poll() is None, "the server exited"
                    subprocess.run(["sleep", "0.5"])
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["ops-model"]
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)
