"""Whisper's front end: waveform → log-mel spectrogram, as OpenAI's ``log_mel_spectrogram`` defines it.

Shapes: B batch, N samples at 16 kHz, F_mel mel bins (80 for tiny … large-v2), T = N // 160 frames.

    resample to 16 kHz (soxr, a polyphase resampler; AV-MNIST/FSDD audio is 8 kHz)
    X[f, t]  = Σ_n x[160 t + n − 200] · w[n] · e^(−2πi f n / 400),  n = 0 … 399, w periodic Hann (400)
               (the waveform is reflect-padded by 200 samples at both ends: torch.stft(center=True));
               t = 0 … N // 160, and the last frame is dropped (as OpenAI does), so T = N // 160
    P[f, t]  = |X[f, t]|²                                   power spectrum, f = 0 … 200
    M[m, t]  = Σ_f W[m, f] · P[f, t]                        W: Slaney mel filters, Slaney-normalised
    L        = log10(max(M, 1e-10));  L = max(L, max_{m,t} L − 8);  features = (L + 4) / 4

The maximum is taken per waveform (OpenAI and ``WhisperFeatureExtractor`` process one waveform at a time).

**30 s padding.** OpenAI and ``transformers``' ``WhisperFeatureExtractor`` first zero-pad (or trim) every
waveform to 30 s = 480,000 samples, giving 3,000 frames; ``num_samples=SAMPLES_PER_WINDOW`` here does the
same. Without it, a clip of N samples gives N // 160 frames. Frame t's window covers samples
[160 t − 200, 160 t + 200): the frames whose window lies inside the clip are the same either way; the
last ones (160 t + 200 > N, i.e. the final one or two frames) differ, because here they see the clip's
reflected end where the padded run sees zeros. The clamp to max − 8 is unaffected (zeros give −10 before
the clamp and never raise the maximum).
"""

from __future__ import annotations

import math

import numpy as np
import soxr
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16_000  # Hz, the rate Whisper's features are defined at
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 frames per second
SAMPLES_PER_WINDOW = 30 * SAMPLE_RATE  # OpenAI's 30 s input window → 3,000 frames
LOG_FLOOR = 1e-10  # mel power floor before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below the maximum (80 dB)

# Slaney's mel scale (Auditory Toolbox; librosa's default, htk=False): linear below 1 kHz, logarithmic above.
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _LINEAR_HZ_PER_MEL  # 15 mel
_LOG_STEP = math.log(6.4) / 27.0  # mel per ln(Hz) above the break


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel of frequencies ``hz`` (any shape): hz / (200/3) below 1 kHz, 15 + ln(hz / 1000) / step above."""
    log_part = _BREAK_MEL + torch.log(hz.clamp(min=_BREAK_HZ) / _BREAK_HZ) / _LOG_STEP
    return torch.where(hz < _BREAK_HZ, hz / _LINEAR_HZ_PER_MEL, log_part)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of hz_to_mel."""
    log_part = _BREAK_HZ * torch.exp(_LOG_STEP * (mel.clamp(min=_BREAK_MEL) - _BREAK_MEL))
    return torch.where(mel < _BREAK_MEL, mel * _LINEAR_HZ_PER_MEL, log_part)


def mel_filters(num_mel_bins: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular Slaney-scale mel filters with Slaney normalisation → W (F_mel, n_fft // 2 + 1), float32.

    Centres c_0 < … < c_{F_mel+1} are equally spaced in mel from 0 Hz to sample_rate / 2; filter m rises
    from c_m to c_{m+1} and falls to c_{m+2}, scaled by 2 / (c_{m+2} − c_m) so that each has unit area
    in Hz (librosa.filters.mel(norm="slaney"), which OpenAI's stored mel_filters.npz was made with).
    """
    frequencies = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (n_fft // 2 + 1,)
    edges = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(frequencies[-1:])[0]), num_mel_bins + 2, dtype=torch.float64))
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (F_mel, 1) each
    rising = (frequencies - low) / (centre - low)
    falling = (high - frequencies) / (high - centre)
    triangles = torch.minimum(rising, falling).clamp(min=0.0)
    return (triangles * (2.0 / (high - low))).float()


def resample(waveform: torch.Tensor, sample_rate: int, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """waveform (B, N) or (N,) at ``sample_rate`` → the same at ``target_rate``, (B, N') or (N',), float32.

    soxr's "HQ" polyphase filter (the default of python-soxr); 8 kHz → 16 kHz gives N' = 2N. It runs on the
    CPU on a NumPy copy (no gradient); the result is on ``waveform``'s device.
    """
    if sample_rate == target_rate:
        return waveform.float()
    samples = waveform.detach().float().cpu().numpy()
    # soxr takes (frames, channels): the batch rides as channels, so one call resamples every waveform.
    channels = samples.T if samples.ndim == 2 else samples
    out = np.ascontiguousarray(soxr.resample(channels, sample_rate, target_rate).T)
    return torch.from_numpy(out).to(waveform.device)


def log_mel_spectrogram(
    waveform: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = 80,
    num_samples: int | None = None,
) -> torch.Tensor:
    """waveform (B, N) or (N,) at ``sample_rate`` → Whisper log-mel features (B, F_mel, T) or (F_mel, T).

    The waveform is resampled to 16 kHz first (``resample``); T = N16 // 160 for N16 samples at 16 kHz.
    ``num_samples``: zero-pad or trim the 16 kHz waveform to this many samples first (OpenAI's
    pad_or_trim; ``SAMPLES_PER_WINDOW`` gives the 3,000-frame input of the original models). Values lie in
    [max − 2, max] with max ≈ (log10 of the loudest mel power + 4) / 4. See the module docstring.
    """
    if waveform.ndim not in (1, 2):
        raise ValueError(f"waveform must be (N,) or (B, N), got shape {tuple(waveform.shape)}")
    audio = resample(waveform, sample_rate)
    if num_samples is not None:
        length = audio.shape[-1]
        audio = F.pad(audio, (0, num_samples - length)) if length < num_samples else audio[..., :num_samples]
    if audio.shape[-1] <= N_FFT // 2:
        raise ValueError(f"waveform too short: {audio.shape[-1]} samples at 16 kHz; the STFT needs > {N_FFT // 2}")
    window = torch.hann_window(N_FFT, device=audio.device)
    spectrum = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spectrum[..., :-1].abs() ** 2  # (…, n_fft // 2 + 1, T): the last frame dropped, as OpenAI does
    mel = mel_filters(num_mel_bins).to(audio.device) @ power  # (…, F_mel, T)
    log_mel = mel.clamp(min=LOG_FLOOR).log10()
    peak = log_mel.amax(dim=(-2, -1), keepdim=True)  # per waveform
    return (torch.maximum(log_mel, peak - DYNAMIC_RANGE) + 4.0) / 4.0
