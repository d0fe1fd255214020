"""The Hugging Face export folder: what it holds, who may replace it, its modes, and how
transformers' pipelines behave at the model's position limit.

The transformer's position table has max_len rows, so nothing in transformers may index past it:
the export says the limit in tokenizer_config.json (model_max_length), generation_config.json
(max_length) and README.md, and these tests run the real pipelines on a tiny run against it.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfsup import files  # noqa: E402
from selfsup.data.tokenizer import TextTokenizer  # noqa: E402
from selfsup.errors import SelfsupError  # noqa: E402
from selfsup.export import hf  # noqa: E402
from selfsup.export.hf import export_hf  # noqa: E402
from tests.export import test_hf  # noqa: E402
from tests.export.test_hf import KIND, MAX_LEN, TEXTS, _make_run  # noqa: E402

tokenizers = test_hf.tokenizers  # the module-scoped fixture: one trained WordPiece and BPE tokenizer

PROMPT = "the quick fox"
LONG_PROMPT = " ".join(TEXTS[:3])  # several times MAX_LEN tokens


@pytest.fixture(scope="module")
def decoder_export(tmp_path_factory, tokenizers) -> tuple[Path, TextTokenizer]:
    root = tmp_path_factory.mktemp("decoder")
    run, _ = _make_run(root, "text_decoder", tokenizers["bpe"])
    return export_hf(run, root / "hf"), tokenizers["bpe"]


@pytest.fixture(scope="module")
def encoder_export(tmp_path_factory, tokenizers) -> tuple[Path, TextTokenizer]:
    root = tmp_path_factory.mktemp("encoder")
    run, _ = _make_run(root, "text_encoder", tokenizers["wordpiece"])
    return export_hf(run, root / "hf"), tokenizers["wordpiece"]


@pytest.fixture(scope="module")
def generator(decoder_export):
    out, _ = decoder_export
    return transformers.pipeline("text-generation", model=str(out), device="cpu")


def _generated_ids(generator, prompt: str, **kwargs) -> list[int]:
    result = generator(prompt, do_sample=False, return_tensors=True, **kwargs)
    return list(result[0]["generated_token_ids"])


# ---- what the folder holds -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["text_decoder", "text_encoder"])
def test_export_holds_exactly_the_files_it_declares(tmp_path, tokenizers, preset) -> None:
    """The names `--overwrite` may delete are exactly those an export writes (a new file from a newer
    transformers must be added to hf.EXPORT_FILES, or a re-export would be refused)."""
    run, _ = _make_run(tmp_path, preset, tokenizers[KIND[preset]])
    out = export_hf(run, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert names - {files.MARKER} <= set(hf.EXPORT_FILES)
    assert {files.MARKER, "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= names
    assert ("generation_config.json" in names) == (preset == "text_decoder")
    assert files.read_marker(out)["kind"] == "export"


def test_readme_names_the_limit_architecture_and_loading(decoder_export, encoder_export) -> None:
    for (out, _), cls, auto in ((decoder_export, "GPT2LMHeadModel", "AutoModelForCausalLM"),
                                (encoder_export, "RobertaPreLayerNormForMaskedLM", "AutoModelForMaskedLM")):
        text = (out / "README.md").read_text(encoding="utf-8")
        assert f"{MAX_LEN} tokens" in text and cls in text and f"{auto}.from_pretrained" in text


def test_generation_config_and_tokenizer_state_the_position_limit(decoder_export, encoder_export) -> None:
    out, tokenizer = decoder_export
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["max_length"] == MAX_LEN
    assert generation["bos_token_id"] == generation["eos_token_id"] == tokenizer.eos_id
    assert generation["pad_token_id"] == tokenizer.pad_id
    for out, _ in (decoder_export, encoder_export):
        assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == MAX_LEN
        assert transformers.AutoTokenizer.from_pretrained(out).model_max_length == MAX_LEN


# ---- the position limit in transformers' pipelines ---------------------------------------------------


def test_text_generation_stops_at_the_position_limit(generator) -> None:
    """The pipeline's own default (max_new_tokens=256) would index past the position table (IndexError);
    the export's generation_config max_length stops it at the limit instead."""
    ids = _generated_ids(generator, PROMPT)
    prompt_len = len(generator.tokenizer(PROMPT)["input_ids"])
    assert prompt_len < len(ids) <= MAX_LEN


def test_text_generation_fits_a_long_request_with_handle_long_generation(generator) -> None:
    """A prompt past the limit plus max_new_tokens: "hole" keeps the prompt's end and stops at the limit."""
    ids = _generated_ids(generator, LONG_PROMPT, max_new_tokens=5, handle_long_generation="hole")
    assert len(ids) == MAX_LEN
    tail = generator.tokenizer(LONG_PROMPT)["input_ids"][-(MAX_LEN - 5):]
    assert ids[:MAX_LEN - 5] == tail


@pytest.mark.parametrize("kwargs", [{}, {"truncation": True}, {"max_new_tokens": 2 * MAX_LEN, "handle_long_generation": "hole"}])
def test_text_generation_past_the_limit_is_a_clear_error(generator, kwargs) -> None:
    """What transformers cannot fit says so (a ValueError naming the lengths), never an IndexError."""
    prompt = LONG_PROMPT if "max_new_tokens" not in kwargs else PROMPT
    with pytest.raises(ValueError, match="max_length|max length"):
        _generated_ids(generator, prompt, **kwargs)


def test_fill_mask_truncates_a_long_text_to_the_limit(encoder_export) -> None:
    out, _ = encoder_export
    fill = transformers.pipeline("fill-mask", model=str(out), device="cpu")
    text = "the quick [MASK] " + LONG_PROMPT
    results = fill(text, tokenizer_kwargs={"truncation": True}, top_k=2)
    assert len(results) == 2 and all(torch.isfinite(torch.tensor(r["score"])) for r in results)


# ---- who may replace the folder ----------------------------------------------------------------------


def test_overwrite_refuses_a_folder_selfsup_did_not_make(tmp_path, tokenizers) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "mine"}')  # named like ours: that makes it no export
    (out / "important.txt").write_text("keep me")
    with pytest.raises(SelfsupError, match="important.txt") as err:
        export_hf(run, out, overwrite=True)
    assert str(out) in str(err.value)
    assert (out / "important.txt").read_text() == "keep me"
    assert (out / "config.json").read_text() == '{"model_type": "mine"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary folder left


def test_overwrite_replaces_an_export_selfsup_made(tmp_path, tokenizers) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"], seed=3)
    out = export_hf(run, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()
    run2, _ = _make_run(tmp_path / "second", "text_decoder", tokenizers["bpe"], seed=4)
    with pytest.raises(SelfsupError, match="overwrite"):
        export_hf(run2, out)
    assert (out / "model.safetensors").read_bytes() == before
    export_hf(run2, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert files.read_marker(out)["kind"] == "export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run", "second"]


def test_overwrite_refuses_an_export_holding_a_users_file(tmp_path, tokenizers) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    out = export_hf(run, tmp_path / "hf")
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(SelfsupError, match="notes.txt"):
        export_hf(run, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "model.safetensors").is_file()


def test_overwrite_refuses_another_kind_of_selfsup_folder(tmp_path, tokenizers) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    out = tmp_path / "hf"
    out.mkdir()
    files.mark(out, "run")
    (out / "config.json").write_text("{}")
    with pytest.raises(SelfsupError, match="not a export folder|run folder"):
        export_hf(run, out, overwrite=True)
    assert (out / "config.json").read_text() == "{}"


# ---- modes -------------------------------------------------------------------------------------------


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Sets the process umask for one test and restores it whatever happens."""
    old = os.umask(0o022)
    os.umask(old)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_export_modes_follow_the_umask(tmp_path, tokenizers, umask, mask, file_mode, dir_mode) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    umask(mask)
    out = export_hf(run, tmp_path / "hf")
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and all(mode == file_mode for mode in modes.values()), {k: oct(v) for k, v in modes.items()}


# ---- a failed write ----------------------------------------------------------------------------------


def _fail_save_pretrained(monkeypatch) -> None:
    real = transformers.GPT2LMHeadModel.save_pretrained

    def save_then_fail(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        Path(folder, "model.safetensors").write_bytes(b"half")  # a torn file, as a full disk leaves one
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder, "model.safetensors")))

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "save_pretrained", save_then_fail)


def _fail_tokenizer(monkeypatch) -> None:
    real = hf._write_tokenizer

    def write_then_fail(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder, "tokenizer_config.json")))

    monkeypatch.setattr(hf, "_write_tokenizer", write_then_fail)


@pytest.mark.parametrize("fail", [_fail_save_pretrained, _fail_tokenizer], ids=["model", "tokenizer"])
def test_a_full_disk_leaves_the_previous_export_untouched(tmp_path, tokenizers, monkeypatch, fail) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    out = export_hf(run, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail(monkeypatch)
    with pytest.raises(SelfsupError) as err:
        export_hf(run, out, overwrite=True)
    assert str(out) in str(err.value) and "No space left on device" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary folder left


def test_a_full_disk_on_a_first_export_leaves_nothing(tmp_path, tokenizers, monkeypatch) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    _fail_save_pretrained(monkeypatch)
    with pytest.raises(SelfsupError, match="No space left on device"):
        export_hf(run, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("which", ["decoder_export", "encoder_export"])
def test_readme_code_runs(request, monkeypatch, capsys, which) -> None:
    """The README's snippet is what a user pastes: it must load and run as written."""
    out, _ = request.getfixturevalue(which)
    text = (out / "README.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(out.parent)  # `folder = "<name>"` is relative to where the user stands
    exec(compile(code, str(out / "README.md"), "exec"), {})
    assert capsys.readouterr().out.strip()


def test_a_real_write_error_from_safetensors_is_reported(tmp_path, tokenizers) -> None:
    """A real OS write failure, not a mock: RLIMIT_FSIZE makes the kernel fail model.safetensors'
    write with EFBIG, as a full disk fails it with ENOSPC; safetensors raises its own SafetensorError."""
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    out = export_hf(run, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = max(len(data) for name, data in before.items() if name != "model.safetensors") + 1
    assert (out / "model.safetensors").stat().st_size > limit
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a killed process
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        with pytest.raises(SelfsupError, match="File too large") as err:
            export_hf(run, out, overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert str(out) in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]
