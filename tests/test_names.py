"""Names that say what they hold: the layout map of docs/development.md lists every module, library
messages name options (the CLI shows them as its flags), and the CLI's root module is not
shadowed by the Typer object it holds."""

import ast
import re
from pathlib import Path

import typer
from typer.testing import CliRunner

from cai.cli import app

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def layout_map() -> list[str]:
    """The paths the layout block of docs/development.md names, one a line, in order."""
    text = (ROOT / "docs" / "development.md").read_text()
    block = text[text.index("Layout ("):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    return [line.split()[0] for line in block.splitlines() if line.startswith("cai/")]


def test_the_layout_map_lists_every_module_once_and_nothing_that_is_gone():
    named = layout_map()
    assert len(named) == len(set(named)), [p for p in named if named.count(p) > 1]
    gone = [p for p in named if not (ROOT / p).exists()]
    assert not gone, f"docs/development.md's layout names what is not there: {gone}"
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cai").rglob("*.py"))
    missing = [m for m in modules if m not in named]
    assert not missing, f"docs/development.md's layout has no line for: {missing}"


# Flags that are not cai's options, or are part of a command line a message shows whole.
NOT_OPTIONS = {
    "cai/backends/kernels.py": {"--version"},                  # the C compiler's
    "cai/constitution/schema.py": {"--revisions", "--sampling", "--samples", "--cot"},   # the format's help
    "cai/constitution/lookup.py": {"--samples", "--cot"},       # the starter file's comments
    "cai/errors.py": {"--no-"},                                 # OptionError.flag() makes flags
    "cai/model_files.py": {"--no-deps"},                        # pip's
    "cai/options.py": {"--array"},                              # Slurm's
    "cai/review/argilla.py": {"--to"},                          # `cai export --to argilla`, a command line
    "cai/run/merge.py": {"--array", "--shard", "--format"},     # command lines to run (sbatch, cai generate, cai export)
    "cai/runconfig.py": {"--config"},                           # the printed file says how to run it again
    "cai/trainers.py": None,                                    # other programs' command lines and scripts
}


def test_library_messages_name_options_not_flags():
    """Outside cai/cli/ a message names an option as `name` (see cai.errors); the CLI maps it to
    its flag. Docstrings may speak of flags."""
    found = []
    for path in sorted((ROOT / "cai").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("cai/cli/"):
            continue
        allowed = NOT_OPTIONS.get(rel, set())
        if allowed is None:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        # an option's declaration (cai.declare.option: its flags and help) is the command line's own text
        declared = {id(c) for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "option"
                    for c in ast.walk(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | declared:
                found += [f"{rel}:{node.lineno}: {flag}" for flag in FLAG.findall(node.value) if flag not in allowed]
    assert not found, found


def test_the_cli_shows_the_flag_of_an_option_a_library_error_names(tmp_path):
    table = tmp_path / "p.csv"
    table.write_text("question,answer\nhi,there\n")
    result = CliRunner().invoke(app, ["generate", str(table), "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {table}:1: prompt: missing (columns present: question, answer; "
                                     "choose one with --prompt-field)")
    assert not (tmp_path / "out.jsonl").exists()

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"id": "a", "prompt": "p", "chosen": "c", "rejected": "r", "principle": "x", '
                     '"critique": "k", "rounds": [], "meta": {}}\n')
    result = CliRunner().invoke(app, ["stats", str(pairs), "--filtered", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file (--filtered)"


def test_as_flags_maps_only_the_running_commands_options():
    """`name` → its flag, `name=False` → the switch's --no- form (or a --no-NAME flag); a
    backquoted word that is no option of the command (a model named in a server's message)
    stays as it is, and so does everything outside a command."""
    from cai.cli.render import as_flags

    text = "use `prompt_field`, `few_shot=False`, `lock=False` or `max_new_tokens`; the model `gpt2` is not served"
    probe = typer.Typer()
    shown = []

    @probe.command()
    def run(prompt_field: str = typer.Option("prompt", "--prompt-field"),
            few_shot: bool = typer.Option(True, "--few-shot/--no-few-shot"),
            no_lock: bool = typer.Option(False, "--no-lock"),
            max_new_tokens: int = typer.Option(8, "--max-new-tokens", "-n")):
        shown.append(as_flags(text))

    assert CliRunner().invoke(probe, []).exit_code == 0
    assert shown == ["use --prompt-field, --no-few-shot, --no-lock or --max-new-tokens; the model `gpt2` is not served"]
    assert as_flags(text) == text


def test_the_cli_root_module_is_not_shadowed_by_its_app():
    import cai.cli
    from cai.cli import root

    assert isinstance(root.app, typer.Typer) and cai.cli.app is root.app
    assert type(cai.cli.root).__name__ == "module"      # the module, not the Typer object
    assert not root.standalone()                    # outside main(): tests, notebooks
