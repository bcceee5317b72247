"""Models: the VQGAN tokenizer, text encoders, aMUSEd's UVit2D, Meissonic's transformer, and the
component save/load format."""
from musefast.models.meissonic import MeissonicConfig, MeissonicTransformer
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
from musefast.models.uvit import UVit2D, UVit2DConfig
from musefast.models.vqgan import VQGAN, VQGANConfig
from musefast.models.vqmodel import load_vqmodel

__all__ = [
    "CLIPTextEncoder",
    "MeissonicConfig",
    "MeissonicTransformer",
    "T5TextEncoder",
    "TextEmbeddings",
    "TextEncoder",
    "TextProjection",
    "UVit2D",
    "UVit2DConfig",
    "VQGAN",
    "VQGANConfig",
    "as_text_embeddings",
    "load_text_encoder",
    "load_vqmodel",
    "load_component",
    "register_component",
    "save_component",
]
