"""Data layer: readers (JSONL, Parquet, datasets dir), formats, tokenization, bad rows, split, batches."""

import json

import pytest

from pygpo.trainer.data import (
    BatchIterator,
    DatasetRowError,
    iter_batches,
    load_preference_data,
    load_train_eval,
    read_rows,
    tokenize_rows,
    train_eval_split,
)
from pygpo.trainer import demo_task
from pygpo.trainer.tokenizer import ByteTokenizer, load_tokenizer

BOS, EOS = 257, 258
ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5", "extra": 1},
    {"prompt": "héllo ", "chosen": "wörld", "rejected": "there"},
    {"prompt": "", "chosen": "a", "rejected": "bb"},
]


def _bytes(text):
    return list(text.encode("utf-8"))


def _expected_standard(rows):
    """Independent reference: byte ids, BOS before the prompt, EOS after each response."""
    return [
        {
            "row": i,
            "prompt_ids": [BOS] + _bytes(r["prompt"]),
            "chosen_ids": _bytes(r["chosen"]) + [EOS],
            "rejected_ids": _bytes(r["rejected"]) + [EOS],
        }
        for i, r in enumerate(rows)
    ]


def _write_jsonl(path, rows, blank_lines=False):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
            if blank_lines:
                fh.write("\n")
    return path


def _hf_tokenizer():
    """A real PreTrainedTokenizerFast from a tiny locally trained BPE, with a ChatML-like template."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, the quick brown fox", "sort these numbers please"] * 20, trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return hf


# -- ByteTokenizer ----------------------------------------------------------------------------------


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == len(tok) == 263
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    text = "héllo ✓ 12"
    assert tok.encode(text) == _bytes(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<eos>b") == [97, EOS, 98]
    assert tok.encode("ab", add_special_tokens=True) == [BOS, 97, 98]
    assert tok.decode([97, EOS, 256], skip_special_tokens=True) == "a"
    assert tok.decode([97, EOS]) == "a<eos>"
    with pytest.raises(ValueError, match="263"):
        tok.decode([263])


def test_byte_tokenizer_chat_template():
    tok = ByteTokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs) == "<bos><|user|>hi<|end|><|assistant|>yo<|end|>"
    assert tok.apply_chat_template(msgs[:1], add_generation_prompt=True) == "<bos><|user|>hi<|end|><|assistant|>"
    assert tok.apply_chat_template(msgs, continue_final_message=True) == "<bos><|user|>hi<|end|><|assistant|>yo"
    assert tok.apply_chat_template(msgs[:1], tokenize=True) == [BOS, 260, 104, 105, 262]
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    bad = [
        (dict(conversation=msgs, add_generation_prompt=True, continue_final_message=True), "cannot both be true"),
        (dict(conversation=[{"role": "user"}]), r"conversation\[0\]: expected a mapping with 'role' and 'content'"),
        (dict(conversation=[{"role": "user", "content": 3}]), r"conversation\[0\].content: expected str, got int"),
        (dict(conversation=[], continue_final_message=True), "needs at least one message"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            tok.apply_chat_template(**kwargs)
    with pytest.raises(TypeError, match="text: expected str, got bytes"):
        tok.encode(b"hi")
    assert len(tok) == tok.vocab_size and repr(tok) == f"ByteTokenizer(vocab_size={tok.vocab_size})"


def test_load_tokenizer(tmp_path):
    assert isinstance(load_tokenizer(None, "demo"), ByteTokenizer)
    assert isinstance(load_tokenizer("byte", "/some/model"), ByteTokenizer)
    hf = _hf_tokenizer()
    hf.pad_token = None
    hf.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(None, str(tmp_path / "tok"))
    text = "hello world"
    assert loaded.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert loaded.chat_template == hf.chat_template
    assert loaded.pad_token_id == loaded.eos_token_id == hf.eos_token_id  # EOS stands in for a missing pad
    with pytest.raises(ValueError, match="cannot load a tokenizer from"):
        load_tokenizer(str(tmp_path / "missing"), "demo")


# -- readers and formats ----------------------------------------------------------------------------


def test_jsonl_parquet_and_datasets_dir_give_the_same_examples(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    tok = ByteTokenizer()
    expected = _expected_standard(ROWS)
    jsonl = _write_jsonl(tmp_path / "d.jsonl", ROWS, blank_lines=True)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "dd")
    )
    for path in (jsonl, tmp_path / "d.parquet", tmp_path / "ds", tmp_path / "dd"):
        examples, summary = load_preference_data(path, tok)
        assert examples == expected, path
        assert (summary.rows, summary.kept, dict(summary.formats)) == (3, 3, {"standard": 3})
    test_split, _ = load_preference_data(tmp_path / "dd", tok, split="test")
    assert test_split == expected[:1]
    with pytest.raises(ValueError, match="no split 'validation'; splits: train, test"):
        load_preference_data(tmp_path / "dd", tok, split="validation")


def test_conversational_rows_with_byte_tokenizer(tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "c.parquet")
    (ex,), summary = load_preference_data(_write_jsonl(tmp_path / "c.jsonl", [row]), ByteTokenizer())
    assert load_preference_data(tmp_path / "c.parquet", ByteTokenizer())[0] == [ex]  # nested columns read back
    prompt_text = "<|system|>be brief<|end|><|user|>2+2?<|end|><|assistant|>"
    assert ex["prompt_ids"] == [BOS, 259] + _bytes("be brief") + [262, 260] + _bytes("2+2?") + [262, 261]
    assert ByteTokenizer().decode(ex["prompt_ids"]) == "<bos>" + prompt_text
    assert ex["chosen_ids"] == [ord("4"), 262, EOS] and ex["rejected_ids"] == [ord("5"), 262, EOS]
    assert dict(summary.formats) == {"conversational": 1}


def test_conversational_rows_with_a_real_hf_tokenizer():
    hf = _hf_tokenizer()
    prompt = [{"role": "user", "content": "sort these numbers"}]
    chosen = [{"role": "assistant", "content": "hello world"}]
    rejected = [{"role": "assistant", "content": "the fox"}]
    from pygpo.trainer.data import RawRow

    (ex,), _ = tokenize_rows([RawRow(0, {"prompt": prompt, "chosen": chosen, "rejected": rejected})], hf, source="mem")
    p_text = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert ex["prompt_ids"] == hf(p_text, add_special_tokens=False)["input_ids"]
    assert ex["prompt_ids"][0] == hf.bos_token_id  # from the template, not added twice
    assert ex["prompt_ids"][1] != hf.bos_token_id
    for key, resp in (("chosen_ids", chosen), ("rejected_ids", rejected)):
        full = hf(hf.apply_chat_template(prompt + resp, tokenize=False), add_special_tokens=False)["input_ids"]
        assert ex[key] == full[len(ex["prompt_ids"]):] + [hf.eos_token_id]
        assert hf.decode(ex[key]) == resp[0]["content"] + "<|im_end|>\n</s>"
    # standard rows get the tokenizer's BOS before the prompt
    (std,), _ = tokenize_rows([RawRow(0, {"prompt": "hello", "chosen": " world", "rejected": " fox"})], hf, source="mem")
    assert std["prompt_ids"][0] == hf.bos_token_id
    assert hf.decode(std["prompt_ids"][1:]) + hf.decode(std["chosen_ids"][:-1]) == "hello world"


def test_tokenizer_without_chat_template_is_a_clear_error():
    hf = _hf_tokenizer()
    hf.chat_template = None
    from pygpo.trainer.data import RawRow

    row = {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="needs a chat template"):
        tokenize_rows([RawRow(0, row)], hf, source="mem")


def test_implicit_prompt_rows(tmp_path):
    msgs = [{"role": "user", "content": "q"}]
    rows = [
        {"chosen": "Q: is it? yes", "rejected": "Q: is it? no"},
        {"chosen": msgs + [{"role": "assistant", "content": "a"}], "rejected": msgs + [{"role": "assistant", "content": "b"}]},
    ]
    (s, c), _ = load_preference_data(_write_jsonl(tmp_path / "i.jsonl", rows), ByteTokenizer())
    assert s["prompt_ids"] == [BOS] + _bytes("Q: is it?")
    assert s["chosen_ids"] == _bytes(" yes") + [EOS] and s["rejected_ids"] == _bytes(" no") + [EOS]
    assert c["prompt_ids"] == [BOS, 260, ord("q"), 262, 261]
    assert c["chosen_ids"] == [ord("a"), 262, EOS]


# -- bad rows ---------------------------------------------------------------------------------------

BAD = [
    ({"prompt": "p", "rejected": "r"}, "missing_field", "chosen"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty_response", "chosen"),
    ({"prompt": "p", "chosen": "c", "rejected": 3}, "wrong_type", "rejected"),
    ({"prompt": 7, "chosen": "c", "rejected": "r"}, "wrong_type", "prompt"),
    ({"prompt": "p" * 40, "chosen": "c", "rejected": "r"}, "prompt_too_long", "prompt"),
    ([1, 2], "not_a_mapping", None),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": 5}], "rejected": "r"},
     "wrong_type", "chosen"),
    ({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "bad_message", "prompt"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [], "rejected": [{"role": "assistant", "content": "b"}]},
     "empty_response", "chosen"),
]


@pytest.mark.parametrize("bad,reason,field", BAD)
def test_bad_row_error_names_row_line_and_field(tmp_path, bad, reason, field):
    path = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], bad, ROWS[0]], blank_lines=True)
    with pytest.raises(DatasetRowError) as info:
        load_preference_data(path, ByteTokenizer(), max_length=32)
    err = info.value
    assert (err.row, err.reason, err.field, err.line) == (2, reason, field, 5)
    assert str(path) in str(err) and "row 2 (0-based), line 5" in str(err)
    if field:
        assert f"field {field!r}" in str(err)


def test_skip_bad_rows_counts_by_reason(tmp_path):
    lines = [ROWS[0], "{not json", *[b for b, _, _ in BAD], ROWS[1]]
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DatasetRowError, match="row 1 .*invalid JSON"):
        load_preference_data(path, ByteTokenizer(), max_length=32)
    examples, summary = load_preference_data(path, ByteTokenizer(), max_length=32, skip_bad_rows=True)
    assert [e["row"] for e in examples] == [0, len(lines) - 1]
    expected = {"invalid_json": 1, "missing_field": 1, "empty_response": 2, "wrong_type": 3, "prompt_too_long": 1,
                "not_a_mapping": 1, "bad_message": 1}
    assert dict(summary.skipped) == expected
    assert (summary.rows, summary.kept) == (len(lines), 2)
    assert "skipped 10" in str(summary) and summary.as_dict()["skipped"] == expected


def test_truncation_rules():
    from pygpo.trainer.data import RawRow

    row = RawRow(0, {"prompt": "abcdefgh", "chosen": "12345", "rejected": "xy"})
    (ex,), summary = tokenize_rows([row], ByteTokenizer(), source="m", max_prompt_length=4, max_length=7)
    assert ex["prompt_ids"] == [BOS] + _bytes("fgh")  # BOS, then the prompt's end
    assert ex["chosen_ids"] == _bytes("123") and ex["rejected_ids"] == _bytes("xy") + [EOS]
    assert (summary.truncated_prompts, summary.truncated_responses) == (1, 1)
    (ex,), summary = tokenize_rows([row], ByteTokenizer(), source="m", max_length=10)
    assert len(ex["prompt_ids"]) == 9 and ex["chosen_ids"] == [ord("1")] and ex["rejected_ids"] == [ord("x")]
    with pytest.raises(DatasetRowError, match="max_length=9"):
        tokenize_rows([row], ByteTokenizer(), source="m", max_length=9)


def test_unsupported_and_missing_sources(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'.*\.jsonl"):
        read_rows(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="not a directory saved"):
        read_rows(tmp_path)
    with pytest.raises(ValueError, match="dataset_format"):
        tokenize_rows([], ByteTokenizer(), source="m", dataset_format="chat")


def test_forced_format_rejects_the_other():
    from pygpo.trainer.data import RawRow

    with pytest.raises(DatasetRowError, match="expected a non-empty list of messages"):
        tokenize_rows([RawRow(0, ROWS[0])], ByteTokenizer(), source="m", dataset_format="conversational")


def test_load_train_eval_follows_the_config(tmp_path):
    from pygpo.trainer.config import load_config

    tok = ByteTokenizer()
    train, held, summaries = load_train_eval(load_config(), tok)
    assert (len(train), len(held)) == (4000, 512) and set(summaries) == {"train", "eval"}
    assert held[0]["prompt_ids"] == [BOS] + _bytes(json.loads(demo_task.data_path("eval").read_text().splitlines()[0])["prompt"])
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    path = str(_write_jsonl(tmp_path / "d.jsonl", rows))
    train, held, summaries = load_train_eval(load_config(None, ["--dataset", path, "--eval_size", "5"]), tok)
    assert (len(train), len(held), list(summaries)) == (15, 5, ["train"])
    assert (train, held) == tuple(train_eval_split(load_preference_data(path, tok)[0], seed=0, eval_size=5))
    train, held, _ = load_train_eval(load_config(None, ["--dataset", path, "--eval_dataset", path]), tok)
    assert len(train) == len(held) == 20


# -- split and batches ------------------------------------------------------------------------------


def _items(n):
    return [{"row": i} for i in range(n)]


def test_train_eval_split_is_deterministic_and_disjoint():
    items = _items(100)
    train, held = train_eval_split(items, seed=1, eval_fraction=0.1)
    assert len(held) == 10 and len(train) == 90
    assert sorted(e["row"] for e in train + held) == list(range(100))
    assert [e["row"] for e in held] == sorted(e["row"] for e in held)
    assert (train, held) == train_eval_split(items, seed=1, eval_fraction=0.1)
    assert held != train_eval_split(items, seed=2, eval_fraction=0.1)[1]
    assert len(train_eval_split(items, seed=1, eval_size=7, eval_fraction=0.5)[1]) == 7
    assert train_eval_split(items, seed=1)[1] == []
    assert len(train_eval_split(_items(5), seed=0, eval_fraction=0.01)[1]) == 1
    with pytest.raises(ValueError, match="eval_size"):
        train_eval_split(items, seed=1, eval_size=100)


def test_batch_iterator_epochs_are_permutations_and_resume_exactly():
    items = _items(10)
    it = BatchIterator(items, 4, seed=3)
    assert len(it) == 3
    epoch0 = [it.next_batch() for _ in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(e["row"] for b in epoch0 for e in b) == list(range(10))
    first = it.next_batch()
    assert it.state_dict()["epoch"] == 1 and it.state_dict()["position"] == 4
    assert [e["row"] for e in first] != [e["row"] for e in epoch0[0]]  # reshuffled per epoch
    state = it.state_dict()
    rest = [it.next_batch() for _ in range(5)]
    resumed = BatchIterator(items, 4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(5)] == rest
    fresh = BatchIterator(items, 4, seed=3)
    assert [fresh.next_batch() for _ in range(3)] == epoch0  # reproducible from the seed
    with pytest.raises(ValueError, match="batch_size was 4"):
        BatchIterator(items, 5, seed=3).load_state_dict(state)


def test_batch_iterator_drop_last_and_no_shuffle():
    it = BatchIterator(_items(10), 4, seed=0, drop_last=True, shuffle=False)
    assert len(it) == 2
    rows = [[e["row"] for e in it.next_batch()] for _ in range(3)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert [len(b) for b in iter_batches(_items(10), 4)] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(_items(3), 0)


# -- per-example loss inputs: checked when the data is loaded ------------------------------------------

from pygpo.trainer.data import DataSummary, describe_data  # noqa: E402
from pygpo.trainer.loss_inputs import ExampleInputs, batch_inputs  # noqa: E402


def _pairs(n, **columns):
    """``n`` valid standard rows; ``columns[name]`` is a list of per-row values (``...`` leaves it out)."""
    rows = [{"prompt": f"sort {i}=", "chosen": "a", "rejected": "b"} for i in range(n)]
    for name, values in columns.items():
        for row, value in zip(rows, values):
            if value is not ...:
                row[name] = value
    return rows


def _load(tmp_path, rows, loss, hparams=None, **options):
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    return load_preference_data(path, ByteTokenizer(), loss_inputs=ExampleInputs(loss.split("+"), hparams), **options)


def _bad(tmp_path, rows, loss, hparams=None):
    with pytest.raises(DatasetRowError) as info:
        _load(tmp_path, rows, loss, hparams)
    assert str(tmp_path / "d.jsonl") in str(info.value)
    return info.value


@pytest.mark.parametrize(
    "loss,hparams,column,bad,reason,needle",
    [
        ("odpo", None, "scores", 3.0, "wrong_shape", "expected a list [chosen, rejected] of 2 numbers"),
        ("odpo", None, "scores", [2.0, 1.0, 0.5], "wrong_shape", "got list [2.0, 1.0, 0.5]"),
        ("odpo", None, "scores", [2.0, "1"], "wrong_type", "of 2 numbers"),
        ("odpo", None, "scores", [1.0, 2.0], "out_of_range", "s_w > s_l"),
        ("odpo", {"odpo": {"offset": "ratio"}}, "scores", [1.0, -1.0], "out_of_range", "s_w > s_l > 0"),
        ("odpo", None, "scores", [float("nan"), 1.0], "out_of_range", "finite"),
        ("group_robust", {"group_robust": {"num_groups": 2}}, "groups", 2, "out_of_range", "groups must be < num_groups=2"),
        ("group_robust", None, "groups", -1, "out_of_range", "groups must be >= 0"),
        ("group_robust", None, "groups", 1.5, "wrong_type", "expected an integer"),
        ("group_robust", None, "groups", True, "wrong_type", "expected an integer"),
        ("todo", None, "ties", 2, "wrong_type", "expected a bool"),
        ("todo", None, "ties", [True], "wrong_shape", "expected a bool"),
        ("mappo", None, "rewards", [1.5, 0.0], "out_of_range", "rewards must lie in [0, 1]"),
        ("sppo", None, "win_probs", None, "missing_field", "missing field 'win_probs'"),
        ("tpo_triple", None, "gold_lengths", 0, "out_of_range", "gold_lengths must be >= 1"),
    ],
)
def test_a_loss_input_that_does_not_fit_is_a_bad_row_naming_file_row_and_column(
        tmp_path, loss, hparams, column, bad, reason, needle):
    good = {"odpo": [2.0, 1.0], "group_robust": 1, "todo": True, "mappo": [1.0, 0.0], "sppo": [0.9, 0.1],
            "tpo_triple": 3}[loss]
    others = {"tpo_triple": {"gold_logps": [-3.0] * 4}}.get(loss, {})
    values = [good, good, bad, good]
    err = _bad(tmp_path, _pairs(4, **{column: values}, **others), loss, hparams)
    assert (err.row, err.line, err.field, err.reason) == (2, 3, column, reason)
    assert needle in str(err) and f"field {column!r}" in str(err) and "\n" not in str(err)
    # skipped and counted with skip_bad_rows; the good rows keep their values
    examples, summary = _load(tmp_path, _pairs(4, **{column: values}, **others), loss, hparams, skip_bad_rows=True)
    assert [e["row"] for e in examples] == [0, 1, 3] and dict(summary.skipped) == {reason: 1}
    assert str(summary).count(f"{reason}: 1") == 1


def test_audit_files_fail_at_load_naming_the_row(tmp_path):
    """The audit's three cases: a scalar where a pair is expected, a 3-list, a group id >= num_groups."""
    rows = _pairs(8, scores=[[2.0, 1.0]] * 8)
    rows[5]["scores"] = 3.0
    assert (_bad(tmp_path, rows, "odpo").row, _bad(tmp_path, rows, "odpo").field) == (5, "scores")
    rows[5]["scores"] = [2.0, 1.0, 0.5]
    assert "(got 3)" not in str(_bad(tmp_path, rows, "odpo")) and _bad(tmp_path, rows, "odpo").row == 5
    err = _bad(tmp_path, _pairs(4, groups=[0, 1, 2, 0]), "group_robust", {"group_robust": {"num_groups": 2}})
    assert (err.row, err.field) == (2, "groups") and "example" not in str(err)


def test_loss_inputs_are_normalised_and_stack_into_batches(tmp_path):
    """Ints in a float column become floats, 0/1 in a bool column bools, integral floats in an int column
    ints: every batch stacks into the dtype the loss validates."""
    import torch

    examples, _ = _load(tmp_path, _pairs(3, scores=[[2, 1], [2.5, 0.5], [3, 1.0]]), "odpo")
    assert [e["inputs"]["scores"] for e in examples] == [[2.0, 1.0], [2.5, 0.5], [3.0, 1.0]]
    out = batch_inputs(examples, torch.device("cpu"))
    assert out["scores"].dtype == torch.float32 and out["scores"].tolist() == [[2.0, 1.0], [2.5, 0.5], [3.0, 1.0]]
    examples, _ = _load(tmp_path, _pairs(3, ties=[1, 0, True]), "todo")
    assert batch_inputs(examples, torch.device("cpu"))["ties"].tolist() == [True, False, True]
    examples, _ = _load(tmp_path, _pairs(2, groups=[1.0, 0]), "group_robust")
    assert batch_inputs(examples, torch.device("cpu"))["groups"].dtype == torch.long


def test_sizes_of_other_axes_hold_across_rows_and_files(tmp_path):
    """VPO's M calibration responses: the first row sets M, a later row (or the held-out file) with
    another count is bad; both of VPO's columns share M."""
    calib = [[-1.0, -2.0, -3.0]] * 3
    rows = _pairs(3, calib_logps=calib, calib_ref_logps=calib)
    rows[2]["calib_ref_logps"] = [-1.0, -2.0]
    err = _bad(tmp_path, rows, "vpo")
    assert (err.row, err.field, err.reason) == (2, "calib_ref_logps", "wrong_shape")
    assert "M = 3 (as in the rows before)" in str(err)
    reader = ExampleInputs(["vpo"])
    path = _write_jsonl(tmp_path / "train.jsonl", _pairs(2, calib_logps=calib, calib_ref_logps=calib))
    load_preference_data(path, ByteTokenizer(), loss_inputs=reader)
    held = _write_jsonl(tmp_path / "held.jsonl", _pairs(2, calib_logps=[[-1.0]] * 2, calib_ref_logps=[[-1.0]] * 2))
    with pytest.raises(DatasetRowError, match="calib_logps"):
        load_preference_data(held, ByteTokenizer(), loss_inputs=reader)
    # MODPO takes [w, l] or [w, l] x M objectives
    examples, _ = _load(tmp_path, _pairs(2, margin_rewards=[[[1.0, 2.0], [0.0, 1.0]]] * 2), "modpo")
    assert examples[1]["inputs"]["margin_rewards"] == [[1.0, 2.0], [0.0, 1.0]]


def test_an_optional_column_is_in_every_row_or_in_none(tmp_path):
    """Plackett-Luce's optional ranks: a batch mixing rows with and without them could not stack."""
    examples, _ = _load(tmp_path, _pairs(3), "plackett_luce")
    assert all("inputs" not in e for e in examples)
    err = _bad(tmp_path, _pairs(3, ranks=[[0, 1], ..., [1, 0]]), "plackett_luce")
    assert (err.row, err.field, err.reason) == (1, "ranks", "missing_field") and "every row or in none" in str(err)
    err = _bad(tmp_path, _pairs(3, ranks=[..., [0, 1], [1, 0]]), "plackett_luce")
    assert (err.row, err.reason) == (1, "unexpected_field")


def test_every_registry_row_input_accepts_a_well_formed_value():
    """Each loss head with per-example columns reads a row of the declared shape (no check of a row
    input may need what only a training step has)."""
    from pygpo.losses import get, names
    from pygpo.trainer.loss_inputs import example_input_fields

    def value(shape, dtype):
        if len(shape) == 1:
            return {"float": 0.5, "int": 0, "bool": True}[dtype]
        n = 2 if shape[1] in (2, "K") else 3
        if len(shape) == 2 and n == 2 and dtype == "float":
            return [0.9, 0.1]  # [chosen, rejected], chosen first where an order is required
        return [value((None,) + tuple(shape[2:]), dtype) for _ in range(n)]

    checked = 0
    for key in names():
        fields = example_input_fields([key])
        if not fields:
            continue
        spec = get(key)
        row = {i.name: value(i.shapes[0], i.dtype) for i in spec.inputs if i.name in fields}
        out = ExampleInputs([key], {"group_robust": {"num_groups": 2}}).read(row)
        assert set(out) == set(row), key
        checked += 1
    assert checked >= 20


# -- demo held-out set, BOS, data report ---------------------------------------------------------------


def test_demo_held_out_set_follows_eval_fraction_and_eval_size():
    from pygpo.trainer.config import load_config

    tok = ByteTokenizer()
    train, held, summaries = load_train_eval(load_config(None, ["--eval_fraction", "0"]), tok)
    assert (len(train), held, list(summaries)) == (4000, [], ["train"])  # no held-out evaluation
    _, full, _ = load_train_eval(load_config(None, ["--eval_fraction", "0.2"]), tok)
    _, held, summaries = load_train_eval(load_config(None, ["--eval_size", "3"]), tok)
    assert held == full[:3] and len(full) == 512 and set(summaries) == {"train", "eval"}
    _, held, _ = load_train_eval(load_config(None, ["--eval_size", "3", "--eval_fraction", "0"]), tok)
    assert len(held) == 3  # eval_size takes precedence
    with pytest.raises(ValueError, match="eval_size: the demo's eval split has 512 pairs, got 600"):
        load_train_eval(load_config(None, ["--eval_size", "600"]), tok)


def test_prompt_truncation_keeps_bos_where_the_prompt_has_it(tmp_path):
    from pygpo.trainer.data import RawRow

    tok = ByteTokenizer()
    rows = [RawRow(0, {"prompt": "abcdefgh", "chosen": "1", "rejected": "2"})]
    (ex,), summary = tokenize_rows(rows, tok, source="m", max_prompt_length=3)
    assert ex["prompt_ids"] == [BOS] + _bytes("gh") and summary.truncated_prompts == 1
    (ex,), _ = tokenize_rows(rows, tok, source="m", max_prompt_length=1)
    assert ex["prompt_ids"] == _bytes("h")  # no room for BOS and a prompt token: the prompt's end wins
    (ex,), summary = tokenize_rows(rows, tok, source="m", max_prompt_length=9)
    assert ex["prompt_ids"] == [BOS] + _bytes("abcdefgh") and summary.truncated_prompts == 0
    # a rendered conversation starts with the template's BOS: kept too
    conv = [RawRow(0, {"prompt": [{"role": "user", "content": "abcdefgh"}], "chosen": [{"role": "assistant", "content": "1"}],
                       "rejected": [{"role": "assistant", "content": "2"}]})]
    (ex,), _ = tokenize_rows(conv, tok, source="m", max_prompt_length=4)
    assert ex["prompt_ids"] == [BOS] + tok.encode("h<|end|><|assistant|>")
    # an HF tokenizer without a BOS token: the prompt's end, as before
    hf = _hf_tokenizer()
    hf.bos_token = None
    (ex,), _ = tokenize_rows([RawRow(0, {"prompt": "hello world", "chosen": " a", "rejected": " b"})], hf, source="m",
                             max_prompt_length=2)
    assert ex["prompt_ids"] == hf.encode("hello world", add_special_tokens=False)[-2:]


def test_data_report_lines_and_summary_round_trip(tmp_path):
    lines = [ROWS[0], "{not json", {"prompt": "p" * 40, "chosen": "c", "rejected": "r"}, ROWS[1]]
    path = _write_jsonl(tmp_path / "d.jsonl", lines)
    _, summary = load_preference_data(path, ByteTokenizer(), max_length=32, max_prompt_length=4, skip_bad_rows=True)
    assert DataSummary.from_dict(summary.as_dict()) == summary
    report = describe_data({"train": summary, "eval": summary.as_dict()}, pairs={"train": 2, "held-out": 0})
    expected = (f"{path}: 4 rows, 3 kept, skipped 1 (invalid_json: 1); truncated prompts 3, responses 0")
    assert report == [f"data train: {expected}", f"data eval: {expected}", "data pairs: train 2, held-out 0"]
