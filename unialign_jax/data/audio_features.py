"""Log-mel features of a waveform, pooled into a fixed number of time segments (pure numpy).

    frames   = Hann-windowed frames (25 ms window, 10 ms hop by default), FFT size the next power of two
    psd[f]   = |rfft(frame)|^2 / (sample_rate * sum(window^2))           (power spectral density per Hz)
    mel[f,m] = sum_k psd[f, k] * triangle_m(k)                           (unit-area triangles, HTK mel scale)
    log_mel  = log(mel + LOG_FLOOR)                                      [frames, num_mel_bins]

Windows and hops are given in seconds and the filters are unit-area densities, so recordings at
different sample rates (FSDD at 8 kHz, espeak-ng at 22.05 kHz) give comparable features as long as
`max_frequency` is at most the lowest Nyquist frequency (4 kHz for FSDD).

`pooled_log_mel` scales the waveform to peak amplitude 1, trims leading and trailing silence
(frames more than `trim_db` below the loudest frame), averages the remaining frames in
`num_segments` contiguous, equally long segments and standardises the result per clip (zero mean,
unit variance over all segments and bins), which makes the features independent of recording
level and microphone gain.
"""

from __future__ import annotations

import numpy as np

LOG_FLOOR = 1e-10  # added to the mel power density before the log (about -100 dB)
MAX_FREQUENCY = 4000.0  # default top of the mel filters: FSDD's Nyquist frequency


def hz_to_mel(frequency: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: `2595 log10(1 + f / 700)`."""
    return 2595.0 * np.log10(1.0 + np.asarray(frequency, np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, fft_size: int, num_mel_bins: int, min_frequency: float, max_frequency: float
) -> np.ndarray:
    """Triangular filters equally spaced on the mel scale, each summing to 1 over FFT bins.

    Returns:
        float64[num_mel_bins, fft_size // 2 + 1].
    """
    if not 0.0 <= min_frequency < max_frequency <= sample_rate / 2:
        raise ValueError(
            f"mel filterbank: need 0 <= min_frequency ({min_frequency}) < max_frequency ({max_frequency}) "
            f"<= sample_rate / 2 ({sample_rate / 2})"
        )
    bin_frequencies = np.fft.rfftfreq(fft_size, 1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(hz_to_mel(min_frequency), hz_to_mel(max_frequency), num_mel_bins + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_frequencies - lower) / (center - lower)
    falling = (upper - bin_frequencies) / (upper - center)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    area = filters.sum(axis=1, keepdims=True)
    if np.any(area == 0):
        raise ValueError(
            f"mel filterbank: {num_mel_bins} mel bins between {min_frequency} and {max_frequency} Hz are narrower "
            f"than the FFT bins ({sample_rate / fft_size:.1f} Hz) at sample rate {sample_rate}: use fewer mel bins"
        )
    return filters / area


def log_mel_spectrogram(
    waveform: np.ndarray,
    sample_rate: int,
    *,
    num_mel_bins: int = 40,
    window_seconds: float = 0.025,
    hop_seconds: float = 0.010,
    min_frequency: float = 20.0,
    max_frequency: float = MAX_FREQUENCY,
) -> np.ndarray:
    """Log-mel spectrogram of a mono waveform (see the module docstring).

    Args:
        waveform: float[num_samples], any scale. Shorter than one window: zero-padded to one frame.
        sample_rate: samples per second.

    Returns:
        float32[num_frames, num_mel_bins], `num_frames = 1 + (max(num_samples, window) - window) // hop`.
    """
    waveform = np.asarray(waveform, np.float64)
    if waveform.ndim != 1 or waveform.size == 0:
        raise ValueError(f"log_mel_spectrogram expects a non-empty mono waveform, got shape {waveform.shape}")
    window_length = max(1, int(round(window_seconds * sample_rate)))
    hop_length = max(1, int(round(hop_seconds * sample_rate)))
    fft_size = 1 << (window_length - 1).bit_length()
    if waveform.size < window_length:
        waveform = np.pad(waveform, (0, window_length - waveform.size))
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(window_length) / window_length)  # periodic Hann
    frames = np.lib.stride_tricks.sliding_window_view(waveform, window_length)[::hop_length] * window
    power = np.abs(np.fft.rfft(frames, n=fft_size, axis=-1)) ** 2 / (sample_rate * np.sum(window**2))
    filters = mel_filterbank(sample_rate, fft_size, num_mel_bins, min_frequency, max_frequency)
    return np.log(power @ filters.T + LOG_FLOOR).astype(np.float32)


def trim_silence(log_mel: np.ndarray, trim_db: float) -> np.ndarray:
    """Drops leading and trailing frames whose mel energy is more than `trim_db` below the loudest frame."""
    energy_db = 10.0 * np.log10(np.exp(log_mel.astype(np.float64)).sum(axis=-1))
    loud = np.flatnonzero(energy_db >= energy_db.max() - trim_db)
    return log_mel[loud[0] : loud[-1] + 1]


def pool_segments(frames: np.ndarray, num_segments: int) -> np.ndarray:
    """Means over `num_segments` contiguous, equally long segments of the first axis.

    Segment t covers frames `[floor(t F / S), floor((t + 1) F / S))` of F frames, widened to one frame
    when F < S (frames are then repeated), so every segment is the mean of at least one frame.

    Returns:
        float32[num_segments, *frames.shape[1:]].
    """
    num_frames = frames.shape[0]
    if num_frames == 0 or num_segments < 1:
        raise ValueError(f"pool_segments: need >= 1 frame and >= 1 segment, got {num_frames} and {num_segments}")
    starts = (np.arange(num_segments) * num_frames) // num_segments
    stops = np.maximum((np.arange(1, num_segments + 1) * num_frames) // num_segments, starts + 1)
    cumulative = np.concatenate([np.zeros_like(frames[:1], np.float64), np.cumsum(frames, axis=0, dtype=np.float64)])
    lengths = (stops - starts).reshape(-1, *([1] * (frames.ndim - 1)))
    return ((cumulative[stops] - cumulative[starts]) / lengths).astype(np.float32)


def pooled_log_mel(
    waveform: np.ndarray,
    sample_rate: int,
    num_segments: int,
    *,
    num_mel_bins: int = 40,
    trim_db: float = 40.0,
    max_frequency: float = MAX_FREQUENCY,
) -> np.ndarray:
    """Peak-normalised, silence-trimmed log-mel pooled into `num_segments` segments, standardised per clip.

    Returns:
        float32[num_segments, num_mel_bins] with zero mean and unit variance (a constant clip gives zeros).
    """
    waveform = np.asarray(waveform, np.float64)
    peak = np.abs(waveform).max(initial=0.0)
    log_mel = log_mel_spectrogram(
        waveform / peak if peak > 0 else waveform, sample_rate, num_mel_bins=num_mel_bins, max_frequency=max_frequency
    )
    pooled = pool_segments(trim_silence(log_mel, trim_db), num_segments).astype(np.float64)
    centered = pooled - pooled.mean()
    scale = centered.std()
    return (centered / scale if scale > 0 else centered).astype(np.float32)
