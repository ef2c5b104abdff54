"""Request and response bodies: /v1/predict, and the Open Inference Protocol (KServe v2) REST API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class PredictJSON(BaseModel):
    images: list[str] = Field(..., min_length=1, description="base64-encoded image files (PNG, JPEG, ...)")


class Label(BaseModel):
    index: int
    label: str
    probability: float


class Prediction(BaseModel):
    top_k: list[Label]


class PredictResponse(BaseModel):
    model: str
    predictions: list[Prediction] = Field(..., description="one per input image, in input order")


class ErrorResponse(BaseModel):
    error: str


class TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = []


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


class ModelReady(BaseModel):
    name: str
    ready: bool


class InferInputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None  # absent when the tensor is binary (parameters.binary_data_size)


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor]
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32"] = "FP32"
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None  # absent when sent binary after the JSON header


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferOutputTensor]

    model_config = {"protected_namespaces": ()}


def inline_schema(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema with its nested models written in place: for a route that reads its raw body (and so
    gets no component schemas from FastAPI) to document that body in ``openapi_extra``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def expand(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return expand(defs[ref.removeprefix("#/$defs/")])
            return {k: expand(v) for k, v in node.items()}
        if isinstance(node, list):
            return [expand(v) for v in node]
        return node

    return expand(schema)
