"""A routing-rules document cannot cost the node more than its own size: YAML aliases (the
"billion laughs" expansion) are refused with a clear message, and so is an oversized
document, through the same parser the CLI and the admin API use."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.cli.main import app
from node.core.rules import MAX_RULES_BYTES, RulesError, parse_rules

# A few hundred bytes that expand to 9^9 strings when aliases are followed.
BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(c)}: &{chr(c)} [{','.join([f'*{chr(c - 1)}'] * 9)}]" for c in range(98, 106)]
    + ["rules: *i"]
)


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    assert len(BOMB) < 600
    with pytest.raises(RulesError, match=r"aliases \(\*name\) are not allowed"):
        parse_rules(BOMB)


def test_a_merge_key_alias_is_refused_too() -> None:
    document = "base: &b {forward: [pacs]}\nrules:\n  - name: x\n    then: {<<: *b}\n"
    with pytest.raises(RulesError, match="aliases"):
        parse_rules(document)


def test_an_oversized_document_is_refused() -> None:
    with pytest.raises(RulesError, match=f"at most {MAX_RULES_BYTES} bytes"):
        parse_rules("#" * (MAX_RULES_BYTES + 1))


def test_the_cli_says_why_an_alias_bomb_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    monkeypatch.setenv("CURIA_DATA_DIR", str(tmp_path / "data"))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    result = CliRunner().invoke(app, ["rules", "check", str(bomb)])
    assert result.exit_code != 0
    assert "aliases (*name) are not allowed" in result.output


def test_anchors_without_aliases_still_parse() -> None:
    assert parse_rules("rules: &r []\n").rules == []
