# mcc-serve: the serving image. CUDA runtime + onnxruntime-gpu, no torch, no timm.
#   docker build -t mcc-serve .
#   docker run --gpus all -p 8000:8000 -v $PWD/bundles/demo:/model:ro mcc-serve
# Falls back to the CPU provider when no GPU is visible. Every option is an MCC_* environment variable.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip curl \
    && rm -rf /var/lib/apt/lists/*

# the serving dependencies only (pyproject's full list adds the training stack)
RUN pip3 install "onnxruntime-gpu>=1.18" "numpy>=1.24" "pillow>=10" "fastapi>=0.110" "uvicorn[standard]>=0.55,<0.56" \
    "pydantic>=2.5" "pydantic-settings>=2.1" "python-multipart>=0.0.18" "prometheus-client>=0.19"

WORKDIR /app
COPY mcc_serve/ /app/mcc_serve/
RUN useradd --create-home --uid 10001 mcc
USER mcc

# PORT: the convention of Knative and KServe (they set it); MCC_PORT or --port override it
ENV MCC_HOST=0.0.0.0 PORT=8000 MCC_BUNDLE=/model
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${MCC_PORT:-$PORT}/v2/health/ready" || exit 1
# exec form: uvicorn gets SIGTERM directly and drains in-flight requests before exiting
# the bundle is MCC_BUNDLE's (/model unless set: KServe's /mnt/models, a mounted volume); arguments are flags
ENTRYPOINT ["python3", "-m", "mcc_serve"]
