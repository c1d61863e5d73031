"""The budget sweep end to end at toy size: every scheme trained, every model evaluated at every budget.

Accuracy values at this size mean nothing; the test checks the structure of the table and its JSON,
that each model saw exactly round(r N) visual tokens per image at each ratio budget, and that the
sweep's own stage-2 flags reproduce tiny_pipeline.build's stage 2 (its run stands in for one of them).
"""
import json

import pytest

from llava_drip.drip.budget import parse_budget
from llava_drip.train import budget_sweep
from llava_drip.train.train import train

SCHEMES = ["random", "fixed", "calibrated"]
BUDGETS = ["1.0", "0.5", "0.25", "0.1", "mean:0.25", "1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget_sweep")
    doc = tmp / "docs" / "llava_budgets.md"
    rc = budget_sweep.main(["--out", str(tmp / "work"), "--doc", str(doc), "--seeds", "0,1", "--n", "80",
                            "--lm-steps", "5", "--clip-epochs", "0", "--stage2-epochs", "1", "--n-eval", "16",
                            "--batch-size", "8", "--max-new-tokens", "4"])
    assert rc == 0
    return tmp, doc, json.loads(doc.with_suffix(".json").read_text())


def test_every_model_is_evaluated_at_every_budget(sweep):
    _, _, result = sweep
    assert set(result["runs"]) == {f"{s}-seed{k}" for s in SCHEMES for k in (0, 1)}
    n = result["meta"]["heldout"]["n"]
    assert n > 0 and result["meta"]["heldout"]["overlap_with_base"] == 0
    for name, rows in result["evals"].items():
        assert [r["budget"] for r in rows] == BUDGETS, name
        for r in rows:
            assert r["n"] == n and 0 <= r["accuracy"] <= 1 and r["correct"] <= r["n"]
            assert sum(r["tokens_per_image"].values()) == n  # one count per question's image
            budget, num_patches = parse_budget(r["budget"]), r["num_patches"]
            if budget.kind != "mean":  # ratio r: exactly round(r N); count k: exactly k
                want = round(budget.value * num_patches) if budget.kind == "ratio" else int(budget.value)
                assert r["expected_tokens"] == want
                assert r["tokens_per_image"] == {str(want): n}, (name, r["budget"], r["tokens_per_image"])
            else:  # the calibrated cut: counts vary per image, within the patch count
                assert all(1 <= int(g) <= num_patches for g in r["tokens_per_image"])


def test_option_letter_maps_short_and_open_answers():
    assert budget_sweep.option_letter("blue", ["red", "blue"]) == "B"
    assert budget_sweep.option_letter("The stars are on the left side.", ["the top", "the left side"]) == "B"
    assert budget_sweep.option_letter("in the middle", ["the center", "the top"]) == "A"
    assert budget_sweep.option_letter("There are two red circles.", ["1", "2", "3"]) == "B"
    assert budget_sweep.option_letter("They are circles.", ["circle", "star"]) == "A"
    assert budget_sweep.option_letter("No, there are two.", ["yes", "no"]) == "B"
    # none named, or two named: unparsed, which the scorer counts wrong
    assert budget_sweep.option_letter("They are small.", ["red", "blue"]) == "FAILED"
    assert budget_sweep.option_letter("red and blue", ["red", "blue"]) == "FAILED"


def test_schemes_train_with_their_flags(sweep):
    _, _, result = sweep
    for name, run in result["runs"].items():
        record = json.load(open(f"{run['path']}/llava_drip_train.json"))["model_args"]
        if run["scheme"] == "random":  # '1.0' stays a ratio (every patch), not one token
            assert record["drip_train_budgets"] == "1.0,0.5,0.25,0.1" and record["drip_budget"] is None
        elif run["scheme"] == "fixed":
            assert record["drip_budget"] == "0.25" and record["drip_train_budgets"] is None
        else:
            assert record["drip_budget"] is None and record["drip_train_budgets"] is None


def test_table_and_json(sweep):
    _, doc, result = sweep
    table = result["table"]
    assert list(table) == SCHEMES
    for scheme in SCHEMES:
        assert list(table[scheme]) == BUDGETS
        for cell in table[scheme].values():
            assert cell["seeds"] == 2 and set(cell["per_seed"]) == {"0", "1"}
            assert 0 <= cell["min"] <= cell["mean"] <= cell["max"] <= 1 and cell["sd"] >= 0
    text = doc.read_text()
    assert "scripts/tiny/budget_sweep.sh --out" in text  # the command that made it
    header = next(line for line in text.splitlines() if line.startswith("| training scheme |"))
    assert [c.split()[0] for c in header.strip("|").split("|")[1:]] == BUDGETS
    for scheme in SCHEMES:
        row = next(line for line in text.splitlines() if line.startswith(f"| {scheme} |"))
        assert row.count("n=2×") == len(BUDGETS)
    assert "Wall time" in text and "Machine" in text and "## What the numbers say" in text
    again = doc.with_name("rendered.md")  # the doc is a pure function of its JSON twin
    assert budget_sweep.main(["--render", str(doc.with_suffix(".json")), "--doc", str(again)]) == 0
    assert again.read_text() == text


def test_stage2_argv_reproduces_build(sweep):
    """The calibrated seed-0 run is build's own stage 2; the sweep's flags must give the same run."""
    tmp, _, result = sweep
    base = f"{tmp}/work/base"
    again = tmp / "calibrated-again"
    train(budget_sweep.stage2_argv(base, str(again), 0, 1, {}))
    def losses(folder):  # every logged loss and the run's mean loss
        history = json.load(open(f"{folder}/trainer_state.json"))["log_history"]
        return [h[k] for h in history for k in ("loss", "train_loss") if k in h]
    ours, builds = losses(again), losses(f"{base}/stage2")
    assert len(builds) >= 2 and ours == pytest.approx(builds, rel=1e-5)
