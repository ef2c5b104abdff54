"""ServeSettings: every option of mcc-serve, settable by flag or by environment variable (MCC_*)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .runtime.choices import DEVICES, IMAGE_FORMATS, MAX_IMAGE_PIXELS, PRECISIONS


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MCC_", extra="ignore", protected_namespaces=())

    bundle: str = Field("model", description="bundle directory written by mcc-export")
    model_name: str | None = Field(None, description="name in the v2 API (default: the bundle's arch)")
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes, each with its own session")
    max_batch_size: int = Field(32, ge=1, le=4096, description="images per model run")
    max_delay_ms: float = Field(
        0.0, ge=0, le=10_000, description="wait for more requests after a batch's first even when the model is idle"
    )
    max_queue: int = Field(256, ge=1, description="queued images before 429 (a request larger than this: 413)")
    request_timeout_s: float = Field(30.0, gt=0, description="per-request deadline before 504")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body before 413")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=64, description="largest decoded image (w*h) before 413")
    image_formats: str = Field(
        ",".join(IMAGE_FORMATS), description="image formats decoded, Pillow's names, comma-separated; others: 400"
    )
    max_images_per_request: int = Field(64, ge=1, description="images per request before 413")
    preprocess_threads: int = Field(
        2, ge=1, le=64, description="threads that decode and resize large images; bounds their memory (docs/serving.md)"
    )
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request line + headers before 431")
    header_timeout_s: float = Field(10.0, gt=0, description="time to send the headers (from connect or 1st byte): 408")
    body_timeout_s: float = Field(60.0, gt=0, description="time to send the body after the headers, else closed")
    keep_alive_s: int = Field(5, ge=1, description="idle time between requests on a kept-alive connection")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0: onnxruntime's default)")
    inter_op_threads: int = Field(0, ge=0, description="onnxruntime inter-op threads (0: default)")
    device: str = Field("auto", description="auto (CUDA when available) | cpu | cuda")
    precision: str = Field(
        "fp32",
        description="fp32 (model.onnx) | fp16 (model_fp16.onnx, mcc-export --fp16) | int8 (model_int8.onnx, --int8)",
    )
    drain_s: float = Field(
        5.0, ge=0, le=600, description="after SIGTERM: readiness 503 at once, keep serving this long, then stop"
    )
    warmup_runs: int = Field(3, ge=0, description="model runs before readiness turns true")
    api_key: SecretStr | None = Field(None, description="bearer token required on all but health endpoints")
    log_level: str = Field("info", description="log level: critical | error | warning | info | debug | trace")
    access_log: bool = Field(
        False, description="a log line per request (uvicorn's access log; /metrics counts requests without it)"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in DEVICES:
            raise ValueError(f"must be one of {', '.join(DEVICES)}")
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str) -> str:
        if v not in PRECISIONS:
            raise ValueError(f"must be one of {', '.join(PRECISIONS)}")
        return v

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("is empty or whitespace, which would let any client in; set a key, or unset MCC_API_KEY")
        return v

    @field_validator("image_formats")
    @classmethod
    def _image_formats(cls, v: str) -> str:
        from PIL import Image

        Image.init()  # every plugin registered, so Image.ID lists all Pillow reads
        names = [f.strip().upper() for f in v.split(",") if f.strip()]
        unknown = [f for f in names if f not in Image.ID]
        if not names or unknown:
            raise ValueError(
                f"{', '.join(unknown) or '(none)'}: not a format Pillow reads; e.g. {','.join(IMAGE_FORMATS)}"
            )
        return ",".join(names)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        if v.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError("must be critical, error, warning, info, debug or trace")
        return v.lower()
