"""HuBERT's MFCC features (13 Kaldi MFCCs + deltas + delta-deltas, as fairseq's dump_mfcc_feature.py
computes them with torchaudio.compliance.kaldi.mfcc) and their alignment with the encoder's frames.

References:
- `REFERENCE`: values written by torchaudio 2.11.1 (`kaldi.mfcc(waveform, sample_frequency=16000,
  use_energy=False)` then `functional.compute_deltas` twice: fairseq's recipe) for a 440 Hz tone and
  a fixed pseudo-random noise, 0.6 s each. torchaudio cannot be a test dependency here (its wheels pin
  a torch build of their own), so its numbers are kept in this file; `test_matches_torchaudio_live`
  compared with it directly while this file was written (CI never skips a test, so the live
  comparison is not kept). Tolerance: 2e-3 absolute + 1e-4 relative. Our tables
  are built in float64 and rounded to float32, torchaudio's in float32; on the noise the two agree to
  1e-4, on the pure tone to 1.3e-3 at most, in cepstra of magnitude up to 72 — a tone leaves most mel
  filters at window side-lobe level, so their logs are large and float32 rounding shows.
- `kaldi_mfcc_numpy`: the Kaldi / HTK formulas written out again with loops in float64 (no shared
  code), on a chirp over a noise floor and on noise, to 1e-3 + 1e-4 relative (float32 against float64).
No reference library (python_speech_features, librosa) is used: python_speech_features quantises its
filters to FFT bins (its MFCCs of the same tone differ by up to 37) and librosa's filters are
triangles in Hz, not mel, with a 1-based lifter; neither reproduces the recipe HuBERT used.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.nn.mfcc import deltas, mfcc, mfcc_deltas, model_rate_mfcc, num_mfcc_frames

SR = 16000


def lcg_noise(n: int, seed: int = 12345) -> np.ndarray:
    """Uniform noise in [-0.5, 0.5) from a fixed linear congruential generator (the same on any platform)."""
    out, state = np.empty(n), seed
    for i in range(n):
        state = (1103515245 * state + 12345) % 2**31
        out[i] = state / 2**31 - 0.5
    return out


def signals() -> dict[str, torch.Tensor]:
    t = np.arange(9600) / SR
    return {"tone": torch.tensor(0.5 * np.sin(2 * np.pi * 440 * t), dtype=torch.float32),
            "noise": torch.tensor(0.2 * lcg_noise(9600), dtype=torch.float32)}


# torchaudio 2.11.1: [13 MFCC, 13 deltas, 13 delta-deltas] of frames 0, 1, 30 and 57 (of 58).
REFERENCE = {
    "tone": {
        0: [-54.9398, 61.3445, 39.4266, -14.4161, -55.5683, -70.9536, -70.8190, -56.6646, -27.3980, 3.7045, 21.7302, 26.2351, 22.9368, -0.0840, 0.1031, 1.0284, 0.9821, -0.2082, -0.2595, 1.0939, 1.3942, 0.2891, 0.0422, 0.8930, 0.8979, 0.0606, 0.0197, -0.0233, -0.2377, -0.2268, 0.0499, 0.0625, -0.2519, -0.3226, -0.0658, -0.0068, -0.2043, -0.2077, -0.0140],
        1: [-55.1206, 61.6547, 41.9482, -12.0154, -55.9276, -71.2961, -67.9725, -53.3077, -26.6608, 4.1339, 24.2276, 28.4234, 23.0157, -0.0632, 0.0944, 0.8344, 0.8006, -0.1343, -0.1602, 0.9106, 1.1287, 0.2559, 0.0911, 0.7677, 0.7325, 0.0543, 0.0395, -0.0522, -0.4968, -0.4746, 0.0937, 0.1137, -0.5346, -0.6720, -0.1425, -0.0333, -0.4427, -0.4342, -0.0285],
        30: [-54.9398, 61.3445, 39.4266, -14.4161, -55.5683, -70.9536, -70.8190, -56.6646, -27.3980, 3.7045, 21.7302, 26.2351, 22.9368, -0.0542, 0.0484, 0.5993, 0.5704, -0.1562, -0.2084, 0.6091, 0.8199, 0.1529, -0.0397, 0.4666, 0.5228, 0.0389, -0.0240, 0.0326, 0.3056, 0.2929, -0.0551, -0.0682, 0.3288, 0.4145, 0.0909, 0.0227, 0.2723, 0.2680, 0.0202],
        57: [-55.2693, 61.7047, 43.3078, -10.7061, -56.4296, -72.0800, -66.7729, -51.3721, -26.3209, 3.7008, 24.9466, 29.6307, 23.2002, -0.0808, 0.0770, 0.9122, 0.8729, -0.2225, -0.3037, 0.9292, 1.2521, 0.2494, -0.0441, 0.7152, 0.7998, 0.0711, -0.0034, 0.0019, 0.0339, 0.0329, -0.0104, -0.0164, 0.0313, 0.0478, 0.0096, -0.0071, 0.0208, 0.0300, 0.0044],
    },
    "noise": {
        0: [1.2328, -33.2548, -6.2755, -7.5519, -9.8371, -13.2460, -0.3722, -6.3768, -13.1328, -14.4999, -4.2182, 1.7442, 1.9084, -0.0962, -0.2166, -0.4856, -0.3609, 0.2410, 0.6798, -1.8556, -0.1637, 2.3316, 3.6152, 0.8018, -1.1783, 0.3501, -0.0653, -0.1041, 0.0148, -0.1356, -0.1034, 0.5129, 0.9512, -0.2240, 0.2433, -0.2918, 0.2924, 0.8073, 0.1169],
        1: [1.0184, -31.7496, -6.4195, -10.7689, -7.6653, -13.2705, -8.2815, -11.3726, -15.4944, -0.8753, -4.3477, -9.6484, -0.9749, -0.3633, -0.6056, -0.2176, -0.3441, 0.3821, 2.9275, 0.8489, -2.3235, 1.5819, 3.7509, 2.7050, 0.9571, 0.3730, 0.0088, -0.0580, -0.0362, -0.1207, -0.1092, 0.6801, 1.2568, 0.4043, 0.2908, -0.8573, 0.0485, 1.4683, 0.3104],
        30: [1.1030, -33.4412, -11.6899, -10.0413, -9.8975, -7.1903, -5.6233, -8.0008, 0.8288, -1.1692, -8.7037, -1.4675, -0.7779, 0.1099, 0.1124, 0.3409, 0.1947, 0.3947, -0.2441, 0.6188, -0.3315, -2.7060, -1.4281, -2.9306, -2.3729, -1.0825, 0.0541, 0.2727, 0.3494, -0.1242, 0.1263, 0.4418, 0.2717, -0.3404, -0.7414, -0.1767, 0.6827, 0.3080, 0.5652],
        57: [2.0981, -31.0897, -9.3718, -7.2885, -0.3164, -6.5541, -2.9277, -10.0079, -5.5032, -6.4162, 0.3272, -5.7415, -7.2241, 0.0829, -0.0497, -0.4989, 0.5512, 1.3639, -0.3648, -0.3940, -1.3512, -0.5928, -2.6166, -0.3815, -0.2696, -2.7589, -0.0794, -0.2607, -0.0895, 0.1513, -0.0428, 0.0642, 0.1776, 0.0653, -0.0102, -0.6131, 0.1047, 0.2777, -0.7675],
    },
}


@pytest.mark.parametrize("name", ["tone", "noise"])
def test_matches_torchaudio_kaldi_recipe(name):
    features = mfcc_deltas(signals()[name])
    assert features.shape == (58, 39) and features.dtype == torch.float32
    for frame, expected in REFERENCE[name].items():
        expected = torch.tensor(expected)
        error = (features[frame] - expected).abs()
        assert (error <= 2e-3 + 1e-4 * expected.abs()).all(), (frame, error.max().item())


def kaldi_mfcc_numpy(x: np.ndarray) -> np.ndarray:
    """Kaldi's MFCC (torchaudio's defaults, no energy), loop by loop in float64."""
    L, S, NFFT, nmel, nceps = 400, 160, 512, 23, 13
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    step = (hi - lo) / (nmel + 1)
    window = [(0.5 - 0.5 * math.cos(2 * math.pi * n / (L - 1))) ** 0.85 for n in range(L)]
    filters = np.zeros((nmel, NFFT // 2 + 1))
    for j in range(nmel):
        left, centre, right = lo + j * step, lo + (j + 1) * step, lo + (j + 2) * step
        for b in range(NFFT // 2):  # the Nyquist bin keeps weight 0
            m = mel(b * SR / NFFT)
            if left < m < right:
                filters[j, b] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    out = []
    for start in range(0, len(x) - L + 1, S):
        frame = x[start : start + L] - x[start : start + L].mean()
        emphasised = [frame[n] - 0.97 * frame[max(n - 1, 0)] for n in range(L)]
        spectrum = np.abs(np.fft.rfft(np.array(emphasised) * window, NFFT)) ** 2
        logmel = [math.log(max(float(filters[j] @ spectrum), np.finfo(np.float32).eps)) for j in range(nmel)]
        ceps = []
        for k in range(nceps):
            scale = math.sqrt(1.0 / nmel) if k == 0 else math.sqrt(2.0 / nmel)
            c = scale * sum(logmel[m] * math.cos(math.pi * k * (m + 0.5) / nmel) for m in range(nmel))
            ceps.append(c * (1.0 + 11.0 * math.sin(math.pi * k / 22.0)))
        out.append(ceps)
    return np.array(out)


def test_matches_the_formulas():
    t = np.arange(8000) / SR
    chirp = np.sin(2 * np.pi * (100 + 1500 * t) * t) * (1.2 + np.sin(2 * np.pi * 4 * t))
    # With a noise floor as any recording has: a pure chirp leaves filters at window side-lobe level,
    # where float32 rounding (ours, as torchaudio's) differs from float64 by 1e-3 relative.
    for x in (chirp + 0.01 * lcg_noise(8000, seed=3), 0.3 * lcg_noise(8000, seed=7)):
        ours = mfcc(torch.tensor(x, dtype=torch.float32)).double().numpy()
        expected = kaldi_mfcc_numpy(x.astype(np.float32).astype(np.float64))
        assert ours.shape == expected.shape == (48, 13)
        assert (np.abs(ours - expected) <= 1e-3 + 1e-4 * np.abs(expected)).all()  # float32 against float64


def test_deltas_formula():
    x = torch.randn(9, 3, dtype=torch.float64)
    d = deltas(x)
    padded = torch.cat([x[:1], x[:1], x, x[-1:], x[-1:]])  # the ends repeated
    for t in range(9):
        expected = (1 * (padded[t + 3] - padded[t + 1]) + 2 * (padded[t + 4] - padded[t])) / 10
        assert torch.allclose(d[t], expected)
    assert deltas(torch.zeros(0, 3)).shape == (0, 3)


def test_frame_counts_and_short_clips():
    for T in (0, 399, 400, 559, 560, 16000):
        assert mfcc(torch.zeros(T)).shape == (num_mfcc_frames(T), 13)
    assert num_mfcc_frames(399) == 0 and num_mfcc_frames(400) == 1 and num_mfcc_frames(560) == 2
    assert num_mfcc_frames(16000) == 98


def encoder_frames(T: int) -> int:
    """The wav2vec 2.0 feature encoder's frames on T samples (kernels 10,3,3,3,3,2,2, strides 5,2,...)."""
    frames = T
    for kernel, stride in zip((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)):
        frames = (frames - kernel) // stride + 1
    return max(frames, 0)


def test_model_rate_frames_cover_every_encoder_frame():
    # The encoder's frame count is 1 + (T - 400) // 320: MFCC frames 0, 2, ... always cover it.
    for T in range(400, 20000, 37):
        frames = encoder_frames(T)
        assert frames == 1 + (T - 400) // 320
        assert (num_mfcc_frames(T) + 1) // 2 >= frames
    try:
        from selfsup.encoders import ENCODERS, build_encoder
    except ImportError:
        return
    if "wav2vec2_tiny" in ENCODERS:
        encoder = build_encoder("wav2vec2_tiny")
        lengths = torch.arange(400, 20000, 37)
        assert encoder.frame_lengths(lengths).tolist() == [encoder_frames(int(T)) for T in lengths]


def test_model_frame_t_reads_the_window_of_mfcc_frame_2t():
    # Model frame t covers samples [320 t, 320 t + 400): the MFCC of that window alone is frame t's statics.
    wave = signals()["noise"]
    num_frames = encoder_frames(len(wave))
    features = model_rate_mfcc(wave, num_frames)
    assert features.shape == (num_frames, 39)
    for t in (0, 5, num_frames - 1):
        alone = mfcc(wave[320 * t : 320 * t + 400])
        assert alone.shape == (1, 13) and torch.allclose(features[t, :13], alone[0], atol=1e-4)
    assert torch.equal(features, mfcc_deltas(wave)[::2][:num_frames])
