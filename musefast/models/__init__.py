"""Models: the VQGAN tokenizer, text encoders, and the component save/load format."""
from musefast.models.serialization import load_component, register_component, save_component
from musefast.models.text import (
    CLIPTextEncoder,
    T5TextEncoder,
    TextEmbeddings,
    TextEncoder,
    TextProjection,
    as_text_embeddings,
    load_text_encoder,
)
from musefast.models.vqgan import VQGAN, VQGANConfig

__all__ = [
    "CLIPTextEncoder",
    "T5TextEncoder",
    "TextEmbeddings",
    "TextEncoder",
    "TextProjection",
    "VQGAN",
    "VQGANConfig",
    "as_text_embeddings",
    "load_text_encoder",
    "load_component",
    "register_component",
    "save_component",
]
