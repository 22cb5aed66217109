"""The service's review and deployment endpoints (all behind the API key, like the rest).

- ``POST /v1/feedback``: a reviewer's mark of a result (human / ai, optionally
  the generator, a note, the reviewer's name), stored with the model that
  answered and its verdict in the service's store (:mod:`imageorigin.feedback`).
  The file may be sent along (the page sends it); its bytes are kept only when
  the service runs with ``--keep-images``.
- ``GET /v1/feedback`` lists marks (of one image with ``?sha256=``);
  ``DELETE /v1/feedback/{sha256}`` removes an image's marks and kept bytes.
- ``POST /v1/admin/deploy`` swaps in a checkpoint its gate accepted;
  ``POST /v1/admin/rollback`` goes back; ``GET /v1/admin/deployments`` is the history.

Which model answered an image is read from the service's memory of its recent
answers (sha256 -> model id, label, p_ai, verdict; the last ``ANSWERS_KEPT``,
never written anywhere).  When a mark comes for an image no longer there, the
file must come with it and is analysed again by the current model.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from pydantic import BaseModel, Field

from .access import key_id
from .feedback import LABELS, SHA256
from .hotswap import Busy, Refused
from .images import ImageDecodeError, decode_image
from .schemas import errors

ANSWERS_KEPT = 10_000


def remember(answers: OrderedDict, result: dict) -> None:
    """Keep what the service answered for an image (not the image), the newest ANSWERS_KEPT."""
    answers[result["sha256"]] = {"model_id": result["model"]["id"], "model_label": result["label"],
                                 "model_p_ai": result["p_ai"], "model_verdict": result["verdict"]}
    answers.move_to_end(result["sha256"])
    while len(answers) > ANSWERS_KEPT:
        answers.popitem(last=False)


class Deploy(BaseModel):
    path: str = Field(description="the candidate checkpoint, a path on the server (its gate.json beside it)")
    force: bool = Field(False, description="deploy even without an accepting gate decision")


def review_routes(app: FastAPI, state: dict, limits) -> None:
    """Add the feedback and admin endpoints to the service's ``app``."""

    def store():
        if not state["ready"]:
            raise HTTPException(503, "the model is loading", headers={"Retry-After": "2"})
        if state["store"] is None:
            raise HTTPException(404, "this service keeps no feedback: start it with --store DIR")
        return state["store"]

    @app.post("/v1/feedback", status_code=201, responses=errors(401, 404, 413, 422, 429, 503))
    async def feedback(request: Request,
                       label: str = Form(..., description="the reviewer's answer: human or ai"),
                       reviewer: str = Form(..., min_length=1, max_length=100, description="who reviewed it"),
                       sha256: str | None = Form(None, description="the result's sha256 (or send the file)"),
                       generator: str | None = Form(None, max_length=100, description="which AI, if known"),
                       note: str | None = Form(None, max_length=2000),
                       file: UploadFile | None = File(None, description="the image (kept with --keep-images)")):
        """Store a reviewer's mark of a result: who, when, the model that answered and
        its verdict, and the reviewer's label."""
        kept = store()
        if label not in LABELS:
            raise HTTPException(422, f"label must be one of {', '.join(LABELS)}, not {label!r}")
        data = await file.read() if file is not None else None
        if data is not None:
            digest = hashlib.sha256(data).hexdigest()
            if sha256 and sha256 != digest:
                raise HTTPException(422, "the file's SHA-256 is not the sha256 given")
            sha256 = digest
        if not sha256 or not SHA256.match(sha256):
            raise HTTPException(422, "give the result's sha256 (64 lower-case hex digits) or the file")
        answer = state["answers"].get(sha256)
        if answer is None:
            if data is None:
                raise HTTPException(404, "this service has no recent answer for that sha256: send the file too")
            answer = await _answer_again(state, data, file.filename or "upload")
        row = {"sha256": sha256, "reviewer": reviewer, "key_id": key_id(dict(request.headers.raw)),
               "label": label, "generator": generator or None, "note": note or None, **answer}
        return await asyncio.to_thread(kept.add, row, data)

    @app.get("/v1/feedback", responses=errors(401, 404, 429, 503))
    async def list_feedback(sha256: str | None = Query(None), limit: int = Query(500, ge=1, le=10_000)):
        """The stored marks, newest last (of one image with ``sha256``)."""
        rows = await asyncio.to_thread(store().rows, sha256)
        return {"feedback": rows[-limit:], "total": len(rows)}

    @app.delete("/v1/feedback/{sha256}", responses=errors(401, 404, 422, 429, 503))
    async def delete_feedback(sha256: str):
        """Remove every mark of an image and its kept bytes."""
        if not SHA256.match(sha256):
            raise HTTPException(422, "sha256 must be 64 lower-case hex digits")
        return await asyncio.to_thread(store().delete, sha256)

    @app.post("/v1/admin/deploy", responses=errors(401, 404, 409, 422, 429, 503))
    async def deploy(request: Request, body: Deploy):
        """Swap in a checkpoint (loaded and warmed while the current one answers).
        Refused (409) unless its gate accepted it or it has answered here before."""
        models = _models(state)
        try:
            return await models.deploy(body.path, by=key_id(dict(request.headers.raw)), force=body.force)
        except Refused as err:
            raise HTTPException(409, str(err))
        except FileNotFoundError as err:
            raise HTTPException(404, str(err))
        except Exception as err:  # noqa: BLE001 - not a checkpoint: the current model goes on answering
            raise HTTPException(422, f"{body.path}: could not be loaded: {err}")

    @app.post("/v1/admin/rollback", responses=errors(401, 409, 429, 503))
    async def rollback(request: Request):
        """Answer with the model before the current one again."""
        try:
            return await _models(state).rollback(by=key_id(dict(request.headers.raw)))
        except Refused as err:
            raise HTTPException(409, str(err))

    @app.get("/v1/admin/deployments", responses=errors(401, 429, 503))
    async def deployments():
        """Which model answered from when (kept in the store; this run's only, without one)."""
        models = _models(state)
        history = await asyncio.to_thread(models.store.deployments) if models.store is not None else []
        return {"current": models.current.id, "previous": [s.id for s in reversed(models.previous)],
                "deployments": history}


def _models(state: dict):
    if not state["ready"]:
        raise HTTPException(503, "the model is loading", headers={"Retry-After": "2"})
    return state["models"]


async def _answer_again(state: dict, data: bytes, name: str) -> dict:
    """The current model's answer for an image the service no longer remembers."""
    try:
        image = await asyncio.to_thread(decode_image, data, name=name)
    except ImageDecodeError as err:
        raise HTTPException(422, str(err))
    try:
        (p, served), = await state["batcher"].submit([image])
    except Busy:
        raise HTTPException(503, "the server is busy: retry shortly", headers={"Retry-After": "1"})
    return {"model_id": served.id, "model_label": p.label, "model_p_ai": p.p_ai, "model_verdict": p.verdict}
