"""The house: what sits where, and which way imports go — read from the import statements themselves.

Layers, lowest first (README "Layout"):
    0  testbed/gold.py     the hidden gold reward; imports nothing of the project
    1  plumbing/           processes, checkpoints, data, sampling, figures, the judge's HTTP client; never the method
    2  the stages          sft, reward, meta_data, meta_rm, ppo, dpo, evaluate at the root; a stage may use the
                           method of a stage before it in pipeline order (meta_rm and ppo use reward.py's Eq. 1 and
                           r_θ), never one after it
    3  testbed/world.py    the world generator (data files, tokenizer, base model)
    4  study/              the study over seeds and arms: runs the stages, reads their outputs
    5  bench/, tools/      benchmarks and the SmolLM2 converter: use anything, nothing uses them
A module imports only from lower layers (within a layer: no cycle, and stages in pipeline order); nothing but the
study itself imports the study, nothing imports the benchmarks or tools. Imports inside functions count too.
"""
import ast
import os

from conftest import REPO

STAGES = ("sft", "reward", "meta_data", "meta_rm", "ppo", "dpo", "evaluate")  # pipeline order
PACKAGES = ("plumbing", "testbed", "study", "bench", "tools")


def modules() -> dict[str, str]:
    """Every module of the repository (tests excepted): dotted name -> file."""
    out = {}
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and d not in ("tests", "docs", "runs")]
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def imports(path: str, known: dict[str, str]) -> set[str]:
    """The project modules a file imports (`import x`, `from x import y`, `from pkg import module`)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in known and node.module not in PACKAGES:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return found


def layer(module: str) -> int:
    if module == "testbed.gold":
        return 0
    if module.startswith("plumbing"):
        return 1
    if module in STAGES:
        return 2
    if module.startswith("testbed"):
        return 3
    if module.startswith("study"):
        return 4
    if module.startswith(("bench", "tools")):
        return 5
    raise AssertionError(f"{module}: in no layer (a new file at the root or a new folder? see the docstring)")


MODULES = modules()
GRAPH = {m: imports(path, MODULES) for m, path in MODULES.items()}


def test_the_root_holds_the_stages_and_nothing_else():
    root = sorted(m for m in MODULES if "." not in m and m not in PACKAGES)
    assert root == sorted(STAGES)


def test_imports_only_go_down():
    wrong = []
    for a, deps in GRAPH.items():
        for b in deps:
            if layer(b) > layer(a):
                wrong.append(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})")
            elif layer(a) == layer(b) == 2 and STAGES.index(b) > STAGES.index(a):
                wrong.append(f"stage {a} imports {b}, a later stage")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(GRAPH[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(GRAPH):
        visit(m, [])


def test_nothing_imports_the_study_the_benchmarks_or_the_tools():
    for a, deps in GRAPH.items():
        for b in deps:
            if b.startswith("study"):
                assert a.startswith("study"), f"{a} imports {b}"
            if b.startswith(("bench", "tools")):
                assert a.split(".")[0] == b.split(".")[0], f"{a} imports {b}"


def test_the_checks_would_catch_a_wrong_import(tmp_path):
    # teeth: the same reading applied to a plumbing module that imports a stage, and to a cycle
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom plumbing import common\n\ndef f():\n    import reward\n")
    found = imports(str(bad), MODULES)
    assert found == {"plumbing.common", "reward"}  # the import inside the function is seen
    assert layer("reward") > layer("plumbing.common")
