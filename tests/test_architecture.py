"""The shape the code promises (docs/architecture.md): only modality modules ask which modality they
hold, nothing above the methods names a method, and no import runs upward."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selfsup"

# Asking which modality a dataset or an encoder holds: isinstance on a modality's dataset type, or a
# comparison with a modality's name. Only the modality modules (and the datasets they own) may.
MODALITY_QUESTION = re.compile(
    r"isinstance\([^)]*\b(TextSet|ImageSet)\b"
    r"|[!=]=\s*[\"'](image|text|audio|image_text)[\"']"
    r"|[\"'](image|text|audio|image_text)[\"']\s*[!=]="
    r"|\.get\([\"']modality[\"']\)\s*(==|!=|in\b)"
)
ALLOWED = ("modalities", "data")  # selfsup/modalities/*, and data/ (each file there is one modality's pipeline)

# The layers, lowest first; a module may import its own layer and those below at module level.
LAYERS = [
    {"errors", "files", "config", "__init__"},
    {"nn", "encoders", "data"},
    {"methods"},
    {"train"},  # the loop, checkpoints, runtime, progress, stop: knows only the method contract
    {"modalities"},
    {"adapt", "evaluate", "export", "generate", "rundir"},
    {"report"},
    {"pretrain", "demo"},
    {"commands", "cli"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
WORD_METHOD_NAMES = ("clip",)
METHOD_NAMES = ("simclr", "byol", "dino", "mae", "beit", "colorize", "mlm", "next_token", "wav2vec2", "hubert", "clip")


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    """The top-level part of the package a file belongs to (`train`, `adapt`, `pretrain`, ...)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfsup."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("selfsup.")}
    return found


def test_only_modality_modules_ask_which_modality_they_hold():
    offenders = []
    for path in _sources():
        if _part(path) in ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if MODALITY_QUESTION.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "ask the modality (selfsup/modalities) instead:\n" + "\n".join(offenders)


def test_the_pattern_catches_what_it_should():
    for line in ('if isinstance(split, ImageSet):', 'if pre.get("modality") == "text":', 'modality == "image"',
                 'if "text" != kind:'):
        assert MODALITY_QUESTION.search(line), line
    assert not MODALITY_QUESTION.search('preprocess = {"modality": self.name}')


def test_no_module_imports_upward_at_module_level():
    upward = []
    for path in _sources():
        part = _part(path)
        for imported in _imports(path, top_level_only=True):
            if LEVEL[imported] > LEVEL[part]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports selfsup.{imported}")
    assert not upward, "\n".join(upward)


def test_the_loop_and_the_modalities_never_reach_up_even_lazily():
    """The import cycles the layout removed (train<->adapt, train<->report, evaluate<->report) stay gone."""
    reach: dict[str, set[str]] = defaultdict(set)
    for path in _sources():
        reach[_part(path)] |= _imports(path, top_level_only=False)
    assert not reach["train"] & {"adapt", "evaluate", "report", "pretrain", "modalities", "rundir"}, reach["train"]
    assert not reach["evaluate"] & {"report", "pretrain"}, reach["evaluate"]
    assert not reach["modalities"] & {"adapt", "evaluate", "report", "pretrain", "rundir"}, reach["modalities"]


def test_nothing_above_the_methods_names_a_method():
    """pretrain, the run directory, the loop, adapt and evaluate handle methods through MethodSpec
    and the hooks; only the registry, the CLI's defaults, the SimCLR demo and next-token sampling name one."""
    offenders = []
    for path in _sources():
        if _part(path) in ("methods", "demo", "cli", "config", "generate"):  # generate: next-token sampling itself
            continue
        text = path.read_text().lower()
        for name in METHOD_NAMES:
            # "simclr", 'mae', name=mlm; a method named by an English word (an audio `clip`) only quoted
            pattern = rf"([\"']){name}\1" if name in WORD_METHOD_NAMES else rf"([\"']){name}\1|=\s*{name}\b"
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} names `{name}`")
    assert not offenders, "\n".join(offenders)
