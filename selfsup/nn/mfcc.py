"""MFCC features of 16 kHz audio in torch: HuBERT's first-iteration targets (Hsu et al. 2021, arXiv:2106.07447).

HuBERT clusters 39-d MFCC frames — 13 cepstra + their deltas + delta-deltas — exactly as fairseq's
`examples/hubert/simple_kmeans/dump_mfcc_feature.py` computes them: `torchaudio.compliance.kaldi.mfcc`
with its defaults (and use_energy=False), then `torchaudio.functional.compute_deltas` twice. torchaudio
is not a dependency here, so this is that recipe in plain torch, formula for formula (Kaldi's
`compute-mfcc-feats` with torchaudio's defaults):

- frames of 25 ms (400 samples) every 10 ms (160), only whole frames (`snip_edges`): 1 + (T - 400) // 160;
  no dither;
- per frame: the mean removed (`remove_dc_offset`), pre-emphasis x[n] - 0.97 x[n-1] within the frame
  (x[-1] := x[0]), Kaldi's "povey" window (a symmetric Hann window to the power 0.85), zero-padded to a
  512-point FFT, power spectrum;
- 23 triangular mel filters between 20 Hz and the Nyquist frequency, on the mel scale
  1127 ln(1 + f / 700) (= HTK's 2595 log10(1 + f/700)), each triangle linear in mel (Kaldi; librosa's
  are linear in Hz), no area normalisation, evaluated at the 256 FFT bins below Nyquist (the Nyquist
  bin gets weight 0);
- the natural log, floored at float32's machine epsilon;
- DCT-II with orthonormal scaling (c0 weighted sqrt(1/23)), the first 13 coefficients, then Kaldi's
  cepstral lifter 1 + 11 sin(pi i / 22), i = 0..12 (0-based, c0 unchanged);
- deltas: d[t] = Σ_{k=1..2} k (x[t+k] - x[t-k]) / 10, the sequence extended by repeating its end frames.

Frame rate and alignment with the encoder. The MFCC come at 100 Hz, the wav2vec 2.0 / HuBERT encoder
runs at 50 Hz (20 ms hop, 25 ms receptive field). As fairseq's HuBERT (label_rate 100 on a 50 Hz model:
`forward_targets` keeps label frame round(t * 2) for model frame t), model frame t takes MFCC frame 2t —
the deltas still computed at 100 Hz. The choice aligns the windows exactly: model frame t reads samples
[320 t, 320 t + 400), MFCC frame 2t samples [160 * 2t, 160 * 2t + 400). `model_rate_mfcc(wave,
num_frames)` gives those frames; a clip of T samples has at least as many of them as the encoder
has frames (1 + (T - 400) // 320), so the extra ones at the end are dropped.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from selfsup.errors import SelfsupError

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512  # the frame length rounded up to a power of two (Kaldi's round_to_power_of_two)
NUM_MEL_BINS = 23
NUM_CEPS = 13
LOW_FREQ, HIGH_FREQ = 20.0, SAMPLE_RATE / 2  # Kaldi's high_freq=0: the Nyquist frequency
PREEMPHASIS = 0.97
CEPSTRAL_LIFTER = 22.0
DELTA_WINDOW = 2  # compute_deltas' win_length 5
LABEL_STRIDE = 2  # MFCC frames (100 Hz) per encoder frame (50 Hz): model frame t takes MFCC frame 2t
FEATURE_DIM = 3 * NUM_CEPS  # 39


def mel_scale(freq: Tensor | float) -> Tensor | float:
    """Kaldi's mel scale 1127 ln(1 + f / 700)."""
    if isinstance(freq, Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


@lru_cache(maxsize=4)
def _tables(device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(window [400], mel filters [257, 23], DCT [23, 13], lifter [13]) in float32 on `device`."""
    n = torch.arange(FRAME_LENGTH, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * n / (FRAME_LENGTH - 1))  # symmetric (periodic=False)
    window = hann.pow(0.85)  # Kaldi's "povey"
    num_bins = FFT_SIZE // 2
    mel = mel_scale(SAMPLE_RATE / FFT_SIZE * torch.arange(num_bins, dtype=torch.float64)).unsqueeze(0)  # [1, 256]
    low, high = mel_scale(LOW_FREQ), mel_scale(HIGH_FREQ)
    delta = (high - low) / (NUM_MEL_BINS + 1)
    j = torch.arange(NUM_MEL_BINS, dtype=torch.float64).unsqueeze(1)  # [23, 1]
    left, centre, right = low + j * delta, low + (j + 1) * delta, low + (j + 2) * delta
    up, down = (mel - left) / (centre - left), (right - mel) / (right - centre)
    filters = torch.clamp(torch.minimum(up, down), min=0.0)  # [23, 256]
    filters = torch.cat([filters, torch.zeros(NUM_MEL_BINS, 1, dtype=torch.float64)], dim=1)  # + the Nyquist bin
    m = torch.arange(NUM_MEL_BINS, dtype=torch.float64)
    k = torch.arange(NUM_CEPS, dtype=torch.float64).unsqueeze(1)
    dct = torch.cos(math.pi / NUM_MEL_BINS * (m + 0.5) * k) * math.sqrt(2.0 / NUM_MEL_BINS)  # [13, 23]
    dct[0] = math.sqrt(1.0 / NUM_MEL_BINS)
    lifter = 1.0 + 0.5 * CEPSTRAL_LIFTER * torch.sin(math.pi * torch.arange(NUM_CEPS, dtype=torch.float64) / CEPSTRAL_LIFTER)
    return tuple(t.to(device=device, dtype=torch.float32) for t in (window, filters.T.contiguous(), dct.T.contiguous(), lifter))


def num_mfcc_frames(num_samples: int) -> int:
    """Whole 25 ms frames every 10 ms in a clip of `num_samples` (0 when shorter than one frame)."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def mfcc(wave: Tensor) -> Tensor:
    """The 13 Kaldi MFCCs [frames, 13] of one 16 kHz clip [T] (torchaudio.compliance.kaldi.mfcc's
    defaults, use_energy=False), in float32."""
    if wave.dim() != 1:
        raise SelfsupError(f"mfcc expects one clip [samples], got shape {tuple(wave.shape)}")
    window, filters, dct, lifter = _tables(str(wave.device))
    x = wave.float()
    if len(x) < FRAME_LENGTH:
        return x.new_zeros(0, NUM_CEPS)
    frames = x.unfold(0, FRAME_LENGTH, FRAME_SHIFT)  # [m, 400]
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - PREEMPHASIS * previous) * window
    power = torch.fft.rfft(frames, n=FFT_SIZE).abs().square()  # [m, 257]
    energies = power @ filters  # [m, 23]
    log_energies = torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()
    return (log_energies @ dct) * lifter  # [m, 13]


def deltas(features: Tensor, window: int = DELTA_WINDOW) -> Tensor:
    """d[t] = Σ_{k=1..N} k (x[t+k] - x[t-k]) / (2 Σ k²) along the frames of [frames, D], the ends repeated
    (torchaudio's compute_deltas, win_length = 2N + 1)."""
    if len(features) == 0:
        return features.clone()
    padded = torch.cat([features[:1].expand(window, -1), features, features[-1:].expand(window, -1)])
    total = sum(k * (padded[window + k : window + k + len(features)] - padded[window - k : window - k + len(features)])
                for k in range(1, window + 1))
    return total / (2 * sum(k * k for k in range(1, window + 1)))


def mfcc_deltas(wave: Tensor) -> Tensor:
    """HuBERT's 39-d MFCC features [frames, 39] at 100 Hz: 13 MFCCs, their deltas and delta-deltas."""
    ceps = mfcc(wave)
    d1 = deltas(ceps)
    return torch.cat([ceps, d1, deltas(d1)], dim=1)


def model_rate_mfcc(wave: Tensor, num_frames: int, stride: int = LABEL_STRIDE) -> Tensor:
    """[num_frames, 39]: the 39-d features of MFCC frames 0, stride, 2 stride, ... — with stride 2 the
    ones whose 25 ms windows are the 20 ms encoder frames' receptive fields — for an encoder with
    `num_frames` frames on this clip (its hop being stride x 10 ms)."""
    features = mfcc_deltas(wave)[::stride][:num_frames]
    if len(features) < num_frames:
        raise SelfsupError(f"a clip of {len(wave)} samples has {len(features)} MFCC frames at the model rate "
                           f"(every {stride}th of 10 ms), fewer than the encoder's {num_frames} frames")
    return features
