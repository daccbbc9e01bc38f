"""``vsad-fit --help``: every option says in words what it does."""

from __future__ import annotations

import re

OPTION = re.compile(r"^  (--[\w.\-]+)(?:\[[^\]]*\])?( .*)?$")
"""An option's first help line: two spaces, ``--name`` (``--print_config[=flags]`` too)."""


def undescribed(help_text: str) -> tuple[list[str], list[str]]:
    """``(options, undescribed)`` of argparse/jsonargparse help text.

    An option's help is its first line after the metavar plus the indented lines below it. It
    is described when, once the metavar (``LR``, ``{true,false}``, ``CONFIG``) and
    jsonargparse's ``(type: ..., default: ...)`` are removed, a word of at least three letters
    remains.
    """
    options: list[str] = []
    texts: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        match = OPTION.match(line)
        if match:
            current = match.group(1)
            options.append(current)
            texts[current] = match.group(2) or ""
        elif current is not None and line.startswith("    ") and line.strip():
            texts[current] += " " + line.strip()
        else:
            current = None
    missing = []
    for name in options:
        text = re.sub(r"\((type|default):[^)]*\)", " ", texts[name])
        text = re.sub(r"^\s?(\{[^}]*\}|[A-Z][A-Z0-9_.\-]*)?", "", text, count=1)
        text = re.sub(r"\b[A-Z][A-Z0-9_]+\b", " ", text)  # leftover metavars
        if not re.search(r"[a-z]{3,}", text):
            missing.append(name)
    return options, missing


def test_the_checker_spots_an_option_without_words():
    sample = (
        "  --model.lr LR         AdamW's learning rate. (type: float, default: 0.0001)\n"
        "  --model.window WINDOW\n"
        "                        (type: int, default: 3)\n"
        "  --model.use_frm {true,false}\n"
        "                        (type: bool, default: True)\n"
        "  --data.root ROOT      the dataset root. (required, type: str)\n"
    )
    options, missing = undescribed(sample)
    assert options == ["--model.lr", "--model.window", "--model.use_frm", "--data.root"]
    assert missing == ["--model.window", "--model.use_frm"]


def test_every_vsad_fit_option_has_a_description(console_script):
    proc = console_script("vsad-fit", "--help", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "vsad-fit: fit VSAD on one category" in text  # not Lightning's generic heading
    options, missing = undescribed(text)
    dotted = [o for o in options if "." in o]
    # The model, data, trainer, bank and pictures groups are all there, and all described.
    for group in ("--model.", "--data.", "--trainer.", "--bank.", "--pictures."):
        assert any(o.startswith(group) for o in dotted), group
    assert len(dotted) > 100, len(dotted)
    assert missing == [], missing
