"""Operations routes: liveness, readiness, the model list, Prometheus metrics, and hot reload."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from service.auth import require_admin
from service.errors import NotReadyError, error_responses
from service.metrics import CONTENT_TYPE, Metrics
from service.pool import ModelDescription, ModelPool
from service.routes import get_metrics, get_pool

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str = Field(description="'ok' while the process serves HTTP")


class Readiness(BaseModel):
    status: str = Field(description="'ready' once the default model is loaded and warmed")
    default_model: str
    serving: dict[str, int] = Field(description="model name -> version answering requests")


class ModelList(BaseModel):
    default_model: str | None
    models: list[ModelDescription]


class ReloadResult(BaseModel):
    loaded: list[str] = Field(description="'name/version' now serving after warm-up")
    refused: dict[str, str] = Field(
        description="'name/version' -> why it was refused (old one kept); a version refused again for "
        "the same reason is not repeated here, /models lists every refused version"
    )
    serving: dict[str, int]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers HTTP (models may still be loading)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses=error_responses(503))
async def readyz(pool: Annotated[ModelPool, Depends(get_pool)]) -> Readiness:
    """Readiness: 200 once the default model is warm and every loaded version can serve, else 503."""
    default = pool.default_name
    if not pool.ready or default is None:
        raise NotReadyError("models are still loading and warming up", retry_after_s=2)
    broken = pool.not_ready()
    if broken:
        reasons = "; ".join(f"{key}: {why}" for key, why in sorted(broken.items()))
        raise NotReadyError(f"not every loaded model version can serve, restarting: {reasons}")
    return Readiness(
        status="ready",
        default_model=default,
        serving={name: s.model.version for name, s in sorted(pool.serving().items())},
    )


@router.get("/models", response_model=ModelList, responses=error_responses(503))
async def models(pool: Annotated[ModelPool, Depends(get_pool)]) -> ModelList:
    """Models serving: versions, providers, thresholds, input spec, head and units."""
    return ModelList(default_model=pool.default_name, models=pool.describe())


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
        **error_responses(503),
    },
)
async def metrics(registry: Annotated[Metrics, Depends(get_metrics)]) -> Response:
    """Prometheus metrics (all worker processes merged)."""
    return Response(registry.exposition(), media_type=CONTENT_TYPE)


@router.post(
    "/admin/reload",
    response_model=ReloadResult,
    responses=error_responses(401, 403, 503),
    dependencies=[Depends(require_admin)],
    tags=["admin"],
)
async def reload(pool: Annotated[ModelPool, Depends(get_pool)]) -> ReloadResult:
    """Load newer model versions now (this worker), retrying refused ones; each is warmed before it serves."""
    report = await pool.refresh(retry_refused=True)
    return ReloadResult(loaded=report.loaded, refused=report.refused, serving=report.serving)
