"""Energy-based cross-attention as a diffusers attention processor.

:class:`EBCAState` holds everything one generation needs (step sizes, token weights, the CACAO
editorial prompts and their contexts, the inpainting mask, the running context of the cascade).
:func:`ebca_attention` installs one :class:`EBCACrossAttnProcessor` per cross-attention layer of a stock
``UNet2DConditionModel`` for the duration of a ``with`` block and restores the previous processors on
exit, also when the block raises. Self-attention layers keep their processor (SDPA): EBCA does no work
there (docs/EBCA.md, "Cascade" and "Deliberate differences").

The cascade (docs/EBCA.md, "Cascade") needs state that crosses layers: every cross-attention
processor reads the context left by the previous cross-attention layer from the shared state object and
writes its updated context back. A forward pre-hook on the U-Net resets that running context to the
prompt embeddings at every U-Net call, and counts U-Net calls: call ``i`` evaluates the schedules at
step ``i``. Because all of this rides on the processor interface and a hook, a stock diffusers
``StableDiffusionPipeline`` works inside the ``with`` block too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ebca_core.config import EditorialPrompt, EnergyConfig, check_energy_and_edits
from ebca_core.energy import (
    _upcast,
    attention_energy_from_logits,
    attention_logits,
    bcu_update,
    merge_heads,
    nonzero,
    norm_energy,
    split_heads,
)
from ebca_core.errors import EBCAError, InvalidInputError
from ebca_core.schedules import Schedule


@dataclass(frozen=True)
class RowEnergy:
    """The BCU settings of consecutive images of a batch: one request's share of a batched call.

    ``token_weights`` are resolved token indices of that request's prompt. Rows of different requests
    never mix: every quantity of the update is per row (docs/EBCA.md, "Batches of requests").
    """

    images: int
    energy: EnergyConfig | None
    token_weights: Mapping[int, float]


#: A step size for every row of the batch: one number (all rows alike) or a ``[images]`` tensor.
Gamma = float | torch.Tensor


@dataclass
class _Editorial:
    """One CACAO editorial prompt, resolved into schedules."""

    sign: float
    alpha: Schedule
    gamma_attn: Schedule
    gamma_norm: Schedule


class EBCAState:
    """Per-generation state shared by the EBCA processors of one U-Net.

    Create one per generation (one call of a pipeline); nothing carries over between two states.

    Args:
        num_inference_steps: ``T`` of the schedules (docs/EBCA.md, "Step-size schedules").
        num_unet_calls: ``len(scheduler.timesteps)``; defaults to ``num_inference_steps``.
        energy: BCU on the main prompt; ``None`` means plain attention for the main prompt.
        token_weights: resolved token index -> multiplier (conditional half only). Overrides any
            integer-keyed ``energy.token_weights``; words must be resolved by the caller.
        do_cfg: the batch is ``[unconditional rows; conditional rows]`` (diffusers' order).
        edits: CACAO editorial prompts.
        edit_embeds: ``[S, N, D]`` text embeddings of the editorial prompts (one row each).
        edit_uncond_embeds: ``[1 or B, N, D]`` unconditional embedding the shared unconditional
            editorial context starts from; defaults to the unconditional half of the first U-Net call.
        region_mask: ``[B, 1, h, w]`` at latent resolution, 1 = region to repaint (text-guided
            inpainting); multiplies the queries of the BCU attention term.
        record_energy: append per-layer energies to :attr:`energy_trace` at every U-Net call.
        row_energies: per-request BCU settings of a batch of requests (instead of ``energy`` and
            ``token_weights``, which then stay None): image rows in order, each group its own gammas,
            schedules and token weights.
    """

    def __init__(
        self,
        *,
        num_inference_steps: int,
        num_unet_calls: int | None = None,
        energy: EnergyConfig | None = None,
        token_weights: Mapping[int, float] | None = None,
        do_cfg: bool = True,
        edits: Sequence[EditorialPrompt] = (),
        edit_embeds: torch.Tensor | None = None,
        edit_uncond_embeds: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        record_energy: bool = False,
        row_energies: Sequence[RowEnergy] | None = None,
        _checked: bool = False,
    ) -> None:
        # ``_checked``: the caller (EBCAPipeline.check_inputs) has run every check of these arguments,
        # token indices against the tokenized prompt included, so they do not run a second time.
        if num_inference_steps < 1:
            raise InvalidInputError("must be >= 1", field="num_inference_steps")
        self.num_inference_steps = num_inference_steps
        self.num_unet_calls = num_unet_calls if num_unet_calls is not None else num_inference_steps
        self.do_cfg = do_cfg
        self.record_energy = record_energy

        if not _checked:
            check_energy_and_edits(energy, edits, num_inference_steps, self.num_unet_calls)
        self._indices_checked = _checked
        self.energy = energy
        self.gamma_attn = energy.attn_schedule() if energy is not None else Schedule.constant(0.0)
        self.gamma_norm = energy.norm_schedule() if energy is not None else Schedule.constant(0.0)
        if token_weights is None and energy is not None and energy.token_weights:
            words = [k for k in energy.token_weights if not isinstance(k, int)]
            if words:
                raise InvalidInputError(
                    f"token weights by word ({', '.join(map(str, words))}) must be resolved to token "
                    "indices by the pipeline before building the state",
                    field="energy.token_weights",
                )
            token_weights = {int(k): float(v) for k, v in energy.token_weights.items()}
        self.token_weights = dict(token_weights or {})
        self._groups = self._row_groups(row_energies, energy, token_weights, edits)

        self.edits = [_Editorial(e.sign, e.alpha_schedule(), *e.gamma_schedules()) for e in edits]
        if self.edits and (edit_embeds is None or edit_embeds.shape[0] != len(self.edits)):
            raise InvalidInputError("edit_embeds must hold one embedding per editorial prompt", "edits")
        self._edit_embeds = edit_embeds
        self._edit_uncond_embeds = edit_uncond_embeds
        self.region_mask = region_mask

        # Running state, (re)built by the U-Net pre-hook.
        self.step_index = -1
        self.layer_index = 0
        self.context: torch.Tensor | None = None  # main context of the cascade (accum_dtype)
        self.accum_dtype = torch.float32
        # Editorial contexts (float32, docs/EBCA.md "Deliberate differences"): created at the first
        # U-Net call and never reset, so they accumulate across layers and denoising steps.
        self.edit_uncond_context: torch.Tensor | None = None  # [B, N, D]
        self.edit_contexts: list[torch.Tensor] = []  # S x [B, N, D]
        self.energy_trace: list[dict[str, Any]] = []
        self._mask_cache: dict[tuple[int, int], torch.Tensor] = {}

    # --- called by the U-Net pre-hook -------------------------------------------------------------
    def begin_unet_call(self, encoder_hidden_states: torch.Tensor) -> None:
        """Start a U-Net call: the main context restarts from the prompt embeddings.

        docs/EBCA.md, "Cascade", rule 4.
        """
        self.step_index += 1
        self.layer_index = 0
        if self.step_index >= self.num_unet_calls:
            raise EBCAError(
                f"the U-Net was called {self.step_index + 1} times but the state was built for "
                f"{self.num_unet_calls} calls; build one EBCAState per generation"
            )
        rows, num_tokens = encoder_hidden_states.shape[:2]
        for index in () if self._indices_checked else self.token_weights:
            if index >= num_tokens:
                raise InvalidInputError(
                    f"token index {index} is past the prompt's {num_tokens} tokens",
                    field="energy.token_weights",
                )
        if self.do_cfg and rows % 2:
            raise EBCAError("classifier-free guidance needs an even number of batch rows")
        # Contexts accumulate in float32 at least (float64 stays float64).
        self.accum_dtype = torch.promote_types(encoder_hidden_states.dtype, torch.float32)
        self.context = encoder_hidden_states.detach().to(self.accum_dtype).clone()
        if self.edits and self.step_index == 0:
            images = rows // 2 if self.do_cfg else rows
            assert self._edit_embeds is not None
            embeds = self._edit_embeds.detach().to(encoder_hidden_states.device, self.accum_dtype)
            self.edit_contexts = [
                embeds[s : s + 1].expand(images, -1, -1).clone() for s in range(len(self.edits))
            ]
            if self.do_cfg:
                uncond = self._edit_uncond_embeds
                if uncond is None:
                    uncond = encoder_hidden_states[:images]
                uncond = uncond.detach().to(encoder_hidden_states.device, self.accum_dtype)
                self.edit_uncond_context = uncond.expand(images, -1, -1).clone()

    # --- helpers for the processors -----------------------------------------------------------------
    @staticmethod
    def _row_groups(
        row_energies: Sequence[RowEnergy] | None,
        energy: EnergyConfig | None,
        token_weights: Mapping[int, float] | None,
        edits: Sequence[EditorialPrompt],
    ) -> list[tuple[int, Schedule, Schedule, dict[int, float]]] | None:
        """Per-request (images, gamma_attn, gamma_norm, token weights), or None for one call's settings."""
        if row_energies is None:
            return None
        if energy is not None or token_weights or edits:
            raise EBCAError("row_energies replaces energy and token_weights and excludes edits")
        zero = Schedule.constant(0.0)
        return [
            (
                g.images,
                g.energy.attn_schedule() if g.energy is not None else zero,
                g.energy.norm_schedule() if g.energy is not None else zero,
                dict(g.token_weights),
            )
            for g in row_energies
        ]

    def gammas(self) -> tuple[Gamma, Gamma]:
        """The step sizes at this U-Net call: numbers, or ``[images]`` tensors when a batch of requests
        has rows with different values (numbers again when they agree, so that a request alone and a
        batch of identical ones run the same kernels)."""
        i, t = self.step_index, self.num_inference_steps
        if self._groups is None:
            return self.gamma_attn(i, t), self.gamma_norm(i, t)
        attn = [g_attn(i, t) for n, g_attn, _, _ in self._groups for _ in range(n)]
        norm = [g_norm(i, t) for n, _, g_norm, _ in self._groups for _ in range(n)]
        return _per_row(attn), _per_row(norm)

    def row_gammas(self, gamma: Gamma, rows: int) -> Gamma:
        """A per-image step size for every batch row (both halves with guidance)."""
        if not isinstance(gamma, torch.Tensor):
            return gamma
        return torch.cat([gamma, gamma]) if self.do_cfg else gamma

    def token_weight_rows(self, rows: int, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """``[rows, N]`` multipliers: the weights on conditional rows, ones elsewhere (BCU step 3)."""
        first_cond = rows // 2 if self.do_cfg else 0
        if self._groups is None:
            groups = [(rows - first_cond, self.token_weights)]
        else:
            groups = [(n, weights) for n, _, _, weights in self._groups]
        if not any(weights for _, weights in groups):
            return None
        result = torch.ones(rows, num_tokens, device=device)
        start = first_cond
        for images, weights in groups:
            for index, weight in weights.items():
                result[start : start + images, index] = weight
            start += images
        return result

    def query_mask(self, rows: int, num_pixels: int, device: torch.device) -> torch.Tensor | None:
        """The region mask resized to this layer's h x w (bilinear, align_corners=True): ``[rows, P]``."""
        if self.region_mask is None:
            return None
        h, w = self.region_mask.shape[-2:]
        while h * w > num_pixels:  # U-Net downsamplers: stride-2 convs with padding 1 -> ceil(h / 2)
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w != num_pixels:
            raise EBCAError(f"cannot map a {num_pixels}-pixel layer onto the region mask")
        cached = self._mask_cache.get((h, w))
        if cached is None:
            mask = self.region_mask.float().to(device)
            if mask.shape[-2:] != (h, w):
                mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=True)
            cached = mask.flatten(1)  # [B, P]
            self._mask_cache[(h, w)] = cached
        images = cached.shape[0]
        if rows == images:
            return cached
        if rows % images:
            raise EBCAError(f"the region mask has {images} rows but the batch has {rows}")
        return cached.repeat(rows // images, 1)


def _attend(
    attn: Attention, attention_mask: torch.Tensor | None, ctx: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """to_out(attention(q, ctx)) of one layer, with the logits and keys kept for the update."""
    heads = attn.heads
    key = attn.to_k(ctx)
    value = attn.to_v(ctx)
    logits = attention_logits(q, key, heads, attn.scale)
    if attention_mask is not None and attention_mask.shape[0] == logits.shape[0]:
        logits = logits + attention_mask
    probs = _upcast(logits).softmax(dim=-1).to(q.dtype)
    out = merge_heads(torch.matmul(probs, split_heads(value, heads)))
    return attn.to_out[1](attn.to_out[0](out)), logits, key


def _per_row(values: list[float]) -> Gamma:
    return values[0] if all(v == values[0] for v in values) else torch.tensor(values, dtype=torch.float64)


class EBCACrossAttnProcessor:
    """Cross-attention with the Bayesian Context Update and CACAO (docs/EBCA.md)."""

    def __init__(self, state: EBCAState, name: str) -> None:
        self.state = state
        self.name = name
        self._plain = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        state = self.state
        if encoder_hidden_states is None or state.context is None:
            # Not a cross-attention call, or called outside a U-Net forward: plain attention.
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        layer = state.layer_index
        state.layer_index += 1

        gamma_attn, gamma_norm = state.gammas()
        main_bcu = nonzero(gamma_attn) or nonzero(gamma_norm)
        i, t = state.step_index, state.num_inference_steps
        edit_terms = [(e.sign * e.alpha(i, t), e.gamma_attn(i, t), e.gamma_norm(i, t)) for e in state.edits]
        active_edits = any(w != 0.0 or ga != 0.0 or gn != 0.0 for w, ga, gn in edit_terms)
        context = state.context.to(hidden_states.dtype)
        if not (main_bcu or active_edits or state.record_energy):
            # Nothing EBCA-specific at this step: the stock kernel with the cascade's context.
            return self._plain(attn, hidden_states, context, attention_mask, temb)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        rows, num_pixels, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], rows)
            attention_mask = attention_mask.view(rows, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        heads, scale = attn.heads, attn.scale
        w_k = attn.to_k.weight
        query_mask = state.query_mask(rows, num_pixels, query.device)

        attend = functools.partial(_attend, attn, attention_mask)

        # Main prompt: the layer's output uses its input context (docs/EBCA.md, "Cascade", rule 2).
        out, logits, key = attend(context, query)
        if state.record_energy:
            self._record(state, layer, query, key, logits, scale)
        if main_bcu:
            gamma_attn, gamma_norm = state.row_gammas(gamma_attn, rows), state.row_gammas(gamma_norm, rows)
            d_context = bcu_update(
                query,
                key,
                w_k,
                heads=heads,
                gamma_attn=gamma_attn,
                gamma_norm=gamma_norm,
                logits=logits,
                token_weights=state.token_weight_rows(rows, key.shape[1], query.device),
                query_mask=query_mask,
            )
            state.context = state.context + d_context.to(state.accum_dtype)

        if active_edits:
            out = self._cacao(attn, state, out, query, query_mask, edit_terms, attend, rows)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _cacao(
        attn: Attention,
        state: EBCAState,
        out_main: torch.Tensor,
        query: torch.Tensor,
        query_mask: torch.Tensor | None,
        edit_terms: list[tuple[float, float, float]],
        attend: Any,
        rows: int,
    ) -> torch.Tensor:
        """Composition of the editorial outputs and their own BCU (docs/EBCA.md, "CACAO")."""
        dtype = query.dtype
        images = rows // 2 if state.do_cfg else rows
        combined = out_main
        normaliser = 1.0
        uncond_updates: list[torch.Tensor] = []
        for s, (weight, gamma_attn, gamma_norm) in enumerate(edit_terms):
            if weight == 0.0 and gamma_attn == 0.0 and gamma_norm == 0.0:
                continue
            cond_ctx = state.edit_contexts[s]
            if state.do_cfg:
                assert state.edit_uncond_context is not None
                ctx = torch.cat([state.edit_uncond_context, cond_ctx])
            else:
                ctx = cond_ctx
            out_s, logits_s, key_s = attend(ctx.to(dtype), query)
            if weight != 0.0:
                # The combination happens after to_out; the editorial output uses the context from
                # before its own update, like the main one.
                combined = combined + weight * out_s
                normaliser += weight
            if gamma_attn != 0.0 or gamma_norm != 0.0:
                d_ctx = bcu_update(
                    query,
                    key_s,
                    attn.to_k.weight,
                    heads=attn.heads,
                    gamma_attn=gamma_attn,
                    gamma_norm=gamma_norm,
                    logits=logits_s,
                    query_mask=query_mask,
                ).to(state.accum_dtype)
                if state.do_cfg:
                    uncond_updates.append(d_ctx[:images])
                    state.edit_contexts[s] = cond_ctx + d_ctx[images:]
                else:
                    state.edit_contexts[s] = cond_ctx + d_ctx
        if uncond_updates:
            # The shared unconditional editorial context moves by the mean of the editorial
            # unconditional updates (prompts whose gammas are 0 at this step contribute 0).
            assert state.edit_uncond_context is not None
            state.edit_uncond_context = state.edit_uncond_context + torch.stack(uncond_updates).sum(0) / len(
                edit_terms
            )
        return combined if combined is out_main else combined / normaliser

    @staticmethod
    def _record(
        state: EBCAState,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        logits: torch.Tensor,
        scale: float,
    ) -> None:
        rows = query.shape[0]
        cond = slice(rows // 2, rows) if state.do_cfg else slice(0, rows)
        e_attn = attention_energy_from_logits(logits, scale)
        e_norm = norm_energy(key)
        state.energy_trace.append(
            {
                "step": state.step_index,
                "layer": layer,
                "e_attn": float(e_attn[cond].mean()),
                "e_norm": float(e_norm[cond].mean()),
            }
        )


def cross_attention_layers(unet: torch.nn.Module) -> list[tuple[str, Attention]]:
    """The cross-attention modules of a U-Net, in registration order.

    Registration order is not call order (diffusers registers the mid block after the up blocks); the
    cascade does not depend on it, because every processor reads and writes the shared running context
    at the moment it is called.
    """
    return [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    ]


@contextlib.contextmanager
def ebca_attention(unet: Any, state: EBCAState) -> Iterator[EBCAState]:
    """Install EBCA processors on ``unet``'s cross-attention layers for the ``with`` block.

    The previous processors come back on exit, also when the block raises.
    """
    layers = cross_attention_layers(unet)
    if not layers:
        raise EBCAError("the U-Net has no cross-attention layers; EBCA needs a text-conditioned U-Net")
    for name, module in layers:
        if module.norm_cross is not None or getattr(module, "norm_k", None) is not None:
            # The closed-form update goes through W_k alone (docs/EBCA.md, BCU step 5); a norm on the keys'
            # input would make it wrong.
            raise EBCAError(f"{name}: cross-attention with a context or key norm is not supported")
    previous = dict(unet.attn_processors)
    processors: dict[str, Any] = dict(previous)
    for name, _ in layers:
        processors[f"{name}.processor"] = EBCACrossAttnProcessor(state, name)

    def pre_hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        context = kwargs.get("encoder_hidden_states")
        if context is None and len(args) > 2:
            context = args[2]
        if context is None:
            raise EBCAError("the U-Net was called without encoder_hidden_states")
        state.begin_unet_call(context)

    unet.set_attn_processor(processors)
    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()
        unet.set_attn_processor(previous)
        state.context = None
