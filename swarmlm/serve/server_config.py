"""The settings of an API server: `swarmlm serve` (`ServeConfig`) and a peer's gateway (`GatewayConfig`).

Kept apart from server.py and gateway.py, which load the engine and the HTTP stack: the command line
reads these dataclasses to build its options, and `swarmlm -h` must not wait for PyTorch to import.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarmlm.core.settings import ADAPTERS_HELP, setting, size_setting
from swarmlm.core.sizes import KV_DEFAULT_MAX, KV_RESERVE_TOKENS, MAX_MEMORY_HELP

MODEL_HELP = "A .gguf file or HF model directory (default: embedded SmolLM2-135M-Instruct)"
API_KEYS_HELP = "API key file (`swarmlm keys create`): every /v1 call needs one of its keys"
PROTECT_METRICS_HELP = "With --api-keys: /metrics and /dashboard need a key too"
SERVED_NAME_HELP = "The model's name in the API (/v1/models, requests' model field; default: its folder's or file's)"
CHAT_TEMPLATE_HELP = "A Jinja chat template file, for a model that has none (an exported base model) or another"
CHAT_MAX_TOKENS_HELP = "Tokens a chat completion generates when the request gives no max_tokens (at most the context)"
SSL_CERTFILE_HELP = "Serve HTTPS: the certificate chain (PEM), with --ssl-keyfile"
SSL_KEYFILE_HELP = "Serve HTTPS: the certificate's private key (PEM)"


@dataclass
class ServeConfig:
    model: str | None = setting(None, help=MODEL_HELP)
    host: str = setting("127.0.0.1", help="Address to listen on")
    port: int = setting(8000, help="Port to listen on (1-65535)")
    scheduler: str = setting("mlfq", help="mlfq (FastServe skip-join MLFQ) or fcfs", choices=("mlfq", "fcfs"))
    fair: bool = setting(False, help="Per-user fairness (virtual token counters) over the scheduler")
    max_memory: int | None = size_setting(help=MAX_MEMORY_HELP + "; a model that needs more is refused before loading")
    kv_budget: int | None = size_setting(
        help=f"KV cache budget, e.g. 2GiB (default: what --max-memory leaves after the weights, at most "
        f"{KV_DEFAULT_MAX >> 30} GiB; at least {KV_RESERVE_TOKENS} tokens' worth must fit)"
    )
    dtype: str = setting("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    quant: str = setting("none", help="Weight-only quantization on CPU: none, int8 or int4")
    device: str = setting("auto", help="auto, cpu or cuda")
    adapters: list[str] = setting(help=ADAPTERS_HELP, factory=list, metavar="NAME=PATH")
    max_batch_seqs: int = setting(32, help="Most sequences in one step")
    max_step_tokens: int = setting(256, help="Most tokens in one step (prefill chunk budget)")
    max_model_len: int | None = setting(None, help="Context limit (default: the model's)")
    max_queued_requests: int = setting(256, help="Queue bound; beyond it requests get 429")
    max_queued_tokens: int = setting(262144, help="Prompt tokens the queue may hold; beyond them requests get 429")
    mlfq_quantum: float = setting(0.25, help="MLFQ base quantum in seconds (doubles per level)")
    starvation: float = setting(10.0, help="MLFQ: seconds of waiting before promotion to the top")
    api_keys: str | None = setting(None, help=API_KEYS_HELP)
    protect_metrics: bool = setting(False, help=PROTECT_METRICS_HELP)
    served_model_name: str | None = setting(None, help=SERVED_NAME_HELP, metavar="NAME")
    chat_template: str | None = setting(None, help=CHAT_TEMPLATE_HELP, metavar="FILE")
    chat_max_tokens: int = setting(1024, help=CHAT_MAX_TOKENS_HELP)
    ssl_certfile: str | None = setting(None, help=SSL_CERTFILE_HELP, metavar="FILE")
    ssl_keyfile: str | None = setting(None, help=SSL_KEYFILE_HELP, metavar="FILE")


@dataclass
class GatewayConfig:
    api: str | None = setting(
        None, help="HOST:PORT: also serve the OpenAI API and /dashboard, backed by the swarm", metavar="HOST:PORT"
    )
    max_batch_seqs: int = setting(32, help="With --api: sequences the gateway runs at once")
    micro_batches: int = setting(
        0,
        help="With --api: groups the running sequences flow through the chain in, one behind the other "
        "(0: one per machine serving layers, at most 4; peers on one machine share its cores)",
    )
    wire_dtype: str = setting(
        "bf16",
        help="With --api: the format of hidden states between peers (fp32: the single-process engine's "
        "greedy text through any number of hops; bf16: half the bytes, may flip a close greedy choice)",
        choices=("bf16", "fp16", "fp32"),
    )
    api_keys: str | None = setting(None, help=API_KEYS_HELP)
    protect_metrics: bool = setting(False, help=PROTECT_METRICS_HELP)
    served_model_name: str | None = setting(None, help="With --api: " + SERVED_NAME_HELP, metavar="NAME")
    chat_template: str | None = setting(None, help="With --api: " + CHAT_TEMPLATE_HELP, metavar="FILE")
    chat_max_tokens: int = setting(1024, help="With --api: " + CHAT_MAX_TOKENS_HELP)
    ssl_certfile: str | None = setting(None, help="With --api: " + SSL_CERTFILE_HELP, metavar="FILE")
    ssl_keyfile: str | None = setting(None, help="With --api: " + SSL_KEYFILE_HELP, metavar="FILE")


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """Both TLS files or neither, and a pair that loads. Raises ValueError with a message for the user."""
    if (certfile is None) != (keyfile is None):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together: give both to serve HTTPS")
    if certfile is None:
        return
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: {e.strerror or e}") from e


def read_chat_template(path: str) -> str:
    """The text of a --chat-template file, checked to be a Jinja template. Raises ValueError with a message
    for the user."""
    import jinja2

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from e
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template {path}: not a Jinja template: {e.message} (line {e.lineno})") from e
    return text


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port). Raises ValueError with a message for the user."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--api must be HOST:PORT with a port in 1-65535 (e.g. 127.0.0.1:8000), not {address!r}")
    return host, int(port)
