"""Hugging Face export of an audio run: the Wav2Vec2Model / HubertModel computes what the AudioEncoder computes.

Every weight (LayerNorms, the weight-normed position conv's gain, the mask embedding) is randomised
before export, so a swapped, unsplit or dropped tensor changes the hidden states far beyond 1e-4.
Index correspondence: transformers' `hidden_states[k]` is selfsup's `contextualise(..., layer=k)`
(k = 0: the blocks' input after the position convolution; k >= 1: block k's output before the final
LayerNorm), and `last_hidden_state` is selfsup's `forward`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfsup import files  # noqa: E402
from selfsup.encoders import build_encoder, describe_encoder  # noqa: E402
from selfsup.errors import SelfsupError  # noqa: E402
from selfsup.export.encoder import save_encoder  # noqa: E402
from selfsup.export.hf import export_hf  # noqa: E402
from selfsup.export.hf_audio import export_hf_audio  # noqa: E402

SIZE = {"conv_channels": 32, "dim": 48, "depth": 3, "heads": 4, "mlp_ratio": 2.0, "pos_conv_kernel": 16,
        "pos_conv_groups": 4}
HF_CLASS = {"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel"}
LENGTHS = [16000, 9000, 4000]  # 1 s, 0.56 s, 0.25 s: 49, 27 and 12 frames


def _randomise(encoder: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            # LayerNorm gains around 1, everything else (biases, g, v, the mask embedding) around 0.
            is_gain = param.dim() == 1 and name.endswith("weight")
            param.copy_(1.0 + 0.3 * noise if is_gain else 0.3 * noise)


def _make_run(root: Path, method: str = "wav2vec2", seed: int = 0, **overrides) -> tuple[Path, torch.nn.Module]:
    """A fake finished run directory holding a randomised wav2vec2_tiny-family encoder."""
    kw = {**SIZE, **overrides}
    encoder = build_encoder("wav2vec2_tiny", **kw)
    _randomise(encoder, seed)
    run = root / "run"
    save_encoder(run, encoder, {
        "encoder": describe_encoder("wav2vec2_tiny", **kw),
        "preprocess": {"modality": "audio", "sample_rate": 16000},
        "method": {"name": method},
    })
    return run, encoder.eval()


def _batch(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio [3, 16000] right-padded with zeros, attention_mask int64 [3, 16000])."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    real = torch.arange(max(LENGTHS)) < lengths[:, None]  # [B, T]
    audio = torch.randn(len(LENGTHS), max(LENGTHS), generator=gen) * real
    return audio, real.long()


@pytest.fixture(scope="module", params=["wav2vec2", "hubert"])
def exported(request, tmp_path_factory):
    method = request.param
    root = tmp_path_factory.mktemp(method)
    run, encoder = _make_run(root, method, seed=1 if method == "hubert" else 0)
    out = export_hf_audio(run, root / "hf")
    model_class = getattr(transformers, HF_CLASS[method])
    model, info = model_class.from_pretrained(out, output_loading_info=True)
    return method, encoder, model.eval(), info, out


def test_exported_model_is_the_methods_class_with_every_weight(exported) -> None:
    method, _, model, info, out = exported
    assert type(model).__name__ == HF_CLASS[method]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(transformers.AutoModel.from_pretrained(out)).__name__ == HF_CLASS[method]


def test_last_hidden_state_matches_forward_on_a_padded_batch(exported) -> None:
    _, encoder, model, _, _ = exported
    audio, attention_mask = _batch()
    with torch.no_grad():
        ours = encoder(audio, lengths=attention_mask.sum(dim=1))  # [B, F, D]
        theirs = model(audio, attention_mask=attention_mask).last_hidden_state
        _, frame_mask = encoder.latents(audio, attention_mask.sum(dim=1))
    assert theirs.shape == ours.shape == (3, 49, SIZE["dim"])
    assert frame_mask.sum(dim=1).tolist() == [49, 27, 12]
    assert ours.abs().max() > 1.0  # the comparison below is not between two near-zero tensors
    assert (theirs - ours)[frame_mask].abs().max().item() <= 1e-4
    # transformers zeroes padded frames before the position conv and hides them as keys, as selfsup
    # does, so even the (meaningless) padded frames agree.
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_hidden_states_are_contextualise_layers(exported) -> None:
    _, encoder, model, _, _ = exported
    audio, attention_mask = _batch(seed=8)
    with torch.no_grad():
        z, frame_mask = encoder.latents(audio, attention_mask.sum(dim=1))
        hidden = model(audio, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        assert len(hidden) == encoder.num_layers + 1
        for k in range(encoder.num_layers + 1):  # hidden_states[k] = layer=k (0: the blocks' input)
            ours = encoder.contextualise(z, frame_mask, layer=k)
            assert (hidden[k] - ours)[frame_mask].abs().max().item() <= 1e-4, k
        # A wrong correspondence would be caught: neighbouring layers differ by far more.
        assert (hidden[2] - encoder.contextualise(z, frame_mask, layer=1)).abs().max().item() > 0.1


def test_mask_time_indices_is_our_mask(exported) -> None:
    _, encoder, model, _, _ = exported
    audio, attention_mask = _batch(seed=9)
    with torch.no_grad():
        z, frame_mask = encoder.latents(audio, attention_mask.sum(dim=1))
        mask = (torch.rand(frame_mask.shape, generator=torch.Generator().manual_seed(10)) < 0.4) & frame_mask
        ours = encoder.contextualise(z, frame_mask, mask)
        theirs = model(audio, attention_mask=attention_mask, mask_time_indices=mask).last_hidden_state
    assert (theirs - ours)[frame_mask].abs().max().item() <= 1e-4
    assert (ours - encoder.contextualise(z, frame_mask))[mask].abs().max() > 0.1  # the mask did something


def test_exported_feature_extractor_prepares_inputs_as_selfsup(exported) -> None:
    """Raw clips through the exported Wav2Vec2FeatureExtractor: per-utterance normalisation over the
    real samples, zero padding and the attention mask, which the model then reads like selfsup."""
    _, encoder, model, _, out = exported
    extractor = transformers.AutoFeatureExtractor.from_pretrained(out)
    assert type(extractor).__name__ == "Wav2Vec2FeatureExtractor"
    assert extractor.sampling_rate == 16000 and extractor.do_normalize and extractor.return_attention_mask
    gen = np.random.default_rng(11)
    clips = [(3.0 * gen.standard_normal(n) + 0.5).astype(np.float32) for n in LENGTHS]
    batch = extractor(clips, sampling_rate=16000, padding=True, return_tensors="pt")
    audio, attention_mask = batch["input_values"], batch["attention_mask"]
    lengths = attention_mask.sum(dim=1)
    assert lengths.tolist() == LENGTHS
    for row, clip in zip(audio, clips):
        clip = torch.from_numpy(clip)
        normalised = (clip - clip.mean()) / torch.sqrt(clip.var(unbiased=False) + 1e-7)
        torch.testing.assert_close(row[: len(clip)], normalised, atol=1e-4, rtol=1e-4)
        assert not row[len(clip):].any()
    with torch.no_grad():
        ours = encoder(audio, lengths=lengths)
        theirs = model(**batch).last_hidden_state
        _, frame_mask = encoder.latents(audio, lengths)
    assert (theirs - ours)[frame_mask].abs().max().item() <= 1e-4


def test_config_json_holds_the_layout(exported) -> None:
    method, encoder, _, _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == method  # "wav2vec2" / "hubert"
    assert config["architectures"] == [HF_CLASS[method]]
    assert config["feat_extract_norm"] == "layer" and config["do_stable_layer_norm"] is True
    assert config["conv_dim"] == [32] * 7
    assert config["conv_kernel"] == [10, 3, 3, 3, 3, 2, 2] and config["conv_stride"] == [5, 2, 2, 2, 2, 2, 2]
    assert config["conv_bias"] is True and config["layer_norm_eps"] == 1e-5
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (48, 3, 4)
    assert config["intermediate_size"] == 96
    assert (config["num_conv_pos_embeddings"], config["num_conv_pos_embedding_groups"]) == (16, 4)
    assert config["hidden_act"] == config["feat_extract_activation"] == "gelu"
    assert config["layerdrop"] == 0.0 and config["hidden_dropout"] == 0.0
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["sampling_rate"] == 16000 and preprocessor["do_normalize"] is True
    assert preprocessor["return_attention_mask"] is True and preprocessor["feature_size"] == 1
    readme = (out / "README.md").read_text()
    assert HF_CLASS[method] in readme and "from_pretrained" in readme and f"method `{method}`" in readme


def test_export_files_follow_the_umask_and_carry_the_marker(exported) -> None:
    _, _, _, _, out = exported
    assert sorted(p.name for p in out.iterdir()) == [".selfsup.json", "README.md", "config.json",
                                                     "model.safetensors", "preprocessor_config.json"]
    assert files.read_marker(out)["kind"] == "export"
    expected = 0o666 & ~files.current_umask()
    for path in out.iterdir():
        assert os.stat(path).st_mode & 0o777 == expected, path.name
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~files.current_umask()


def test_export_hf_dispatches_audio_runs(tmp_path) -> None:
    """`selfsup export RUN --format hf` goes through export_hf, which hands an AudioEncoder to export_hf_audio."""
    run, encoder = _make_run(tmp_path, "hubert", seed=3)
    out = export_hf(run, tmp_path / "hf")
    model = transformers.HubertModel.from_pretrained(out).eval()
    audio, attention_mask = _batch(seed=12)
    with torch.no_grad():
        ours = encoder(audio, lengths=attention_mask.sum(dim=1))
        theirs = model(audio, attention_mask=attention_mask).last_hidden_state
        _, frame_mask = encoder.latents(audio, attention_mask.sum(dim=1))
    assert (theirs - ours)[frame_mask].abs().max().item() <= 1e-4


def test_other_methods_and_layouts_export_as_wav2vec2(tmp_path) -> None:
    # Any other objective on this encoder: the architecture's own name. A bias-free conv stack and
    # odd kernels (no frame dropped after the position conv) map too.
    run, encoder = _make_run(tmp_path, "some_other_method", seed=4, conv_bias=False, pos_conv_kernel=15,
                             conv_kernels=[10, 3, 3, 2], conv_strides=[5, 2, 2, 2])
    out = export_hf_audio(run, tmp_path / "hf")
    model = transformers.AutoModel.from_pretrained(out).eval()
    assert type(model).__name__ == "Wav2Vec2Model"
    audio, attention_mask = _batch(seed=13)
    with torch.no_grad():
        ours = encoder(audio, lengths=attention_mask.sum(dim=1))
        theirs = model(audio, attention_mask=attention_mask).last_hidden_state
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_missing_encoder_is_named(tmp_path) -> None:
    with pytest.raises(SelfsupError, match="encoder.json"):
        export_hf_audio(tmp_path, tmp_path / "hf")


def test_non_audio_encoder_is_refused(tmp_path) -> None:
    encoder = build_encoder("vit_tiny", in_channels=3, image_size=16, dim=32, depth=1, heads=2)
    run = tmp_path / "run"
    save_encoder(run, encoder, {"encoder": describe_encoder("vit_tiny", in_channels=3, image_size=16, dim=32, depth=1,
                                                            heads=2),
                                "preprocess": {"modality": "image"}, "method": {"name": "simclr"}})
    with pytest.raises(SelfsupError, match="not an audio encoder"):
        export_hf_audio(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_non_empty_output_needs_overwrite(tmp_path) -> None:
    run, _ = _make_run(tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SelfsupError, match="overwrite"):
        export_hf_audio(run, out)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(SelfsupError, match="notes.txt"):  # not an export selfsup made: never deleted
        export_hf_audio(run, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    export_hf_audio(run, out)  # an empty folder is filled without overwrite
    export_hf_audio(run, out, overwrite=True)  # and the export selfsup made is replaced with it
    assert (out / "model.safetensors").is_file()
    (out / "extra.bin").write_bytes(b"mine")
    with pytest.raises(SelfsupError, match=f"{out}.*extra.bin"):  # an added file names the folder and the file
        export_hf_audio(run, out, overwrite=True)
    assert (out / "extra.bin").read_bytes() == b"mine"
    # Nothing left behind from the temporary folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


def test_a_failed_write_names_the_output_and_keeps_the_previous_export(tmp_path, monkeypatch) -> None:
    run, _ = _make_run(tmp_path)
    out = export_hf_audio(run, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.Wav2Vec2FeatureExtractor, "save_pretrained", full_disk)
    with pytest.raises(SelfsupError, match=f"{out}.*No space left on device.*unchanged"):
        export_hf_audio(run, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]
