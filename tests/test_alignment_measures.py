"""The alignment tax and the held-out labelers, on real checkpoints and real labelers.

- corpus_loss reads the shipped pretrained base (instructloop/base) and checkpoints made
  from it here: a random-init model of the same shape, a copy fine-tuned hard on one
  unrelated string (the tax the measure must see), and a LoRA adapter over the base.
- correct_polite is checked against hand-written pairs, where it agrees with
  correct_concise and where it does not.
- populations: the round-robin assignment and the win-rate arithmetic, by hand; the
  simulator's users get their labelers the same way; a version's row is filled with the
  training and held-out win rates and the tax.
"""

from __future__ import annotations

import math

import pytest

from instructloop.loop.capability import corpus_loss, count_exact_match
from instructloop.loop.evaluate import Answers
from instructloop.loop.labelers import (
    brief,
    check_ranking,
    compare,
    correct_concise,
    correct_polite,
    load_population,
    member,
    population_win_rate,
    shouting,
)
from instructloop.pretrain import SHIPPED_BASE, PretrainConfig, build_char_tokenizer

LABELERS = "instructloop.loop.labelers"


@pytest.fixture(scope="module")
def base_loss(one_torch_thread) -> float:
    return corpus_loss(SHIPPED_BASE)


def test_corpus_loss_of_the_base_is_low_deterministic_and_far_below_random_init(
    base_loss, tmp_path
):
    from instructloop.tinymodel import new_llama, write_model_dir

    assert base_loss < 1.5, base_loss  # the base: 0.85 on held-out text of its corpus
    assert corpus_loss(SHIPPED_BASE) == base_loss  # deterministic
    assert corpus_loss(SHIPPED_BASE, batch_size=7) == pytest.approx(base_loss, rel=1e-5)
    tokenizer = build_char_tokenizer()
    random_dir = write_model_dir(
        tmp_path / "random", new_llama(tokenizer, PretrainConfig().shape()), tokenizer, {}
    )
    random_loss = corpus_loss(random_dir, documents=50)
    assert random_loss > 3.0, random_loss  # ~ln(262) = 5.6: it knows no character yet
    # The counting probe: a skill of the corpus that the base has (0.54) and noise lacks.
    assert count_exact_match(SHIPPED_BASE) > 0.45
    assert count_exact_match(random_dir, prompts=50) < 0.15


def test_corpus_loss_sees_the_tax_of_fine_tuning_on_something_else(base_loss, tmp_path):
    """A few SGD steps at a high learning rate on one unrelated string: the model now
    prefers that string, and the held-out corpus costs it more."""
    import torch
    from peft import LoraConfig, get_peft_model

    from instructloop.loop.evaluate import load_checkpoint
    from instructloop.tinymodel import write_model_dir

    model, tokenizer = load_checkpoint(SHIPPED_BASE)
    model.train()
    ids = tokenizer(["zzzz qqqq zzzz qqqq zzzz qqqq"], return_tensors="pt")["input_ids"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    tuned = write_model_dir(tmp_path / "tuned", model.eval(), tokenizer, {})
    tuned_loss = corpus_loss(tuned)
    assert tuned_loss > base_loss + 0.1, (tuned_loss, base_loss)

    # A LoRA adapter is read over its base: a fresh one (B = 0) changes nothing.
    base, _ = load_checkpoint(SHIPPED_BASE)
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")
    assert corpus_loss(tmp_path / "adapter", SHIPPED_BASE) == pytest.approx(base_loss, rel=1e-5)


def test_correct_polite_agrees_on_right_and_wrong_and_orders_the_rest_its_own_way():
    p = "reverse: abc\n"
    # The right answer wins for both, against near misses, anagrams and shorter text.
    for wrong in ("cb", "bac", "cbx", "cba x", "", "CBA"):
        assert compare(correct_concise, p, "cba", wrong) == 1.0, wrong
        assert compare(correct_polite, p, "cba", wrong) == 1.0, wrong
    # Where they differ (the documented pairs): all the letters against closer-and-shorter,
    assert compare(correct_concise, p, "bac", "cb") == 0.0
    assert compare(correct_polite, p, "bac", "cb") == 1.0
    # all the letters against a foreign one (a tie for correct_concise),
    assert compare(correct_concise, p, "bac", "cbx") == 0.5
    assert compare(correct_polite, p, "bac", "cbx") == 1.0
    # and a clean stop against a trailing newline (both right: a tie for correct_concise).
    assert compare(correct_concise, p, "cba", "cba\n") == 0.5
    assert compare(correct_polite, p, "cba", "cba\n") == 1.0
    # Ties: equal letters, one line each, no length preference; empty is last.
    assert compare(correct_polite, p, "bac", "acb") == 0.5
    assert compare(correct_polite, p, "cb", "ab") == 0.5
    assert compare(correct_polite, p, "", "zz") == 0.0
    assert compare(correct_polite, p, "abc x", "ab\nc") == 1.0  # one line first
    ranking = correct_polite(p, ["cba\n", "bac", "", "cba", "acb", "zz"])
    assert ranking == [3, 0, (1, 4), 5, 2]
    assert check_ranking(ranking, 6) == [(3,), (0,), (1, 4), (5,), (2,)]
    assert correct_polite.demonstrate("sort: d b a\n") == "a b d"


def test_population_round_robin_and_win_rate_by_hand():
    population = load_population(f"{LABELERS}:brief, {LABELERS}:shouting")
    assert population == [brief, shouting] and load_population("") == []
    assert [member(population, i) for i in range(5)] == [brief, shouting] * 2 + [brief]
    prompts = ["reverse: abc\n"] * 4
    a = ["x", "x", "x", "XY"]
    b = ["xyzw", "X", "xyzw", "xy"]
    # prompt 0: brief, x beats xyzw: 1; prompt 1: shouting, x loses to X: 0;
    # prompt 2: brief: 1; prompt 3: shouting, XY beats xy: 1  -> 3/4
    assert population_win_rate(population, prompts, a, b) == 0.75
    # a tie counts half: shouting on prompt 1 with two lowercase answers
    assert population_win_rate(population, prompts[:2], ["x", "ab"], ["xyzw", "cd"]) == 0.75
    assert math.isnan(population_win_rate(population, [], [], []))
    with pytest.raises(ValueError):
        load_population("no-colon")


def test_simulation_users_and_measures_use_the_populations():
    from instructloop.loop.measure import Measurer
    from instructloop.loop.simulate import SimulateConfig, Simulation

    cfg = SimulateConfig(
        target="127.0.0.1:1", data_dir="unused", admin_token="x", users=5, eval_prompts=4,
        labeler=f"{LABELERS}:correct_concise,{LABELERS}:shouting",
        heldout_labeler=f"{LABELERS}:brief", live=False,
    )  # fmt: skip
    sim = Simulation(cfg)
    assert [sim.labeler(u) for u in sim.users] == [correct_concise, shouting] * 2 + [
        correct_concise
    ]
    assert sim.measurer.heldout == [brief]
    assert Simulation(SimulateConfig(**{**vars(cfg), "heldout_labeler": ""})).measurer.heldout == []
    with pytest.raises(ValueError):
        Simulation(SimulateConfig(**{**vars(cfg), "labeler": ""}))

    prompts = ["reverse: abc\n", "reverse: abc\n"]
    m = Measurer(
        prompts, training=[correct_concise, shouting], heldout=[brief], decoder=None,
        corpus_documents=0, threads=1,
    )  # fmt: skip
    m.answers["v0"] = Answers(greedy=["x", "x"], sampled=["abcd", "ab"])
    m.answers["v2"] = Answers(greedy=["cba", "x"], sampled=["ab", "AB"])
    m.corpus_losses.update(v0=0.8, v2=0.95)
    row = {"id": "v2"}
    m.fill(row, sft=None)
    assert row["exact_match"] == 0.5 and row["exact_match_sampled"] == 0.0
    # training: prompt 0 correct_concise, "ab" (0.8 similar) beats "abcd" (0.6); prompt 1
    # shouting, "AB" beats "ab"; held-out brief: "ab" beats "abcd", "AB" ties "ab".
    assert row["labeler_win_rate"] == 1.0 and row["labeler_win_rate_heldout"] == 0.75
    assert "labeler_win_rate_vs_sft" not in row  # no SFT-only policy: nothing compared
    assert row["corpus_loss"] == 0.95 and row["corpus_tax"] == pytest.approx(0.15)

    # The live table shows them: a v0 row and a measured candidate row.
    from rich.console import Console

    from instructloop.loop.cli import _view
    from instructloop.loop.measure import version_row
    from instructloop.v1 import admin_pb2

    for vid, kind in (("v0", "base"), ("v2", "full")):
        sim.versions[vid] = version_row(
            admin_pb2.VersionInfo(id=vid, kind=kind), comparisons=0, demonstrations=0, t=0.0
        )
    sim.versions["v2"].update(row, status="promoted")
    sim.versions["v0"].update(corpus_loss=0.8, corpus_tax=0.0)
    console = Console(record=True, width=250)
    console.print(_view(sim))
    text = console.export_text()
    assert "held-out v0" in text and "tax" in text
    assert "0.950  +0.150" in text and "0.750" in text, text


def test_report_plot_shows_the_new_measures(tmp_path):
    """report.png draws the held-out win rates and the corpus-loss panel from rows that
    have them (and from rows of an older report.json that do not)."""
    from instructloop.loop.report import write_plot
    from instructloop.loop.simulate import SimulateConfig

    def row(vid, status, n, **measures):
        return {"id": vid, "status": status, "comparisons_at": n, "comparisons_used": n,
                **measures}  # fmt: skip

    report = {
        "config": vars(SimulateConfig(target="x", data_dir="x")),
        "versions": [
            row("v0", "base", 0, exact_match=0.0, corpus_loss=0.83, count_exact_match=0.6),
            row("v1", "sft", 100, exact_match=0.5, corpus_loss=0.9, labeler_win_rate=0.9),
            row("v2", "promoted", 100, exact_match=0.6, labeler_win_rate=0.95,
                labeler_win_rate_heldout=0.7, labeler_win_rate_vs_sft_heldout=0.55,
                corpus_loss=0.95, corpus_tax=0.12, count_exact_match=0.5, kl=3.0),
            row("v3", "rejected", 150, exact_match=0.4),
        ],
    }  # fmt: skip
    path = write_plot(report, tmp_path)
    assert path.stat().st_size > 10_000


def test_measurer_reads_a_checkpoint_from_the_registry_entry(base_loss):
    """What simulate does for each version: decode the evaluation prompts, score the
    held-out corpus and the counting probe, all from the path the registry names."""
    from instructloop.loop.evaluate import CheckpointDecoder
    from instructloop.loop.measure import Measurer
    from instructloop.v1 import admin_pb2

    prompts = ["reverse: abc\n", "sort: d b a\n"]
    decoder = CheckpointDecoder(prompts, max_tokens=4, temperature=1.0, seed=0)
    m = Measurer(
        prompts, training=[correct_concise], heldout=[], decoder=decoder,
        corpus_documents=200, threads=1,
    )  # fmt: skip
    infos = {"v0": admin_pb2.VersionInfo(id="v0", kind="base", path=str(SHIPPED_BASE))}
    m.read("v0", infos)
    assert len(m.answers["v0"].greedy) == 2 and len(m.answers["v0"].sampled) == 2
    assert m.corpus_losses["v0"] == base_loss and m.counting["v0"] > 0.45
    row = {"id": "v0"}
    m.fill(row, sft=None)
    assert row["corpus_tax"] == 0.0 and "labeler_win_rate" not in row  # v0 vs itself: none
