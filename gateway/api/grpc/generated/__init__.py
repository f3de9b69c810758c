"""Code protoc generates from ../proto/grpc_predict_v2.proto; never edited by hand.

Regenerate with ``scripts/gen_grpc.py`` (tests/test_grpc_generated.py fails when
these files and the .proto disagree).
"""
