"""The runtime engine (onnxruntime + tokenizers + numpy only; no torch, no web framework)."""

from handler.engine.engine import Engine, EngineConfig, load_registry
from handler.engine.microbatch import MicroBatcher, micro_batched
from handler.engine.types import (
    Capabilities,
    EmbeddingEngine,
    Encoded,
    ModelInfo,
    ModelRegistry,
    Scores,
)

__all__ = [
    "Capabilities",
    "EmbeddingEngine",
    "Encoded",
    "Engine",
    "EngineConfig",
    "MicroBatcher",
    "ModelInfo",
    "ModelRegistry",
    "Scores",
    "load_registry",
    "micro_batched",
]
