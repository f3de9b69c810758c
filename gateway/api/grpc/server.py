"""The gRPC server: grpcio's asyncio server on the gateway's event loop, beside uvicorn.

Started by the app's lifespan when ``--grpc-port`` is set, after the runtime,
and stopped before it; it serves

- ``inference.GRPCInferenceService`` (:mod:`gateway.api.grpc.servicer`),
- ``grpc.health.v1.Health`` (:mod:`gateway.api.grpc.health`),
- server reflection (``grpc.reflection.v1alpha``), so grpcurl and friends need no .proto.

Messages are limited to the largest ``--max-body-mb`` of the served models
(each model's own limit is checked again per call); TLS with
``--grpc-tls-cert``/``--grpc-tls-key``. The drain on SIGTERM is the runtime's:
from its start new calls get UNAVAILABLE while those in flight finish, and
only then does the lifespan stop this server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.api.grpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from gateway.api.grpc.health import HealthServicer
from gateway.api.grpc.servicer import SERVICE, InferenceServicer
from gateway.api.metrics import Metrics
from gateway.pool.runtime import Runtime

# Room for the protobuf framing around a body of exactly --max-body-mb, so that
# the per-model check answers with its own message.
_FRAMING_BYTES: Final = 64 * 1024
# After the runtime's drain nothing should be in flight; a call still open gets this long.
_STOP_GRACE_S: Final = 5.0


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    def __init__(self, runtime: Runtime, metrics: Metrics, version: str) -> None:
        settings = runtime.config.server
        assert settings.grpc_port is not None, "GrpcServer needs --grpc-port"
        self._settings = settings
        max_body = max((m.max_body_bytes for m in runtime.config.models.values()), default=0)
        options = [
            ("grpc.max_receive_message_length", max_body + _FRAMING_BYTES),
            ("grpc.max_send_message_length", -1),
            # One server per port: a second torchpool on the same port fails to start.
            ("grpc.so_reuseport", 0),
        ]
        self._server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(runtime, metrics, version), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(runtime, SERVICE), self._server)
        reflection.enable_server_reflection(
            [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self.port = self._bind(settings.host, settings.grpc_port)

    def _bind(self, host: str, port: int) -> int:
        where = address(host, port)
        cert, key = self._settings.grpc_tls_cert, self._settings.grpc_tls_key
        if cert and key:
            credentials = grpc.ssl_server_credentials(
                [(Path(key).read_bytes(), Path(cert).read_bytes())]
            )
            return self._server.add_secure_port(where, credentials)
        return self._server.add_insecure_port(where)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop(_STOP_GRACE_S)
