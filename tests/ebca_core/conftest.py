"""Helpers for the pipeline tests: observing the cross-attention layers of a U-Net with hooks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from ebca_core import pipeline as pipeline_module
from ebca_core.processor import EBCAState, cross_attention_layers


@dataclass
class LayerCall:
    """What one cross-attention layer saw during one U-Net call."""

    name: str
    query: torch.Tensor  # output of to_q: [rows, P, H*d]
    contexts: list[torch.Tensor] = field(default_factory=list)  # inputs of to_k, in call order
    keys: list[torch.Tensor] = field(default_factory=list)  # outputs of to_k, in call order


class AttnRecorder:
    """Records, per U-Net call, every cross-attention layer's query and the contexts fed to its to_k.

    The first to_k input of a layer is the main context the layer attends with (the processor reads
    the cascade's context from its state, so the module's ``encoder_hidden_states`` argument would
    not show it); further to_k inputs are the CACAO editorial contexts, in the order of the edits.
    """

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.calls: list[list[LayerCall]] = []
        self.modules = dict(cross_attention_layers(unet))
        self._handles: list[Any] = []

    def __enter__(self) -> AttnRecorder:
        def on_unet(_module: Any, _args: Any) -> None:
            self.calls.append([])

        self._handles.append(self.unet.register_forward_pre_hook(on_unet))
        for name, attn in self.modules.items():

            def on_query(_m: Any, _args: Any, output: torch.Tensor, name: str = name) -> None:
                self.calls[-1].append(LayerCall(name, output.detach().clone()))

            def on_key_in(_m: Any, args: tuple[torch.Tensor, ...]) -> None:
                self.calls[-1][-1].contexts.append(args[0].detach().clone())

            def on_key_out(_m: Any, _args: Any, output: torch.Tensor) -> None:
                self.calls[-1][-1].keys.append(output.detach().clone())

            self._handles.append(attn.to_q.register_forward_hook(on_query))
            self._handles.append(attn.to_k.register_forward_pre_hook(on_key_in))
            self._handles.append(attn.to_k.register_forward_hook(on_key_out))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@pytest.fixture
def attn_recorder() -> Iterator[type[AttnRecorder]]:
    yield AttnRecorder


@pytest.fixture
def built_states(monkeypatch: pytest.MonkeyPatch) -> list[EBCAState]:
    """Every EBCAState the pipeline builds during the test, in order (to inspect its final state)."""
    states: list[EBCAState] = []

    class SpyState(EBCAState):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            states.append(self)

    monkeypatch.setattr(pipeline_module, "EBCAState", SpyState)
    return states
