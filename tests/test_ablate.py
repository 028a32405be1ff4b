"""`instructloop ablate` on a small recorded dataset: every algorithm trains from the same
SFT policy and is measured on fresh prompts; the table, JSON and figure come out.

The dataset is written with the records the server logs (learner/synthetic.py) into the
learner's own SQLite dataset, as a loop run leaves it: task prompts with four answers (the
right one, a near miss, another task's answer, an empty one) ranked by the default
labeler, and demonstrations of the right answer. The trainers run a few steps on the
shipped pretrained base.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from instructloop.cli import main as cli_main
from instructloop.learner.dataset import Dataset, DatasetConfig
from instructloop.learner.synthetic import demonstration_record, prompt_record, ranking_record
from instructloop.loop.labelers import check_ranking, correct_concise
from instructloop.loop.tasks import answer, make_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_PROMPTS = 24
TINY = (
    "--sft-max-steps 6 --sft-batch-size 8 --rm-batch-prompts 8 "
    "--ppo-iterations 1 --ppo-rollout-prompts 4 --ppo-minibatch-size 4 --ppo-ppo-epochs 1 "
    "--ppo-max-new-tokens 6 --ppo-ptx-batch-size 2"
)


def record_dataset(path) -> int:
    """N_PROMPTS ranked prompts of four answers from 6 users, two thirds demonstrated."""
    rng = random.Random(0)
    ds = Dataset(DatasetConfig(path=str(path)))
    for i in range(N_PROMPTS):
        prompt = make_prompt(rng)
        right = answer(prompt)
        answers = [right, right[:-1], answer(make_prompt(rng)), ""]
        rng.shuffle(answers)
        user = f"user{i % 6}"
        rec = prompt_record(f"p{i}", prompt, answers, user)
        tiers = check_ranking(correct_concise(prompt, answers), len(answers))
        assert ds.add_prompt(rec)
        assert ds.add_feedback(ranking_record(f"f{i}", rec, [list(t) for t in tiers], user))
        if i % 3:
            assert ds.add_feedback(demonstration_record(f"d{i}", rec, right, user))
    ds.close()
    return N_PROMPTS


def test_ablate_trains_every_algorithm_on_the_same_data_and_writes_its_table(tmp_path, capsys):
    learner_dir = tmp_path / "learner"
    learner_dir.mkdir()
    record_dataset(learner_dir / "dataset.sqlite3")
    out = tmp_path / "out"
    rc = cli_main(
        [
            "ablate", "--dataset", str(tmp_path), "--fractions", "0.5,1",
            "--learn-args", TINY, "--eval-prompts", "12", "--kl-prompts", "4",
            "--corpus-documents", "8", "--threads", "1", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "ablate.json").read_text())
    rows = {(r["algorithm"], r["fraction"]): r for r in report["rows"]}
    algorithms = ("ppo", "ppo-ptx", "ppo-ptx-demo", "dpo", "grpo", "rloo")
    assert set(rows) == {("base", 0.0), ("sft", 0.0)} | {
        (a, f) for a in algorithms for f in (0.5, 1.0)
    }
    # the same data: each share trains on the oldest comparisons of the recorded ones
    for a in algorithms:
        assert rows[(a, 0.5)]["comparisons"] == N_PROMPTS // 2
        assert rows[(a, 1.0)]["comparisons"] == N_PROMPTS
    # the SFT-only policy against itself: every comparison a tie, exactly one half
    assert rows[("sft", 0.0)]["win_vs_sft"] == 0.5
    assert rows[("sft", 0.0)]["win_vs_sft_heldout"] == 0.5
    assert rows[("sft", 0.0)]["kl_to_sft"] == 0.0
    assert rows[("base", 0.0)]["alignment_tax"] == 0.0
    for (name, _), r in rows.items():
        assert 0.0 <= r["exact_match"] <= 1.0 and math.isfinite(r["corpus_loss"])
        if name not in ("base", "sft"):
            assert 0.0 <= r["win_vs_sft"] <= 1.0 and 0.0 <= r["win_vs_sft_heldout"] <= 1.0
            # every algorithm moved the policy from where it started: the SFT policy's
            # own KL estimate is exactly 0 (same log-probabilities); a sampled estimate
            # of a small move may come out on either side of 0
            assert r["kl_to_sft"] != 0.0, (name, r)
    assert rows[("grpo", 1.0)]["episodes"] > 0 and rows[("dpo", 1.0)]["pairs"] > 0
    table = (out / "ablate.md").read_text()
    assert table.count("\n") == 2 + len(rows)  # header, rule, one line per row
    assert (out / "ablate.png").stat().st_size > 10_000
    assert "win vs SFT" in capsys.readouterr().out


def test_ablate_refuses_what_it_cannot_run(tmp_path, capsys):
    assert cli_main(["ablate", "--dataset", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no dataset.sqlite3" in capsys.readouterr().err
    (tmp_path / "dataset.sqlite3").touch()
    args = ["ablate", "--dataset", str(tmp_path), "--out", str(tmp_path)]
    assert cli_main([*args, "--algorithms", "ppo,a2c"]) == 2
    assert "unknown algorithms ['a2c']" in capsys.readouterr().err
