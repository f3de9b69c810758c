"""``grpc.health.v1.Health``: the readiness probes' rule, for gRPC health checkers.

    service ""                               SERVING when /health/ready would answer 200
    service "inference.GRPCInferenceService"  the same
    service "<model name>"                   SERVING while a worker serves that model
    any other service                        NOT_FOUND

grpc_health_probe and Kubernetes' gRPC probes call Check; Watch sends the
status at once, then each change (the pool is looked at every half second).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.api.http import server_not_ready_reason
from gateway.pool.model import not_ready_reason
from gateway.pool.runtime import Runtime

WATCH_INTERVAL_S: Final = 0.5
_SERVING: Final = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN: Final = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, runtime: Runtime, service: str) -> None:
        self._runtime = runtime
        self._whole = frozenset({"", service})

    def _status(self, service: str) -> Any:
        """The status of ``service``; None when there is no such service."""
        if service in self._whole:
            return _SERVING if server_not_ready_reason(self._runtime) is None else _NOT_SERVING
        model = self._runtime.models.get(service)
        if model is None:
            return None
        if self._runtime.draining or not_ready_reason(model.pool, 1) is not None:
            return _NOT_SERVING
        return _SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self._status(request.service)
            if status is None:
                status = _UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)
