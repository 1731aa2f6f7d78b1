"""Layer-level tests of the EBCA processor against docs/EBCA.md, on single Attention modules."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from numerics import FLOAT64_RTOL, LAYER_RTOL, rel_diff

from ebca_core.config import EditorialPrompt, EnergyConfig
from ebca_core.energy import attention_energy, attention_logits, bcu_update, norm_energy
from ebca_core.errors import InvalidInputError
from ebca_core.processor import EBCACrossAttnProcessor, EBCAState
from ebca_core.schedules import Schedule

HEADS, DIM_HEAD, QUERY_DIM, CTX_DIM, TOKENS, PIXELS = 2, 4, 16, 12, 5, 12


def make_attn(dtype: torch.dtype = torch.float64, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(
        query_dim=QUERY_DIM, cross_attention_dim=CTX_DIM, heads=HEADS, dim_head=DIM_HEAD, bias=False
    )
    return attn.to(dtype).eval()


def grad_of_energies(
    attn: Attention, hidden: torch.Tensor, context: torch.Tensor, gamma_attn: float, gamma_norm: float
) -> torch.Tensor:
    """-(gamma_attn dE_attn/dC + gamma_norm dE_norm/dC) through autograd (docs/EBCA.md, BCU)."""
    ctx = context.detach().clone().requires_grad_(True)
    query = attn.to_q(hidden).detach()
    key = attn.to_k(ctx)
    energy = gamma_attn * attention_energy(query, key, attn.heads, attn.scale) + gamma_norm * norm_energy(key)
    (grad,) = torch.autograd.grad(energy.sum(), ctx)
    return -grad


def run_layer(attn: Attention, state: EBCAState, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    state.begin_unet_call(context)
    with torch.no_grad():
        return EBCACrossAttnProcessor(state, "test")(attn, hidden, context)


@pytest.mark.parametrize("gammas", [(0.01, 0.02), (0.3, 0.0), (0.0, 0.7), (1.3, 0.4)])
def test_closed_form_update_equals_autograd(gammas: tuple[float, float]) -> None:
    gamma_attn, gamma_norm = gammas
    torch.manual_seed(1)
    query = torch.randn(3, PIXELS, HEADS * DIM_HEAD, dtype=torch.float64)
    w_k = torch.randn(HEADS * DIM_HEAD, CTX_DIM, dtype=torch.float64) * 0.4
    context = torch.randn(3, TOKENS, CTX_DIM, dtype=torch.float64, requires_grad=True)
    key = context @ w_k.T
    scale = DIM_HEAD**-0.5
    energy = gamma_attn * attention_energy(query, key, HEADS, scale) + gamma_norm * norm_energy(key)
    (grad,) = torch.autograd.grad(energy.sum(), context)
    update = bcu_update(
        query, key.detach(), w_k, heads=HEADS, gamma_attn=gamma_attn, gamma_norm=gamma_norm, scale=scale
    )
    # Float64: the closed form and autograd are the same gradient by different sums (numerics.py).
    assert rel_diff(update, -grad) < FLOAT64_RTOL


def test_processor_updates_context_by_minus_energy_gradient_on_both_cfg_halves() -> None:
    attn = make_attn()
    torch.manual_seed(2)
    hidden = torch.randn(4, PIXELS, QUERY_DIM, dtype=torch.float64)
    context = torch.randn(4, TOKENS, CTX_DIM, dtype=torch.float64)
    state = EBCAState(num_inference_steps=10, energy=EnergyConfig(0.05, 0.03), do_cfg=True)
    run_layer(attn, state, hidden, context)
    expected = grad_of_energies(attn, hidden, context, 0.05, 0.03)
    update = state.context.double() - context
    # Both halves of the CFG batch move (BCU step 7).
    assert rel_diff(update, expected) < FLOAT64_RTOL  # float64, different summation order
    assert update[:2].abs().max() > 0 and update[2:].abs().max() > 0


def test_layer_output_uses_context_before_its_own_update() -> None:
    attn = make_attn(torch.float32)
    torch.manual_seed(3)
    hidden = torch.randn(2, PIXELS, QUERY_DIM)
    context = torch.randn(2, TOKENS, CTX_DIM)
    state = EBCAState(num_inference_steps=4, energy=EnergyConfig(0.5, 0.5), do_cfg=True)
    out = run_layer(attn, state, hidden, context)
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, hidden, context)
    # The processor computes softmax(QK^T)V itself, SDPA fuses it: float32 round-off of one layer.
    assert rel_diff(out, plain) < LAYER_RTOL
    assert rel_diff(state.context, context) > 100 * LAYER_RTOL, "the context moved"


def test_token_weights_change_only_the_weighted_token_of_the_conditional_half() -> None:
    attn = make_attn()
    torch.manual_seed(4)
    hidden = torch.randn(4, PIXELS, QUERY_DIM, dtype=torch.float64)
    context = torch.randn(4, TOKENS, CTX_DIM, dtype=torch.float64)
    plain = EBCAState(num_inference_steps=5, energy=EnergyConfig(0.1, 0.1))
    weighted = EBCAState(num_inference_steps=5, energy=EnergyConfig(0.1, 0.1, token_weights={2: 2.5}))
    run_layer(attn, plain, hidden, context)
    run_layer(attn, weighted, hidden, context)
    diff = (weighted.context - plain.context).abs()
    assert torch.equal(weighted.context[:2], plain.context[:2])  # unconditional rows untouched
    assert diff[2:, 2].max() > 1e-4  # the weighted token moved more
    other_tokens = [0, 1, 3, 4]
    assert diff[2:, other_tokens].max() == 0
    # And the size of the change is exactly 1.5 x the attention term of that token.
    attn_only = EBCAState(num_inference_steps=5, energy=EnergyConfig(0.1, 0.0))
    run_layer(attn, attn_only, hidden, context)
    attn_term = attn_only.context.double() - context
    # Float64 throughout; the two sides sum the same terms in another order (numerics.py).
    assert rel_diff((weighted.context - plain.context)[2:, 2], 1.5 * attn_term[2:, 2]) < FLOAT64_RTOL


def test_token_index_past_the_prompt_is_rejected() -> None:
    state = EBCAState(num_inference_steps=5, energy=EnergyConfig(0.1, 0.1, token_weights={TOKENS: 2.0}))
    with pytest.raises(InvalidInputError) as err:
        state.begin_unet_call(torch.zeros(2, TOKENS, CTX_DIM))
    assert err.value.field == "energy.token_weights"


def test_only_queries_inside_the_mask_contribute_to_the_attention_term() -> None:
    torch.manual_seed(5)
    query = torch.randn(2, PIXELS, HEADS * DIM_HEAD, dtype=torch.float64)
    key = torch.randn(2, TOKENS, HEADS * DIM_HEAD, dtype=torch.float64)
    w_k = torch.randn(HEADS * DIM_HEAD, CTX_DIM, dtype=torch.float64)
    scale = DIM_HEAD**-0.5
    mask = torch.zeros(2, PIXELS, dtype=torch.float64)
    mask[:, :5] = 1.0
    kwargs = {"heads": HEADS, "gamma_attn": 1.0, "gamma_norm": 0.0, "scale": scale}
    masked = bcu_update(query, key, w_k, query_mask=mask, **kwargs)
    # Changing the queries outside the mask changes the update only through the pixel softmax
    # (step 1 still runs over all pixels): with A fixed, the term is sum over masked pixels of A q.
    logits = attention_logits(query, key, HEADS, scale)
    col = logits.transpose(-1, -2).softmax(-1)  # [B, H, N, P]
    q_heads = query.view(2, PIXELS, HEADS, DIM_HEAD).transpose(1, 2)
    manual = torch.zeros(2, HEADS, TOKENS, DIM_HEAD, dtype=torch.float64)
    for j in range(5):
        manual += col[..., j : j + 1] * q_heads[:, :, j : j + 1, :]
    manual = manual.transpose(1, 2).reshape(2, TOKENS, HEADS * DIM_HEAD) @ w_k
    assert rel_diff(masked, manual) < FLOAT64_RTOL  # float64; a loop vs a matmul (numerics.py)
    empty = bcu_update(query, key, w_k, query_mask=torch.zeros_like(mask), **kwargs)
    assert empty.abs().max() == 0
    full = bcu_update(query, key, w_k, query_mask=torch.ones_like(mask), **kwargs)
    # A mask of ones multiplies the queries by 1.0 exactly; the sums then run in another order.
    assert rel_diff(full, bcu_update(query, key, w_k, **kwargs)) < FLOAT64_RTOL


def test_region_mask_is_resized_bilinearly_to_each_layer() -> None:
    mask = torch.zeros(1, 1, 8, 6)
    mask[..., :4, :] = 1.0
    state = EBCAState(num_inference_steps=2, region_mask=mask)
    full = state.query_mask(2, 48, torch.device("cpu"))
    assert full.shape == (2, 48) and torch.equal(full[0], mask.flatten())
    half = state.query_mask(2, 12, torch.device("cpu"))  # 4 x 3 layer
    expected = torch.nn.functional.interpolate(mask, size=(4, 3), mode="bilinear", align_corners=True)
    assert torch.equal(half[1], expected.flatten())  # the same interpolate call on the same mask
    odd = EBCAState(num_inference_steps=2, region_mask=torch.ones(1, 1, 5, 7))
    assert odd.query_mask(1, 3 * 4, torch.device("cpu")).shape == (1, 12)  # ceil-halving 5x7 -> 3x4


def _cacao_outputs(direction: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attn = make_attn(torch.float32, seed=6)
    torch.manual_seed(7)
    hidden = torch.randn(2, PIXELS, QUERY_DIM)
    context = torch.randn(2, TOKENS, CTX_DIM)
    edit_embed = torch.randn(1, TOKENS, CTX_DIM)
    edit = EditorialPrompt("edit", alpha=alpha, direction=direction)
    state = EBCAState(
        num_inference_steps=3, edits=[edit], edit_embeds=edit_embed, edit_uncond_embeds=context[:1]
    )
    out = run_layer(attn, state, hidden, context)
    with torch.no_grad():
        plain = AttnProcessor2_0()
        o_main = plain(attn, hidden, context)
        o_edit = plain(attn, hidden, torch.cat([context[:1], edit_embed]))
    return out, o_main, o_edit


def test_not_direction_moves_the_output_away_from_the_editorial_output() -> None:
    out, o_main, o_edit = _cacao_outputs("not", 0.5)
    # The processor's attention vs SDPA, then the weighted sum: float32 round-off of one layer,
    # amplified by the division by 0.5 (numerics.py).
    assert rel_diff(out, (o_main - 0.5 * o_edit) / 0.5) < LAYER_RTOL
    cond = slice(1, 2)
    assert (out[cond] - o_edit[cond]).norm() > (o_main[cond] - o_edit[cond]).norm()
    # The unconditional row composes with the (unchanged) unconditional context: it stays put.
    assert rel_diff(out[:1], o_main[:1]) < LAYER_RTOL


def test_and_direction_moves_the_output_towards_the_editorial_output() -> None:
    out, o_main, o_edit = _cacao_outputs("and", 1.3)
    assert rel_diff(out, (o_main + 1.3 * o_edit) / 2.3) < LAYER_RTOL  # as above (numerics.py)
    assert (out[1:] - o_edit[1:]).norm() < (o_main[1:] - o_edit[1:]).norm()


def test_non_positive_cacao_normaliser_is_rejected_before_running() -> None:
    edits = [
        EditorialPrompt("a", alpha=0.6, direction="not"),
        EditorialPrompt("b", alpha=0.5, direction="not"),
    ]
    with pytest.raises(InvalidInputError, match="normaliser") as err:
        EBCAState(num_inference_steps=4, edits=edits, edit_embeds=torch.zeros(2, TOKENS, CTX_DIM))
    assert err.value.field == "edits"


def test_editorial_contexts_accumulate_across_calls_while_the_main_context_resets() -> None:
    attn = make_attn(torch.float32, seed=8)
    torch.manual_seed(9)
    hidden = torch.randn(2, PIXELS, QUERY_DIM)
    context = torch.randn(2, TOKENS, CTX_DIM)
    edit_embed = torch.randn(1, TOKENS, CTX_DIM)
    edit = EditorialPrompt("edit", alpha=0.7, gamma_attn=0.05, gamma_norm=0.05)
    state = EBCAState(
        num_inference_steps=3,
        energy=EnergyConfig(0.05, 0.05),
        edits=[edit],
        edit_embeds=edit_embed,
        edit_uncond_embeds=context[:1],
    )
    drift = []
    for _ in range(3):
        run_layer(attn, state, hidden, context)
        # The main context restarts from the prompt at every U-Net call; after one layer it has
        # moved by exactly one update.
        drift.append((state.edit_contexts[0] - edit_embed).norm().item())
        assert state.edit_contexts[0].dtype == torch.float32
    assert drift[0] > 0 and drift[1] > drift[0] * 1.5 and drift[2] > drift[1]
    one_update = EBCAState(num_inference_steps=3, energy=EnergyConfig(0.05, 0.05))
    run_layer(attn, one_update, hidden, context)
    # The main update is the same ops on the same inputs with or without edits: equal by construction.
    assert torch.equal(state.context, one_update.context)
    assert (state.edit_uncond_context - context[:1]).abs().max() > 0


def test_editorial_contexts_stay_float32_under_float16_and_keep_small_updates() -> None:
    attn = make_attn(torch.float32, seed=10)
    torch.manual_seed(11)
    hidden = torch.randn(2, PIXELS, QUERY_DIM)
    context = torch.randn(2, TOKENS, CTX_DIM)
    edit_embed = torch.randn(1, TOKENS, CTX_DIM)
    edit = EditorialPrompt("edit", alpha=0.5, gamma_attn=1e-4, gamma_norm=1e-4)
    state = EBCAState(num_inference_steps=2, edits=[edit], edit_embeds=edit_embed.half())
    out = run_layer(attn.half(), state, hidden.half(), context.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert state.edit_contexts[0].dtype == torch.float32
    # Updates of ~1e-4 on values of magnitude ~1 survive: in float16 most would round away.
    moved = (state.edit_contexts[0] - edit_embed.half().float()).abs()
    assert moved.max() > 0 and moved.max() < 1e-2


def test_zero_gammas_and_no_edits_run_the_stock_kernel() -> None:
    attn = make_attn(torch.float32, seed=12)
    hidden = torch.randn(2, PIXELS, QUERY_DIM)
    context = torch.randn(2, TOKENS, CTX_DIM)
    state = EBCAState(num_inference_steps=2, energy=EnergyConfig(0.0, 0.0))
    out = run_layer(attn, state, hidden, context)
    with torch.no_grad():
        assert torch.equal(out, AttnProcessor2_0()(attn, hidden, context))
    assert torch.equal(state.context, context)


def test_energy_trace_records_each_layer_call() -> None:
    attn = make_attn(torch.float32, seed=13)
    hidden = torch.randn(2, PIXELS, QUERY_DIM)
    context = torch.randn(2, TOKENS, CTX_DIM)
    state = EBCAState(num_inference_steps=2, energy=EnergyConfig(0.1, 0.1), record_energy=True)
    run_layer(attn, state, hidden, context)
    run_layer(attn, state, hidden, context)
    assert [(r["step"], r["layer"]) for r in state.energy_trace] == [(0, 0), (1, 0)]
    q = attn.to_q(hidden[1:]).detach()
    k = attn.to_k(context[1:]).detach()
    expected = attention_energy(q, k, HEADS, attn.scale).item()
    # A float32 sum over heads and tokens, in the processor's order vs this one (numerics.py).
    assert state.energy_trace[0]["e_attn"] == pytest.approx(expected, rel=LAYER_RTOL)


def test_schedule_step_count_is_checked() -> None:
    with pytest.raises(InvalidInputError):
        EBCAState(num_inference_steps=3, energy=EnergyConfig(Schedule.explicit([0.1, 0.2])))
