"""The demo task: shipped data reproducible from the seed, chosen correct, rejected subtly wrong."""

import json

import pytest

from pygpo.trainer import demo_task


def _load(split):
    with open(demo_task.data_path(split), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_regenerating_with_the_seed_gives_the_shipped_bytes(tmp_path):
    paths = demo_task.write_splits(tmp_path)
    for split, path in paths.items():
        assert path.read_bytes() == demo_task.data_path(split).read_bytes(), split


@pytest.mark.parametrize("split,size", [("train", demo_task.TRAIN_SIZE), ("eval", demo_task.EVAL_SIZE)])
def test_shipped_rows_chosen_correct_rejected_subtly_wrong(split, size):
    rows = _load(split)
    assert len(rows) == size
    kinds = set()
    for row in rows:
        digits = row["prompt"][len("sort "):-1]
        assert row["prompt"] == f"sort {digits}=" and digits.isdigit()
        assert len(set(digits)) == len(digits) and 4 <= len(digits) <= 6
        assert row["chosen"] == "".join(sorted(digits))
        assert demo_task.score(row["prompt"], row["chosen"])
        assert not demo_task.score(row["prompt"], row["rejected"])
        chosen, rejected = row["chosen"], row["rejected"]
        assert len(rejected) == len(chosen)
        diff = [i for i in range(len(chosen)) if chosen[i] != rejected[i]]
        if len(diff) == 2:  # adjacent swap
            i, j = diff
            assert j == i + 1 and chosen[i] == rejected[j] and chosen[j] == rejected[i]
            kinds.add("swap")
        else:  # one digit replaced by one the prompt lacks
            assert len(diff) == 1 and rejected[diff[0]] not in digits
            kinds.add("replace")
    assert kinds == {"swap", "replace"}


def test_held_out_prompts_are_not_in_train():
    train = {r["prompt"] for r in _load("train")}
    held = [r["prompt"] for r in _load("eval")]
    assert len(set(held)) == len(held) and not train & set(held)
    assert len(train) == demo_task.TRAIN_SIZE


def test_score():
    assert demo_task.score("sort 5291=", "1259")
    assert demo_task.score("sort 5291=", " 1259\n")
    for wrong in ("1295", "1269", "125", "12590", "", "1 2 5 9"):
        assert not demo_task.score("sort 5291=", wrong)
    with pytest.raises(ValueError, match="prompt"):
        demo_task.score("order 5291=", "1259")


def test_generate_pairs_deterministic_distinct_and_excluding():
    a = demo_task.generate_pairs(50, seed=3, min_digits=3, max_digits=3)
    assert a == demo_task.generate_pairs(50, seed=3, min_digits=3, max_digits=3)
    assert a != demo_task.generate_pairs(50, seed=4, min_digits=3, max_digits=3)
    prompts = [r["prompt"] for r in a]
    assert len(set(prompts)) == 50 and all(len(p) == len("sort 123=") for p in prompts)
    b = demo_task.generate_pairs(50, seed=3, min_digits=3, max_digits=3, exclude=prompts[:10])
    assert not set(prompts[:10]) & {r["prompt"] for r in b}
    with pytest.raises(ValueError, match="min_digits"):
        demo_task.generate_pairs(1, seed=0, min_digits=5, max_digits=4)
