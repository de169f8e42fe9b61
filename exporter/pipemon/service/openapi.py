"""The OpenAPI 3.1 description of the ingest API, with request schemas generated from the msgspec types."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from pipemon import __version__
from pipemon.model.events import RunFinished, RunStarted
from pipemon.openlineage.converter import RunEvent

_ERROR = {
    "type": "object",
    "required": ["status", "code", "error"],
    "properties": {
        "status": {"const": "rejected"},
        "code": {"type": "integer"},
        "error": {"type": "object", "required": ["reason", "message"], "properties": {
            "reason": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}},
    },
}
_RESULT = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"enum": ["accepted", "duplicate", "ignored"]}, "pipeline": {"type": "string"},
                   "run_id": {"type": "string"},
                   "reason": {"type": "string", "description": "why an event was ignored: child_run (an"
                              " OpenLineage child run, folded into its root run), unknown_pipeline"}},
}
_BATCH_RESULT = {
    "type": "object",
    "required": ["accepted", "duplicate", "ignored", "rejected", "results"],
    "properties": {"accepted": {"type": "integer"}, "duplicate": {"type": "integer"},
                   "ignored": {"type": "integer"}, "rejected": {"type": "integer"},
                   "results": {"type": "array", "items": {"oneOf": [{"$ref": "#/components/schemas/Result"},
                                                                    {"$ref": "#/components/schemas/Error"}]}}},
}


def _ingest_operation(summary: str, schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {"post": {
        "summary": summary,
        "security": [{"bearer": []}, {}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"oneOf": [ref, {"type": "array", "items": ref}]}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        }},
        "responses": {
            "200": {"description": "Single event: accepted, duplicate (a retry, not counted again) or ignored"
                    " (left aside on purpose; `reason` says why). Batch: a result per item, in order.",
                    "content": {"application/json": {"schema": {"oneOf": [
                        {"$ref": "#/components/schemas/Result"}, {"$ref": "#/components/schemas/BatchResult"}]}}}},
            **{code: {"description": text, **error} for code, text in (
                ("400", "Malformed body"), ("401", "Missing or unknown token"),
                ("403", "The token's team does not own the pipeline"), ("413", "Body too large"),
                ("422", "Invalid event; `error.field` names the field"),
                ("429", "Cap on tracked pipelines or runs in progress reached"),
                ("503", "State cannot be stored; nothing of the request was kept"))},
        },
    }}


@functools.cache
def openapi_spec() -> dict[str, Any]:
    _, components = msgspec.json.schema_components([RunFinished, RunStarted, RunEvent],
                                                   ref_template="#/components/schemas/{name}")
    components.update(Error=_ERROR, Result=_RESULT, BatchResult=_BATCH_RESULT)
    return {
        "openapi": "3.1.0",
        "info": {"title": "pipemon ingest API", "version": __version__},
        "paths": {
            "/api/v1/runs": _ingest_operation("Report finished runs", "RunFinished"),
            "/api/v1/runs/start": _ingest_operation("Report runs that started", "RunStarted"),
            "/api/v1/lineage": _ingest_operation("Report OpenLineage RunEvents (START, COMPLETE, FAIL, ABORT;"
                                                 " RUNNING and OTHER are accepted and change nothing)", "RunEvent"),
        },
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
