"""Shared fixtures: seeded RNG, captured real architectures (once per session), IR helpers."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPLICE_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))

import splice
from splice import models

ARCHS = ["gpt2", "llama", "bert", "vit", "mixtral", "convnet"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@functools.cache
def _model(name: str):
    return models.FACTORIES[name]()


@functools.cache
def _captured(name: str):
    model, args = _model(name)
    return splice.capture(model, args)


@functools.cache
def _captured_batch(name: str, batch: int):
    """(Program, example inputs) of an architecture captured at batch size ``batch``."""
    model, args = models.FACTORIES[name](batch=batch)
    return splice.capture(model, args), args


@pytest.fixture
def arch_model():
    """(name) -> (eager model, example inputs); cached per session."""
    return _model


@pytest.fixture
def captured():
    """(name) -> a *copy* of the captured Program of a small real architecture."""
    return lambda name: _captured(name).copy()


def first_output(out):
    """The first tensor of a model's output (ModelOutput, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    return out[0]


def ir(text: str, **weights: torch.Tensor):
    """Parse a program written in the text form; weights by name (dots written as __)."""
    return splice.parse_ir(text, {k.replace("__", "."): v for k, v in weights.items()})
