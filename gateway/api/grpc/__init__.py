"""The gateway's gRPC side: the Open Inference Protocol's gRPC service and Triton's additions.

    server.py     the grpcio asyncio server, its options, TLS, health and reflection
    servicer.py   inference.GRPCInferenceService on the runtime HTTP uses
    convert.py    protobuf messages to the worker's v2 wire formats and back
    status.py     torchpool's errors as gRPC status codes
    health.py     grpc.health.v1 on the readiness rule
    proto/        the .proto (KServe's, with Triton's streaming and extensions)
    generated/    what protoc makes of it (scripts/gen_grpc.py)

Imported only when --grpc-port is set, so a gateway without it never loads grpcio.
"""
