"""The OpenAPI 3.1 document of the management API, generated from the endpoint table it dispatches by, so
every endpoint is described and nothing described is missing."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dcrouter.api.http import JSON_TYPE, Endpoint, Field

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "string"}},
            },
        }
    },
}

_COMMON = {401: "no or unknown token", 403: "Host not allowed, or the token's scope is too small"}


def _schema(spec: Field) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": [spec.type, "null"] if spec.nullable else spec.type,
        "description": spec.doc,
    }
    if spec.type == "array":
        schema["items"] = {"type": "object"}
    if spec.enum:
        schema["enum"] = list(spec.enum)
    return schema


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    ok = "application/json" if endpoint.produces == JSON_TYPE else endpoint.produces
    responses: dict[str, Any] = {
        "200": {
            "description": "OK",
            "content": {ok: {"schema": {"type": "object"} if ok == JSON_TYPE else {"type": "string"}}},
        }
    }
    errors = dict(endpoint.responses)
    if endpoint.scope != "public":
        errors.update(_COMMON)
    if endpoint.query or endpoint.body:
        errors.setdefault(400, "bad parameter or field")
    if endpoint.body is not None:
        errors.update({413: "body over 1 MiB", 415: "body not application/json"})
    for status, text in sorted(errors.items()):
        responses[str(status)] = {
            "description": text,
            "content": {JSON_TYPE: {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": re.sub(r"\W+", "_", f"{endpoint.method.lower()}{endpoint.path}").strip("_"),
        "responses": responses,
    }
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
            if name == "id"
            else {"type": "string"},
        }
        for name in re.findall(r"\{(\w+)\}", endpoint.path)
    ]
    parameters += [
        {"name": f.name, "in": "query", "required": f.required, "schema": _schema(f), "description": f.doc}
        for f in endpoint.query
    ]
    if parameters:
        operation["parameters"] = parameters
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": any(f.required for f in endpoint.body),
            "content": {
                JSON_TYPE: {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {f.name: _schema(f) for f in endpoint.body},
                        "required": [f.name for f in endpoint.body if f.required],
                    }
                }
            },
        }
    if endpoint.scope == "public":
        operation["security"] = []
    else:
        operation["x-scope"] = endpoint.scope
    return operation


def document(endpoints: Sequence[Endpoint], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing ``endpoints``."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dcrouter management API",
            "version": version,
            "description": "Queue control, delivery, stats and log levels of a running dcrouter "
            "(docs/api.md). Every endpoint but /health needs `Authorization: Bearer <token>`; writes need "
            "an admin token.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _ERROR},
        },
    }
