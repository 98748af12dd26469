"""README.md says what the code does: every config key it names exists, every training command
in its code blocks loads (preset, base: chain and overrides), and every flag it gives a
`fastdino eval | curate | export` command is one that command takes."""

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from fastdino.config import Config, load_config

README = (Path(__file__).parents[2] / "README.md").read_text()
BLOCKS = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", README, re.S)]
SECTIONS = "|".join(f.name for f in dataclasses.fields(Config))


def _is_key(dotted: str) -> bool:
    obj = Config()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in
                                                             dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def test_every_config_key_the_readme_names_exists():
    named = set(re.findall(rf"\b((?:{SECTIONS})\.[a-z_.]*[a-z_])(?!\w)", README))
    files = {k for k in named if re.search(r"\.(py|yaml|safetensors|pth|json|npy)$", k)}
    missing = sorted(k for k in named - files if not _is_key(k))
    assert not missing, f"README names config keys that do not exist: {missing}"


def _commands(marker: str) -> list[list[str]]:
    out = []
    for block in BLOCKS:
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("#") or marker not in line:
                continue
            out.append(shlex.split(line.replace("$D", "/d")))
    return out


@pytest.mark.parametrize("argv", _commands("fastdino/train.py"), ids=lambda a: " ".join(a)[:60])
def test_every_training_command_loads(argv):
    args = argv[next(i for i, a in enumerate(argv) if a.endswith("train.py")) + 1:]
    config = args[args.index("--config") + 1] if "--config" in args else None
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    load_config(config, overrides)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from fastdino.curation.cli import build_parser as curate_parser
    from fastdino.eval.cli import build_parser as eval_parser

    out = {}
    for name, parser in (("eval", eval_parser()), ("curate", curate_parser())):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.update({f"{name} {sub}": p for sub, p in action.choices.items()})
    return out


def _readme_invocations() -> list[tuple[str, list[str]]]:
    """(command, flags) of each `fastdino eval|curate|export ...` in a code block or in
    inline code."""
    lines = [line for block in BLOCKS for line in block.splitlines()]
    lines += re.findall(r"`(fastdino (?:eval|curate|export) [^`]*)`", README.replace("\n", " "))
    out = []
    for line in lines:
        m = re.search(r"fastdino (eval \w+|curate \w+|export)\b(.*)", line.split(" #")[0])
        if m:
            out.append((m.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", m.group(2))))
    return out


def test_every_flag_the_readme_gives_a_command_exists(monkeypatch):
    import fastdino.cli as cli

    parsers = _parsers()
    captured = {}

    def parse_args(self, args=None, namespace=None):  # the export parser, built in _export
        captured["export"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(SystemExit):
        cli.main(["export"])
    monkeypatch.undo()
    parsers["export"] = captured["export"]
    invocations = _readme_invocations()
    assert len(invocations) > 20  # the README's eval / curate / export examples were found
    unknown = []
    for command, flags in invocations:
        known = {s for a in parsers[command]._actions for s in a.option_strings}
        unknown += [f"{command} {f}" for f in flags if f not in known]
    assert not unknown, f"README gives flags these commands do not take: {unknown}"
