"""Installed versions against the known-incompatible combinations (package metadata only: nothing heavy imported)."""

from __future__ import annotations

from neu_det_pipeline import compat


def test_installed_combination_is_not_known_to_break_the_pipeline() -> None:
    problems = compat.matching(compat.BREAKS)
    assert not problems, "\n".join(problems)


def test_a_matching_combination_is_one_line_naming_both_versions() -> None:
    entry = compat.KnownBreak("alpha>=2", "beta<1", "the thing", "upgrade beta")
    assert compat.matching((entry,), {"alpha": "2.1", "beta": "0.9"}) == ["alpha 2.1 with beta 0.9 breaks the thing: upgrade beta"]
    assert compat.matching((entry,), {"alpha": "1.9", "beta": "0.9"}) == []
    assert compat.matching((entry,), {"alpha": "2.1", "beta": "1.0"}) == []
    assert compat.matching((entry,), {"alpha": "2.1"}) == []  # beta not installed


def test_the_transformers_peft_gate_is_described_by_its_versions() -> None:
    gate = compat.TRANSFORMERS_PEFT_GATE
    blocked = {"transformers": "5.24.0", "peft": "0.21.2"}
    assert compat.matching((gate,), blocked)[0].startswith("transformers 5.24.0 with peft 0.21.2 breaks")
    assert compat.matching((gate,), {"transformers": "5.23.0", "peft": "0.21.2"}) == []
    assert compat.matching((gate,), {"transformers": "5.25.0", "peft": "0.22.0"}) == []
