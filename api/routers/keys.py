"""API keys: the caller's own, and (admin keys) every key, made and revoked at run time."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.auth import AdminDep, CallerDep
from api.bodies import json_body
from api.deps import ServicesDep, SettingsDep
from api.errors import ERRORS
from ebca_common.keys import KeyCreate, KeyInfo, Limits, NewKey, Role
from ebca_common.specs import parse_model

router = APIRouter(prefix="/keys", tags=["keys"])


class CallerInfo(BaseModel):
    id: str | None = Field(..., description="The key's id; null when the service runs with EBCA_AUTH=off.")
    name: str
    role: Role
    limits: Limits = Field(..., description="The limits in force (null: unlimited).")
    auth: Literal["required", "off"] = Field(..., description="Whether the service requires keys.")
    webhook_secret: str = Field(
        ..., description="The whsec_ secret that signs this key's webhook deliveries (docs/API.md, Webhooks)."
    )


@router.get("/me", response_model=CallerInfo, responses=ERRORS, summary="The calling key")
def me(caller: CallerDep, services: ServicesDep) -> JSONResponse:
    """The calling key's id, name, role and limits (with EBCA_AUTH=off: the one trusted user)."""
    secret = services.webhook_secrets.for_owner(caller.owner)
    info = CallerInfo(id=caller.id, name=caller.name, role=caller.role, limits=caller.limits,
                      auth=services.settings.auth, webhook_secret=secret)  # fmt: skip
    return JSONResponse(info.model_dump(mode="json"))


@router.get("", response_model=list[KeyInfo], responses=ERRORS, summary="Every key (admin)")
def list_keys(_: AdminDep, services: ServicesDep) -> JSONResponse:
    return JSONResponse([info.model_dump(mode="json") for info in services.keyring.entries()])


@router.post("", status_code=201, response_model=NewKey, responses=ERRORS, summary="Make a key (admin)")
async def create_key(
    request: Request, _: AdminDep, services: ServicesDep, settings: SettingsDep
) -> JSONResponse:
    """The new key is in the answer and nowhere else: the service keeps only its digest."""
    spec = parse_model(KeyCreate, await json_body(request, settings))
    return JSONResponse(services.keyring.create(spec).model_dump(mode="json"), status_code=201)


@router.delete("/{key_id}", response_model=KeyInfo, responses=ERRORS, summary="Revoke a key (admin)")
def revoke_key(key_id: str, _: AdminDep, services: ServicesDep) -> JSONResponse:
    return JSONResponse(services.keyring.revoke(key_id).model_dump(mode="json"))
