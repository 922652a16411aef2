"""Every setting of the service, read from the environment once and validated at start.

One class, one README table (README.md, "Settings"). An explicit argument beats the
environment (`Settings(model_path=...)` in tests); a bad value fails at start with a message that
names the variable, never on the first request.

API keys: `API_KEY` may hold several keys separated by commas. Instead, `API_KEY_SECRET_ARN`
(AWS Secrets Manager) or `API_KEY_SSM_PARAMETER` (SSM Parameter Store, decrypted) names where to
read them with boto3 at start; see `resolve_api_keys`. With none of the three, auth is off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from handler.engine import EngineConfig

# Lambda's synchronous invoke payload limit (request and response, each): 6 MB.
LAMBDA_RESPONSE_LIMIT = 6 * 1024 * 1024
# Cloud Run's limit for a non-streamed HTTP/1 response: 32 MiB.
CLOUD_RUN_RESPONSE_LIMIT = 32 * 1024 * 1024
# AWS: "at 1,769 MB, a function has the equivalent of one vCPU"; at most 6 vCPUs (10,240 MB).
LAMBDA_MB_PER_VCPU = 1769
LAMBDA_MAX_VCPUS = 6

Platform = Literal["lambda", "cloud_run", "other"]


class Settings(BaseSettings):
    """Field names are the environment variables, case-insensitive (`MODEL_PATH` -> model_path)."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, validate_default=True
    )

    # ---- models -------------------------------------------------------------------------------
    model_path: str = Field(
        default="",
        description="Directory made by `python -m model_build --out DIR`; several, comma-separated "
        "(the first is the default model).",
    )
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int | None = Field(default=None, ge=1)
    batch_token_budget: int = Field(default=16384, ge=64)
    # The corpus jobs' (handler.batch) passes: a job keeps every pass full, so the budget sets
    # its peak memory. On the full-size int8 model, 300 passages of 64-256 tokens took 2.3 GiB peak
    # RSS at 16384 (3.7 GiB over 2,000, too close to the worker's 4 GiB) and 1.1 GiB at 4096,
    # which was also faster (718 against 635 tokens/s on 2 cores).
    job_batch_token_budget: int = Field(default=4096, ge=64)
    # Concurrent requests to one model share forward passes (handler/engine/microbatch.py).
    # Unset: on, except on Lambda (see `micro_batching`).
    micro_batch: bool | None = None
    micro_batch_wait_ms: float = Field(default=0.0, ge=0.0, le=50.0)
    model_verify: Literal["sha256", "size", "off"] = "sha256"
    warmup: bool = True
    # Entries of each model's in-process LRU cache of per-input outputs (handler/engine/cache.py);
    # 0, the default, turns it off.
    embed_cache_size: int = Field(default=0, ge=0)
    allow_any_model: bool = False
    allow_token_ids: bool = False

    # ---- auth ---------------------------------------------------------------------------------
    api_key: SecretStr | None = None
    api_key_secret_arn: str | None = None
    api_key_ssm_parameter: str | None = None

    # ---- HTTP ---------------------------------------------------------------------------------
    route_prefix: str = ""
    # Loopback unless told otherwise: a local server with auth off must not face the network.
    # The container images set HOST=0.0.0.0.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)  # 0: a free port, named in the log
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # ---- limits -------------------------------------------------------------------------------
    max_inputs_openai: int = Field(default=2048, ge=1)
    max_inputs_v2: int = Field(default=100, ge=1)
    max_inputs_native: int = Field(default=2048, ge=1)
    max_input_tokens: int | None = Field(default=None, ge=3)
    max_tokens_per_request: int = Field(default=300_000, ge=1)
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_response_bytes: int | None = Field(default=None, ge=0)
    max_concurrent_requests: int = Field(default=32, ge=1)
    retry_after_seconds: int = Field(default=1, ge=1)

    # ---- operations (docs/operations.md) ---------------------------------------------------------
    # A request still unanswered after this many seconds gets a 504; on Lambda the invocation's
    # remaining time (less LAMBDA_DEADLINE_MARGIN_S) caps it, so the 504 beats Lambda's own kill.
    request_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    lambda_deadline_margin_s: float = Field(default=1.0, ge=0.0, le=60.0)
    # After SIGTERM: how long requests in flight may take before they get a 503 (Cloud Run sends
    # SIGKILL 10 s after SIGTERM; 8 s leaves room to answer and close).
    shutdown_grace_s: float = Field(default=8.0, ge=0.0, le=3600.0)
    # auto: CloudWatch EMF on Lambda, Prometheus (/metrics) elsewhere.
    metrics: Literal["auto", "emf", "prometheus", "off"] = "auto"
    metrics_namespace: str = Field(default="BgeM3", min_length=1, max_length=255)
    # /metrics reveals traffic: it needs the API key unless this says otherwise.
    metrics_public: bool = False

    # ---- set by the platform, never by hand ------------------------------------------------------
    aws_lambda_function_name: str | None = None
    aws_lambda_function_memory_size: int | None = Field(default=None, ge=1)
    k_service: str | None = None  # Cloud Run's service name

    @field_validator("route_prefix")
    @classmethod
    def _normalise_prefix(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith("/"):
            value = "/" + value
        if any(c.isspace() for c in value) or "?" in value or "#" in value:
            raise ValueError(f"ROUTE_PREFIX {value!r} must be a plain URL path like /embed")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("device", "model_verify", "metrics", mode="before")
    @classmethod
    def _lower_choice(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "api_key_secret_arn",
        "api_key_ssm_parameter",
        "threads",
        "max_input_tokens",
        "max_response_bytes",
        "aws_lambda_function_name",
        "aws_lambda_function_memory_size",
        "k_service",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: Any) -> Any:
        # An empty API_KEY (docker-compose files often carry `API_KEY: ""`) means "no auth".
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _one_key_source(self) -> Settings:
        sources = [
            name
            for name, value in (
                ("API_KEY", self.api_key),
                ("API_KEY_SECRET_ARN", self.api_key_secret_arn),
                ("API_KEY_SSM_PARAMETER", self.api_key_ssm_parameter),
            )
            if value is not None
        ]
        if len(sources) > 1:
            raise ValueError(f"set only one of {', '.join(sources)}")
        if self.api_key is not None and not split_keys(self.api_key.get_secret_value()):
            raise ValueError("API_KEY holds no key (only commas and spaces)")
        return self

    # ---- derived values -----------------------------------------------------------------------
    @property
    def model_paths(self) -> tuple[Path, ...]:
        return tuple(Path(p.strip()) for p in self.model_path.split(",") if p.strip())

    @property
    def platform(self) -> Platform:
        if self.aws_lambda_function_name:
            return "lambda"
        if self.k_service:
            return "cloud_run"
        return "other"

    @property
    def response_limit(self) -> int:
        """Bytes a response may have; 0 = unlimited. Default per platform: Lambda 6 MB, Cloud Run
        32 MiB, elsewhere none (a plain container or laptop has no proxy that caps responses)."""
        if self.max_response_bytes is not None:
            return self.max_response_bytes
        return {"lambda": LAMBDA_RESPONSE_LIMIT, "cloud_run": CLOUD_RUN_RESPONSE_LIMIT}.get(
            self.platform, 0
        )

    @property
    def cpu_limit(self) -> int | None:
        """The vCPUs a Lambda function's memory size buys (it sees every core of its host but
        runs on these); None elsewhere, where the cores the process may use are the limit."""
        memory = self.aws_lambda_function_memory_size
        if memory is None:
            return None
        return min(LAMBDA_MAX_VCPUS, max(1, round(memory / LAMBDA_MB_PER_VCPU)))

    @property
    def micro_batching(self) -> bool:
        """Lambda gives an environment one request at a time, so there is never a second request
        to share a pass with, and the hand-off to the batch worker only adds a thread wake-up to
        every request (about 0.4 ms on the full-size model on 2 vCPUs)."""
        if self.micro_batch is not None:
            return self.micro_batch
        return self.platform != "lambda"

    @property
    def metrics_backend(self) -> Literal["emf", "prometheus", "off"]:
        if self.metrics == "auto":
            return "emf" if self.platform == "lambda" else "prometheus"
        return self.metrics

    @property
    def auth_configured(self) -> bool:
        return any(
            v is not None
            for v in (self.api_key, self.api_key_secret_arn, self.api_key_ssm_parameter)
        )


def split_keys(value: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.split(",") if k.strip())


def _keys_from_document(value: str) -> tuple[str, ...]:
    """A secret holds either the key(s) as text ("k1,k2"), a JSON list of keys, or a JSON object
    with an `API_KEY` / `api_key` / `api_keys` entry (Secrets Manager's key/value form)."""
    text = value.strip()
    if text[:1] in "[{":
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, list):
            return tuple(str(k).strip() for k in doc if str(k).strip())
        if isinstance(doc, dict):
            for name in ("API_KEY", "api_key", "API_KEYS", "api_keys"):
                if name in doc:
                    entry = doc[name]
                    if isinstance(entry, list):
                        return tuple(str(k).strip() for k in entry if str(k).strip())
                    return split_keys(str(entry))
            raise ValueError("the secret is a JSON object without an API_KEY entry")
    return split_keys(text)


def resolve_api_keys(settings: Settings, *, boto3_session: Any = None) -> tuple[str, ...]:
    """The allowed keys; () means auth is off. Reads AWS once, at start. Raises with a message
    that names the variable (never the key) when the secret cannot be read or is empty."""
    if settings.api_key is not None:
        return split_keys(settings.api_key.get_secret_value())
    if settings.api_key_secret_arn is None and settings.api_key_ssm_parameter is None:
        return ()
    import boto3  # only when a secret is configured: plain containers need no AWS

    session = boto3_session or boto3.session.Session()
    if settings.api_key_secret_arn is not None:
        where = f"API_KEY_SECRET_ARN={settings.api_key_secret_arn}"
        try:
            reply = session.client("secretsmanager").get_secret_value(
                SecretId=settings.api_key_secret_arn
            )
            text = reply.get("SecretString")
            if text is None:
                raise ValueError("the secret has no SecretString (binary secrets are not read)")
            keys = _keys_from_document(str(text))
        except Exception as exc:
            reason = _aws_reason(exc)
            raise RuntimeError(f"cannot read the API key from {where}: {reason}") from None
    else:
        where = f"API_KEY_SSM_PARAMETER={settings.api_key_ssm_parameter}"
        try:
            reply = session.client("ssm").get_parameter(
                Name=settings.api_key_ssm_parameter, WithDecryption=True
            )
            keys = _keys_from_document(str(reply["Parameter"]["Value"]))
        except Exception as exc:
            reason = _aws_reason(exc)
            raise RuntimeError(f"cannot read the API key from {where}: {reason}") from None
    if not keys:
        raise RuntimeError(f"{where} holds no key")
    return keys


def _aws_reason(exc: Exception) -> str:
    """The error class and AWS error code, never the secret's value."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return f"{type(exc).__name__} ({code})"
    if isinstance(exc, ValueError):
        return str(exc)
    return type(exc).__name__


def engine_config(
    settings: Settings, *, job: bool = False, device: Literal["cpu", "cuda"] | None = None
) -> EngineConfig:
    """The engine's part of the settings, platform defaults included. A corpus job's engine
    (`job=True`) runs JOB_BATCH_TOKEN_BUDGET (its passes are always full, so that budget sets its
    peak memory), without the warm-up (its first batch is one) and without the embedding cache
    (a job drops its own duplicates). `device` overrides DEVICE (the job CLI's --device)."""
    from handler.engine import EngineConfig  # numpy and onnxruntime: not at settings' import

    return EngineConfig(
        threads=settings.threads,
        cpu_limit=settings.cpu_limit,
        batch_token_budget=settings.job_batch_token_budget if job else settings.batch_token_budget,
        verify=settings.model_verify,
        device=device or settings.device,
        warmup=False if job else settings.warmup,
        cache_size=0 if job else settings.embed_cache_size,
    )
