"""Registry coverage of LOSSES.md sections 1-8, spec metadata, the generated docs table and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pygpo.losses as losses
from pygpo.losses import get, markdown_table, names

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Every key of LOSSES.md sections 1-8, by section (transcribed from the spec).
LOSSES_MD = {
    1: ["sum", "mean", "ld", "sampled", "weighted", "segments"],
    2: ["dpo", "cdpo", "robust", "ipo", "hinge", "exo", "nca", "bco_pair", "sppo_hard", "sppo", "aot", "aot_unpaired",
        "apo_zero", "apo_down", "discopop", "sigmoid_norm", "fdpo", "hdpo", "dpo_shift", "mappo", "odpo", "rdpo_length",
        "dpop", "modpo", "todo", "wpo", "omni_dpo", "reward_aware", "inpo", "mrpo", "diffusion_dpo"],
    3: ["tdpo1", "tdpo2", "sparsepo", "rrpo"],
    4: ["simpo", "cpo", "orpo", "alphapo", "repo", "asft", "tpo_triple", "simpo_gamma_dynamic"],
    5: ["sft", "rpo_sum", "xpo", "selm", "vpo", "rationale", "anchor", "conditional"],
    6: ["kto", "apo_zero_unpaired", "bco", "pmpo", "dro"],
    7: ["mpo", "exo_k", "plackett_luce", "tpo_tree", "sppo_k", "gpo", "egpo", "curriculum"],
    8: ["dr_dpo", "beta_dpo", "group_robust", "relative"],
}


def test_every_key_of_losses_md_is_registered():
    expected = [k for sec in sorted(LOSSES_MD) for k in LOSSES_MD[sec]]
    assert names() == expected
    for sec, keys in LOSSES_MD.items():
        assert all(get(k).section == sec for k in keys)


def test_aliases():
    assert get("sigmoid").key == "dpo"
    assert get("gammapo").key == "simpo_gamma_dynamic"
    assert "sigmoid" in names(include_aliases=True)
    assert names("reducer") == LOSSES_MD[1]
    with pytest.raises(ValueError):
        names("nonsense")


@pytest.mark.parametrize("key", names())
def test_spec_metadata(key):
    spec = get(key)
    assert spec.paper and spec.formula
    assert set(spec.defaults) <= set(spec.ranges)
    for name, value in spec.defaults.items():
        assert spec.ranges[name].check(value), f"{key}: default {name}={value!r} outside its own range"
    for item in spec.inputs:
        assert item.doc and item.dtype in ("float", "bool", "int", "object")


def test_every_head_has_an_independent_reference():
    import test_loss_batch_stateful
    import test_loss_multi_response
    import test_loss_pairwise
    import test_loss_reference_free
    import test_loss_regularizers
    import test_loss_token_kl
    import test_loss_unpaired

    covered = set()
    for mod in (test_loss_pairwise, test_loss_token_kl, test_loss_reference_free, test_loss_regularizers,
                test_loss_unpaired, test_loss_multi_response, test_loss_batch_stateful):
        covered |= set(mod.REFERENCES)
    covered.add("beta_dpo")  # test_beta_dpo_matches_reference (its draw needs the generator)
    heads = {k for k in names() if get(k).kind != "reducer"}
    assert heads == covered


def test_docs_file_matches_registry():
    with open(os.path.join(ROOT, "docs", "losses.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert text == markdown_table(), "docs/losses.md is stale: run python -m pygpo losses --write docs/losses.md"


def test_docs_table_has_one_row_per_key():
    text = markdown_table()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(names())
    for key in names():
        spec = get(key)
        row = next(r for r in rows if r.startswith(f"| `{key}`"))
        assert spec.paper.replace("|", "\\|") in row
        for hp, value in spec.defaults.items():
            assert f"`{hp}=" in row


def test_cli_main_prints_table(capsys):
    from pygpo.__main__ import main

    assert main(["losses"]) == 0
    assert capsys.readouterr().out == markdown_table()
    assert main(["losses", "--names"]) == 0
    assert capsys.readouterr().out.split() == names()


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "t.md"
    proc = subprocess.run([sys.executable, "-m", "pygpo", "losses", "--write", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8") == markdown_table()


def test_public_api_names():
    for name in ("names", "get", "preference_loss", "PreferenceLossOutput", "markdown_table", "BCOPairLoss",
                 "BCOLoss", "BetaDPOLoss", "GroupRobustLoss", "reduce"):
        assert hasattr(losses, name)
