"""README's and docs/'s promises: every ``icf`` command line they show names a real command and only options that
command has, and the cheap ones run exactly as written; README stays a five-minute read; ARCHITECTURE's method table
is the registry."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from icf.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
ARCHITECTURE = README.with_name("ARCHITECTURE.md")
DOCS = sorted((README.parent / "docs").rglob("*.md"))
PIPELINE = README.parent / "docs" / "pipeline.md"


def readme_commands(files: list[Path] | None = None) -> list[str]:
    """Every ``icf ...`` line of the code blocks of README and docs/ (or ``files``; continuations joined, comments
    dropped)."""
    lines = []
    for path in files or [README, *DOCS]:
        lines += _commands(path)
    return lines


def _commands(path: Path) -> list[str]:
    lines, block, pending = [], False, ""
    for raw in path.read_text().splitlines():
        if raw.startswith("```"):
            block = not block
            continue
        if not block:
            continue
        text = pending + re.sub(r"\s+#.*$", "", raw).strip()
        pending = ""
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        if text.startswith("icf "):
            lines.append(text)
    return lines


def concrete(line: str) -> list[str]:
    """README notation → argv: ``[--a X --b Y]`` keeps its content, ``a|b`` alternatives keep the first."""
    text = line.replace("[", " ").replace("]", " ")
    return [tok.split("|")[0] if tok.startswith("-") or "|" in tok else tok for tok in shlex.split(text)][1:]


def resolve(argv: list[str]) -> tuple[object, list[str]]:
    """The (sub)command an argv names and the rest of it."""
    cmd = typer.main.get_command(app)
    while hasattr(cmd, "commands"):  # a group
        assert argv and argv[0] in cmd.commands, f"no command {argv[:1]} under {cmd.name}"
        cmd, argv = cmd.commands[argv[0]], argv[1:]
    return cmd, argv


def test_readme_shows_commands() -> None:
    shown = {" ".join(concrete(c)[:2]) if concrete(c)[0] == "stage" else concrete(c)[0] for c in readme_commands()}
    assert {"synth", "stage all", "train", "eval", "predict", "score", "compare", "status", "verify", "towers", "demo"} <= shown


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_line_parses(line: str) -> None:
    cmd, argv = resolve(concrete(line))
    flags = {name for p in cmd.params for name in (*p.opts, *p.secondary_opts)}
    unknown = [tok.split("=")[0] for tok in argv if tok.startswith("--") and tok.split("=")[0] not in flags]
    assert not unknown, f"{line}: {unknown} not options of `icf {cmd.name}` ({sorted(flags)})"


def test_readme_is_a_five_minute_read_and_links_every_doc() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for doc in DOCS:
        assert doc.read_text().lstrip().startswith("# "), doc
        head = doc.read_text().split("\n## ")[0]
        assert "```bash" in head, f"{doc} does not start with the commands a user types"
    linked = {part.split(")")[0] for part in text.split("](")[1:]}
    assert all((README.parent / link).exists() for link in linked), sorted(linked)
    assert {"docs/pipeline.md", "docs/training.md", "docs/evaluation.md", "docs/towers.md", "docs/benchmarks.md",
            "docs/reproduction.md"} <= linked
    from icf import methods

    assert {f"docs/methods/{name}.md" for name in methods.registry()} <= linked


def test_the_short_readme_commands_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/pipeline.md's first block from a fresh folder: synth, index, status, verify (the rest need minutes)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ICF_WORK", raising=False)
    runner = CliRunner()
    wanted = ("icf synth ", "icf stage index ", "icf status ", "icf verify ")
    ran = []
    for line in readme_commands([PIPELINE]):
        if line.startswith(wanted) and not any(line.startswith(w) for w, _ in [(r, 0) for r in ran]):
            res = runner.invoke(app, concrete(line))
            assert res.exit_code == 0, (line, res.output)
            ran.append(line.split(" --")[0])
    assert len(ran) == len(wanted)
    assert (tmp_path / "icf-work" / "avss" / "manifest.parquet").is_file()


def leaf_commands() -> dict[str, object]:
    found, todo = {}, [("", typer.main.get_command(app))]
    while todo:
        path, cmd = todo.pop()
        if hasattr(cmd, "commands"):
            todo += [(f"{path} {n}".strip(), c) for n, c in cmd.commands.items()]
        else:
            found[path] = cmd
    return found


def test_every_command_takes_work_and_one_dataset_option() -> None:
    """README: every command but score takes --work; every --dataset shows its choices in --help."""
    commands = leaf_commands()
    assert len(commands) >= 15
    for name, cmd in commands.items():
        by_flag = {o: p for p in cmd.params for o in p.opts}
        assert ("--work" in by_flag) == (name != "score"), name
        if "--dataset" in by_flag:
            assert by_flag["--dataset"].metavar == "[s4|ms3|avss]", name


def test_architecture_methods_table_is_the_registry() -> None:
    """"Methods at a glance": one row per registered method, with its requires, audio keys and components."""
    from icf import methods

    text = ARCHITECTURE.read_text()
    section = text[text.index("## Methods at a glance"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            split = lambda cell: {w.strip() for w in re.sub(r"\(.*?\)", "", cell).split(",") if w.strip() not in ("", "—")}
            rows[cells[0].strip("`")] = (split(cells[1]), [w.strip() for w in cells[2].split(",")], split(cells[3]))
    expected = {name: (set(m.requires), list(m.audio_keys), set(m.components)) for name, m in methods.registry().items()}
    assert rows == expected
