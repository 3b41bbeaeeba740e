"""Edge cases of sliding windows and attention sinks in prefix-sharing attention.

Layouts at the edges (prompts and responses of one token, K = 6, many documents per row, padding tails,
gaps between documents, documents out of row order, a row of padding only, a prompt with no response),
windows of 1, 2, 3, equal to and longer than every row, grouped-query 8:1 and multi-query heads, head
dims 24/40/80, sinks of ``-inf`` (no sink) beside large ones, sinks without gradient, float32 sinks with
float16 inputs, and Triton tile configurations that differ per kernel (``kv_m != kv_n``, ``atomic_dq``).
Every value is checked against the float64 reference of ``prefix_reference`` (mask by brute force from
the layout's rows), forward and backward with random upstream gradients; the model tests against an
untouched eager-attention copy of the model.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from pygpo.prefix import PrefixLayout, build_block_map, pack, prefix_attention
from pygpo.prefix.blocks import EMPTY, FULL, PARTIAL

from prefix_reference import allowed_mask, reference_attention, single_torch_thread  # noqa: F401
from test_prefix_attention import DEVICE
from test_prefix_blocks import _tiles
from test_prefix_window import _err

#: Sinks of one head each: none at all (-inf), one that takes nearly the whole softmax, ordinary ones.
SINK_VALUES = (float("-inf"), 30.0, -1.5, 0.7, 2.0, float("-inf"), 0.0, -3.0)


def _layout(name: str) -> PrefixLayout:
    if name == "k6-len1":  # prompts and responses of one token, K = 6, a padding tail, one document per row
        return PrefixLayout.from_lengths([[(1, [1] * 6)], [(1, [1, 1])]], seq_len=9)
    if name == "many-docs":  # four documents in a row, K up to 6, S = 27 (no multiple of any tile)
        return PrefixLayout.from_lengths([[(1, [1, 1]), (2, [1, 3]), (1, [2, 1, 1, 1, 1, 1]), (3, [1, 1])],
                                          [(5, [4, 2])]], seq_len=27)
    # gaps between documents, documents out of row order, a row of padding only, a prompt with no response
    return PrefixLayout(3, 30, doc_row=[0, 0, 2, 2], doc_start=[12, 2, 5, 0], prompt_len=[1, 3, 2, 3],
                        resp_doc=[0, 0, 0, 1, 1, 2, 2], resp_start=[13, 15, 16, 5, 6, 7, 8],
                        resp_len=[2, 1, 4, 1, 3, 1, 20])


LAYOUTS = ["k6-len1", "many-docs", "gaps"]
HEADS = [(8, 1, 24), (3, 1, 40), (4, 2, 80)]  # (Hq, Hkv, d): GQA 8:1, multi-query, grouped


def _window(window, layout: PrefixLayout):
    """``"S"``: as long as the rows; ``"S+7"``: longer than every sequence."""
    return {"S": layout.seq_len, "S+7": layout.seq_len + 7}.get(window, window)


def _sinks(kind: str, hq: int, dtype=torch.float32):
    """``"none"``, or the first ``hq`` of :data:`SINK_VALUES`, with a gradient (``"mixed"``) or without (``"frozen"``)."""
    if kind == "none":
        return None
    sinks = torch.tensor(SINK_VALUES[:hq], device=DEVICE, dtype=dtype)
    return sinks if kind == "frozen" else sinks.requires_grad_()


def _check(layout, hq, hkv, d, dtype, window, sinks, tol, seed=0, attend=None):
    """``attend(q, k, v)`` (default: the torch backend) against the float64 reference, forward and
    gradients of q, k, v and (when they take one) the sinks; returns the largest error."""
    B, S = layout.shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, d, generator=g).to(DEVICE, dtype).requires_grad_() for h in (hq, hkv, hkv))
    if attend is None:
        attend = lambda q, k, v: prefix_attention(q, k, v, layout, sliding_window=window, sinks=sinks,  # noqa: E731
                                                  backend="torch")
    out = attend(q, k, v)
    do = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    inputs = [q, k, v] + ([sinks] if sinks is not None and sinks.requires_grad else [])
    grads = torch.autograd.grad(out, inputs, do)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref_sinks = None if sinks is None else (ref_in[3] if len(ref_in) == 4 else sinks.double().cpu())
    ref = reference_attention(*ref_in[:3], allowed_mask(layout, window), None, sinks=ref_sinks)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double().cpu())
    errors = [_err(out, ref)] + [_err(a, r) for a, r in zip(grads, ref_grads)]
    assert max(errors) < tol, errors
    return max(errors)


@pytest.mark.parametrize("window", [1, 2, 3, "S", "S+7", None])
@pytest.mark.parametrize("name", LAYOUTS)
def test_torch_backend_at_the_edges(name, window):
    layout = _layout(name)
    i = LAYOUTS.index(name) + [1, 2, 3, "S", "S+7", None].index(window)
    hq, hkv, d = HEADS[i % 3]
    sinks = _sinks(["mixed", "frozen", "none"][i % 3], hq, torch.float64)
    _check(layout, hq, hkv, d, torch.float64, _window(window, layout), sinks, 1e-12, seed=i)


def _config(fwd, dq, kv, atomic):
    from pygpo.kernels.prefix_blocks import PrefixAttentionConfig

    return PrefixAttentionConfig(*fwd, *dq, *kv, atomic_dq=atomic)


TRITON_CASES = [  # layout, heads, window, sinks, (fwd, dq, kv tiles), atomic_dq
    ("k6-len1", HEADS[0], 1, "mixed", ((16, 32), (32, 16), (32, 16)), False),
    ("many-docs", HEADS[1], 2, "mixed", ((32, 16), (16, 32), (16, 64)), True),
    ("gaps", HEADS[2], 3, "frozen", ((16, 16), (16, 16), (64, 32)), True),
    ("gaps", HEADS[0], "S", "mixed", ((16, 16), (16, 16), (16, 16)), False),
    ("many-docs", HEADS[2], None, "mixed", ((64, 16), (32, 32), (16, 32)), False),
    ("k6-len1", HEADS[1], 2, "none", ((16, 16), (16, 16), (32, 16)), True),
]


@pytest.mark.parametrize("name, heads, window, sinks, tiles, atomic", TRITON_CASES)
def test_triton_at_the_edges(name, heads, window, sinks, tiles, atomic):
    """Interpreted on CPU in float32. The sinks of ``-inf`` made the forward kernel return NaN wherever a
    query's first visited tile hid every key from it (its running max started at ``-inf``)."""
    from pygpo.prefix.triton_attention import triton_prefix_attention

    layout = _layout(name)
    hq, hkv, d = heads
    window = _window(window, layout)
    s = _sinks(sinks, hq)
    cfg = _config(*tiles, atomic)
    _check(layout, hq, hkv, d, torch.float32, window, s, 1e-5,
           attend=lambda q, k, v: triton_prefix_attention(q, k, v, layout, d ** -0.5, cfg, window, s))


def test_triton_float16_with_float32_sinks_of_minus_inf():
    """Float16 inputs with float32 sinks (some ``-inf``): as close to float64 as the torch backend in float16."""
    layout = _layout("many-docs")
    errors = {}
    for backend in ("torch", "triton"):
        sinks = _sinks("mixed", 4)
        attend = lambda q, k, v: prefix_attention(q, k, v, layout, sliding_window=2, sinks=sinks,  # noqa: E731
                                                  backend=backend)
        errors[backend] = _check(layout, 4, 2, 40, torch.float16, 2, sinks, 1e-2, attend=attend)
    assert errors["triton"] <= 2 * errors["torch"], errors


@pytest.mark.parametrize("field, size", [("kv_m", 8), ("dq_n", 24), ("fwd_m", 0), ("kv_n", 32.0)])
def test_config_refuses_tiles_the_kernels_cannot_take(field, size):
    """Tiles are powers of two of at least 16 (``tl.arange``, ``tl.dot``): others failed inside triton, far
    from the configuration (or, for 0, with a division by zero)."""
    from pygpo.kernels.prefix_blocks import PrefixAttentionConfig

    tiles = dict(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, kv_m=16, kv_n=16)
    with pytest.raises(ValueError, match=f"PrefixAttentionConfig.{field} must be a power of two of at least 16"):
        PrefixAttentionConfig(**{**tiles, field: size})


def _random_rows(seed: int, seq_len: int) -> PrefixLayout:
    """1-3 rows of up to 5 documents: prompts of 1..6 tokens (often 1), K of 1..6, responses of 1..6."""
    rng = random.Random(seed)
    length = lambda: rng.choice([1, rng.randint(1, 6)])  # noqa: E731
    rows = []
    for _ in range(rng.randint(1, 3)):
        docs, used = [], 0
        for _ in range(rng.randint(1, 5)):
            p, lens = length(), [length() for _ in range(rng.randint(1, 6))]
            if used + p + sum(lens) > seq_len:
                break
            docs.append((p, lens))
            used += p + sum(lens)
        rows.append(docs or [(1, [1])])
    return PrefixLayout.from_lengths(rows, seq_len=seq_len)


def _covered(count: torch.Tensor, runs: torch.Tensor, n: int) -> torch.Tensor:
    """Bool ``(..., n)``: the blocks inside the first ``count`` runs ``[start, stop)`` of each list row."""
    j = torch.arange(n)
    live = torch.arange(runs.shape[-2]) < count[..., None]
    inside = (j >= runs[..., :, None, 0]) & (j < runs[..., :, None, 1]) & live[..., None]
    return inside.any(-2)


@pytest.mark.parametrize("seed", range(6))
def test_block_map_states_and_runs_with_windows(seed):
    """FULL / PARTIAL / EMPTY against the brute-force mask of every tile, and the run lists the kernels
    walk cover exactly those tiles, for windows and square, oblong and odd tiles."""
    rng = random.Random(seed)
    layout = _random_rows(seed, rng.randint(9, 45))
    for window in (1, 2, rng.randint(3, 9), layout.seq_len):
        allowed = allowed_mask(layout, window)
        for bm, bn in ((16, 16), (16, 32), (32, 16), (3, 5)):
            any_, all_ = _tiles(allowed, bm, bn)
            bmap = build_block_map(layout, bm, bn, sliding_window=window)
            state, n_q, n_k = bmap.state, bmap.num_q_blocks, bmap.num_k_blocks
            assert torch.equal(state != EMPTY, any_) and torch.equal(state == FULL, all_), (window, bm, bn)
            t = state.transpose(1, 2)
            for (count, runs), want, n in (((bmap.q_full_count, bmap.q_full_runs), state == FULL, n_k),
                                           ((bmap.q_part_count, bmap.q_part_runs), state == PARTIAL, n_k),
                                           ((bmap.k_full_count, bmap.k_full_runs), t == FULL, n_q),
                                           ((bmap.k_part_count, bmap.k_part_runs), t == PARTIAL, n_q)):
                assert torch.equal(_covered(count, runs, n), want), (window, bm, bn)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("window", [2 ** 63, 2 ** 70])
def test_huge_window_is_no_window(window, backend):
    """A window of ``2**63`` wrapped around in int64 comparisons (the torch backend masked every key of a
    later response: silently wrong), and ``2**70`` did not fit in int64 at all; every position is below
    ``S``, so both are no window."""
    layout = _layout("many-docs")
    assert torch.equal(layout.token_bounds(sliding_window=window), layout.token_bounds())
    dtype = torch.float64 if backend == "torch" else torch.float32
    attend = lambda q, k, v: prefix_attention(q, k, v, layout, sliding_window=window, backend=backend)  # noqa: E731
    _check(layout, 2, 1, 24, dtype, None, None, 1e-12 if backend == "torch" else 1e-5, attend=attend)


# ------------------------------------------------------------------------------------------ models
# (transformers is optional: imported by the model tests only)

VOCAB = 67
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, attn_implementation="eager")


def _model(arch: str, window: int):
    """A tiny random model with sliding-window layers, with prefix sharing enabled on a deep copy: ``(eager
    model, shared model)``. GPT-OSS's learned sinks are made to matter, one head's set to ``-inf``."""
    transformers = pytest.importorskip("transformers")
    from pygpo.integrations.transformers import enable_prefix_sharing

    if arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=window, **COMMON))
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(head_dim=8, sliding_window=window, query_pre_attn_scalar=8,
                                            layer_types=["sliding_attention", "full_attention"], **COMMON)
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        cfg = transformers.GptOssConfig(head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=window,
                                        layer_types=["sliding_attention", "full_attention"], **COMMON)
        model = transformers.GptOssForCausalLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("sinks"):
                    p.normal_(0.0, 1.5, generator=torch.Generator().manual_seed(1))
                    p[0] = float("-inf")  # one head without a sink
    model = model.float()
    return model, enable_prefix_sharing(copy.deepcopy(model), backend="torch")


def _data(seed: int, n: int, k_max: int):
    """``n`` prompts (often of one token), each with 2..k_max responses (often of one token)."""
    rng = random.Random(seed)
    tok = lambda m: [rng.randrange(VOCAB) for _ in range(m)]  # noqa: E731
    length = lambda: rng.choice([1, rng.randint(1, 6)])  # noqa: E731
    return ([tok(length()) for _ in range(n)],
            [[tok(length()) for _ in range(rng.randint(2, k_max))] for _ in range(n)])


def _assert_matches_eager(shared, ref, batch, prompts, responses):
    """Log-probs and every parameter's gradient (sinks included) of one shared forward against separate
    eager forwards. Gradients are compared at the model's largest gradient's scale: with a window of 1 a
    query sees only itself, so the eager query/key gradients of a window layer are exactly zero."""
    from pygpo.integrations.transformers import response_logprobs
    from test_prefix_transformers import _separate_logprobs

    order = list(zip(batch.response_example.tolist(), batch.response_rank.tolist()))
    got, want = response_logprobs(shared, batch), _separate_logprobs(ref, prompts, responses, order)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = torch.randn(len(order), generator=torch.Generator().manual_seed(2))
    (got * w).sum().backward()
    (want * w).sum().backward()
    pairs = [(n, a.grad, b.grad) for (n, a), (_, b) in zip(shared.named_parameters(), ref.named_parameters())]
    scale = max(float(g.abs().max()) for _, _, g in pairs)
    for name, g_s, g_r in pairs:
        torch.testing.assert_close(g_s, g_r, rtol=1e-5, atol=1e-5 * scale, msg=name)
    assert any(n.endswith("sinks") for n, _, _ in pairs) == (shared.config.model_type == "gpt_oss")


@pytest.mark.parametrize("arch, window", [("mistral", 1), ("gemma3", 2), ("gpt_oss", 1), ("gpt_oss", 2)])
def test_models_with_windows_of_one_and_two(arch, window):
    """K up to 6, prompts and responses of one token, packed rows longer than the window."""
    torch.manual_seed(0)
    ref, shared = _model(arch, window)
    prompts, responses = _data(window, 5, 6)
    batch = pack(prompts, responses, max_tokens=24)
    assert max(batch.responses_per_example.tolist()) >= 5 and batch.input_ids.shape[0] < 5
    _assert_matches_eager(shared, ref, batch, prompts, responses)


@pytest.mark.parametrize("mode", ["train", "checkpointing"])
@pytest.mark.parametrize("arch", ["gpt_oss", "gemma3"])
def test_training_mode_and_gradient_checkpointing(arch, mode):
    """``model.train()`` (attention_dropout 0) and gradient checkpointing of the shared model with a layout."""
    torch.manual_seed(1)
    ref, shared = (m.train() for m in _model(arch, 2))
    if mode == "checkpointing":
        # transformers 5 renamed it (the old name warns)
        getattr(shared, "activation_checkpointing_enable", shared.gradient_checkpointing_enable)()
    prompts, responses = _data(7, 4, 4)
    _assert_matches_eager(shared, ref, pack(prompts, responses, max_tokens=24), prompts, responses)


def test_generate_with_left_padding_on_a_sink_model():
    """Greedy generation of GPT-OSS (a window of 2, shorter than the prompts; sinks) with prefix sharing
    enabled but no layout, left-padded, against the untouched eager model: same tokens, same scores."""
    torch.manual_seed(2)
    ref, shared = (m.eval() for m in _model("gpt_oss", 2))
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
    want, got = ref.generate(**kwargs), shared.generate(**kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
