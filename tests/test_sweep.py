"""The sweep: every transformers family the README names, deferred + materialized, bit-identical to eager."""

from __future__ import annotations

import pytest
import torch
from exact import assert_models_identical
from models import MODELS
from sweep_models import FAMILIES

import torchlazy as tl

ALL = {**MODELS, **FAMILIES}


@pytest.mark.sweep
@pytest.mark.parametrize("name", sorted(ALL))
def test_family_is_exact(name: str) -> None:
    make = ALL[name]
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    torch.randn(100)  # the generator used in between does not matter
    tl.materialize(model)
    torch.manual_seed(0)
    reference = make()
    assert_models_identical(model, reference)  # parameters, all buffers, tensor attributes, ties
    assert tl.deferred_tensors(model) == []
