"""The OpenAPI document: the generated one plus the request bodies, which the handlers parse
themselves (to bound the body size while reading and to accept multipart on /edit)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ebca_common.specs import GenerateRequest, edit_request_adapter


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the request bodies, which the handlers parse themselves (to bound the
    body size while reading and to accept multipart on /edit)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    ref = "#/components/schemas/{model}"

    def register(name: str, model_schema: dict[str, Any]) -> dict[str, str]:
        components.update(model_schema.pop("$defs", {}))
        components[name] = model_schema
        return {"$ref": ref.format(model=name)}

    gen_ref = register("GenerateRequest", GenerateRequest.model_json_schema(ref_template=ref))
    edit_ref = register("EditRequest", edit_request_adapter.json_schema(ref_template=ref))
    schema["paths"]["/generate"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": gen_ref}},
    }
    schema["paths"]["/edit"]["post"]["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": edit_ref},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["request"],
                    "properties": {
                        "request": {"type": "string", "description": "The JSON body (EditRequest) as text."},
                        "image": {"type": "string", "format": "binary", "description": "Input image."},
                        "mask": {"type": "string", "format": "binary", "description": "Inpaint mask."},
                    },
                }
            },
        },
    }
    for path in ("/generate", "/edit"):
        schema["paths"][path]["post"].setdefault("parameters", []).append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 200},
                "description": "Same key + same body returns the same job; a different body is a 409.",
            }
        )
    app.openapi_schema = schema
    return schema
