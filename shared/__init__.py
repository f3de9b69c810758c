"""What the gateway and the workers both import: wire protocol, settings, errors.

Small and dependency-light on purpose: no torch, no FastAPI.
"""
