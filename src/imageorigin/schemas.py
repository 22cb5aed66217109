"""The service's answers as pydantic models: what /openapi.json and /docs show.

The handlers in :mod:`imageorigin.service` build plain dicts; these models
describe them (every field, every status the service returns) so that a client
generated from the OpenAPI document reads the real responses.  The tests check
real responses against them.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from .provenance import SUMMARIES
from .verdict import BANDS


class Error(BaseModel):
    """Every 4xx and 503 answer: a sentence naming what was wrong."""

    error: str = Field(description="what was wrong, e.g. 'an API key is needed: ...'")


class Provenance(BaseModel):
    """What the file's own bytes declare about its origin (never mixed into p_ai)."""

    summary: Literal[SUMMARIES] = Field(description="one word: what the file declares, or 'conflict'")
    evidence: list[str] = Field(description="the sentences behind the summary")
    c2pa: Optional[dict] = Field(None, description="C2PA manifest: state, signer, claim generator, actions")
    generator: Optional[dict] = Field(None, description="generator metadata (A1111, ComfyUI, NovelAI, OpenAI)")
    xmp: Optional[dict] = None
    exif: Optional[dict] = None
    declared: Optional[str] = Field(None, description="'ai', 'ai_edit', 'capture' or null")
    notes: list[str] = Field(default_factory=list, description="what could not be read")


class Patch(BaseModel):
    """One scored crop of the patch map: its box in the image's pixels, its own
    p_ai, and its weight in the image's score."""

    box: list[int] = Field(description="left, top, width, height")
    p_ai: float
    weight: float = Field(1.0, description="its vote in the pooled score: the share of its 8x8 blocks "
                                           "with detail; 0 for flat colour, which does not vote")


class ModelRef(BaseModel):
    id: str = Field(description="SHA-256 of the checkpoint that answered")
    engine: str = Field(description="the engine and precision that ran, read back from it")


class Result(BaseModel):
    """One uploaded file's result, in upload order.  A file that could not be read
    has ``error`` set and no verdict; the rest of the request goes on."""

    name: str
    sha256: str
    size: int = Field(description="bytes")
    format: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    label: Optional[str] = Field(None, description="'human' below the threshold, else the likeliest AI class")
    probs: Optional[dict[str, float]] = Field(None, description="calibrated probability of each class")
    p_ai: Optional[float] = Field(None, description="1 - p(human)")
    threshold: Optional[float] = Field(None, description="where likely_ai starts")
    is_ai: Optional[bool] = Field(None, description="true exactly for the likely_ai verdict")
    verdict: Optional[Literal[BANDS]] = None
    caveats: list[str] = Field(default_factory=list, description="why the model is unreliable on this image")
    model: Optional[ModelRef] = None
    provenance: Provenance
    heatmap: Optional[list[Patch]] = Field(None, description="with ?heatmap=true: every scored crop")
    timings_ms: dict[str, float] = Field(description="decode, queue_and_inference")
    warnings: list[str] = Field(default_factory=list, description="what the decoder said of a damaged file")
    error: Optional[str] = None


class Analysis(BaseModel):
    results: list[Result]
    error: Optional[str] = Field(None, description="with 422: none of the files could be read")


class ModelInfo(BaseModel):
    """The model that answers, and the server's limits."""

    id: str
    sha256: str
    path: str
    since: float = Field(description="Unix time it began to answer")
    previous: list[str] = Field(description="ids of the models a rollback goes back to, the next first")
    feedback: dict[str, bool] = Field(description="store: reviews are kept; keep_images: so are the "
                                                  "bytes of the images reviewers label")
    engine: str
    precision: str
    labels: list[str]
    display_names: dict[str, str]
    human_label: Optional[str]
    threshold: Optional[float]
    bands: Optional[dict]
    preprocessing: dict
    backbone: str
    metrics: Optional[dict]
    weak_spots: list[str]
    limits: dict[str, float]
    version: str
    served: dict[str, float]


class Status(BaseModel):
    status: Literal["ok", "ready", "starting"]


def errors(*codes: int) -> dict:
    """FastAPI ``responses=`` for these statuses, each an :class:`Error` with its meaning."""
    meaning = {
        400: "no files in the request",
        401: "no API key, or a wrong one (the service runs with --api-key)",
        404: "not found: no store (--store), no recent answer for that sha256, or no such checkpoint",
        408: "the request body did not arrive within the body timeout",
        409: "refused: the candidate's gate did not accept it, or there is no model to roll back to",
        413: "the body or the number of files is over the server's limit",
        422: "the request is malformed, or none of the files could be read",
        429: "too many requests from this client (Retry-After says when to retry)",
        503: "the model is loading or the server is busy (Retry-After says when to retry)",
    }
    return {c: {"model": Error, "description": meaning[c]} for c in codes}
