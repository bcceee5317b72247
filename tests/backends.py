"""Which device a backend's tests run on, and its pytest parameter.

``cuda`` runs on CUDA tensors; ``triton`` on CUDA tensors when there is a GPU and on CPU
tensors under the Triton interpreter otherwise (conftest sets TRITON_INTERPRET=1 then); every
other backend on CPU tensors. A parameter whose backend runs on CUDA is marked ``gpu``: without
a GPU conftest skips it, and on a GPU ``pytest -m gpu`` selects it.
"""
import pytest
import torch

CUDA = torch.cuda.is_available()


def device_of(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and CUDA):
        return "cuda"
    return "cpu"


def param(backend: str):
    return pytest.param(backend, marks=pytest.mark.gpu, id=backend) if device_of(backend) == "cuda" else backend


def params(*backends: str) -> list:
    return [param(b) for b in backends]
