"""FusedPreferenceLoss on a real (tiny, random) Llama: padded rows and prefix-shared batches give the
DPO loss and gradients of the materialised-logits computation."""

from __future__ import annotations

import copy

import pytest
import torch

import pygpo
from pygpo.losses import preference_loss
from pygpo.prefix import pack

transformers = pytest.importorskip("transformers")
from pygpo.integrations.transformers import disable_prefix_sharing, enable_prefix_sharing  # noqa: E402

V = 96


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).double()


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, V, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(n) for n in (5, 3, 7)]
    responses = [[ids(a), ids(b)] for a, b in ((4, 6), (2, 3), (5, 1))]
    return prompts, responses


def _padded_rows(prompts, responses):
    """Rank-major rows prompt+response, right-padded; labels shifted, -100 on prompt and padding."""
    seqs, prompt_lens = [], []
    for k in range(2):
        for p, rs in zip(prompts, responses):
            seqs.append(p + rs[k])
            prompt_lens.append(len(p))
    t = max(map(len, seqs))
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    attn = torch.zeros(len(seqs), t, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100)
    for i, (s, pl) in enumerate(zip(seqs, prompt_lens)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        labels[i, pl - 1 : len(s) - 1] = torch.tensor(s[pl:])
    return ids, attn, labels


def _materialised_dpo(model, ref_model, ids, attn, labels, beta):
    def seq_logps(m):
        logits = m(input_ids=ids, attention_mask=attn).logits
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        s = torch.where(labels != -100, lp, torch.zeros((), dtype=lp.dtype)).sum(-1)
        return s.view(2, -1).T

    with torch.no_grad():
        ref = seq_logps(ref_model)
    return preference_loss("dpo", seq_logps(model), ref, beta=beta).loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padded_rows_and_prefix_sharing_match_materialised_logits():
    prompts, responses = _data()
    ids, attn, labels = _padded_rows(prompts, responses)
    model = _model()
    ref_model = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the policy
        for prm in ref_model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))

    expected = _materialised_dpo(model, ref_model, ids, attn, labels, beta=0.2)
    expected.backward()
    g_expected = _grads(model)
    model.zero_grad()

    loss_fn = pygpo.FusedPreferenceLoss("dpo", beta=0.2)
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    with torch.no_grad():
        ref_hidden = ref_model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    out = loss_fn(hidden, model.lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref_model.lm_head.weight)
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-11)
    out.loss.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, g_expected[name], rtol=1e-7, atol=1e-10, msg=name)
    model.zero_grad()

    batch = pack(prompts, responses)
    enable_prefix_sharing(model, backend="torch")
    enable_prefix_sharing(ref_model, backend="torch")
    try:
        hidden = model.model(input_ids=batch.input_ids, prefix_layout=batch.layout).last_hidden_state
        with torch.no_grad():
            ref_hidden = ref_model.model(input_ids=batch.input_ids, prefix_layout=batch.layout).last_hidden_state
        shared = loss_fn(hidden, model.lm_head.weight, batch=batch, ref_hidden=ref_hidden,
                         ref_weight=ref_model.lm_head.weight)
    finally:
        disable_prefix_sharing(model)
        disable_prefix_sharing(ref_model)
    torch.testing.assert_close(shared.loss, expected, rtol=1e-9, atol=1e-11)
    shared.loss.backward()
    # The shared forward runs other SDPA calls (one per span) than the padded one; in float64 their
    # backward passes agree to about 1e-8 absolute on this model (the forward outputs are identical).
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, g_expected[name], rtol=1e-6, atol=1e-7, msg=name)
