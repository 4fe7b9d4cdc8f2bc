"""silero-vad 6.2.3: its six ONNX files run by lstm_engine chunk by chunk against onnxruntime.

The stream is 10 s of audio, cut the way silero-vad's own wrapper cuts it: 512-sample chunks at 16 kHz (256 at
8 kHz), each with the 64 (32) samples before it as context, the model's state carried from one call to the next.
Every chunk's speech probability must agree with onnxruntime's within 1e-4, and so must the state at the end
(relative 1e-5 for its large cell values).
The sequence model takes all chunks in one call. The TorchScript and safetensors files are refused, by name.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import zoo_packages as packages
import pytest

import lstm_engine as le
from lstm_engine.plan import Call, Plan

pytestmark = pytest.mark.zoo
ort = pytest.importorskip("onnxruntime")

STREAMING = [  # (file, sample rate, whether it takes sr)
    ("silero_vad.onnx", 16000, True),
    ("silero_vad.onnx", 8000, True),
    ("silero_vad_op18_ifless.onnx", 16000, True),
    ("silero_vad_op18_ifless.onnx", 8000, True),
    ("silero_vad_16k_op15.onnx", 16000, True),
    ("silero_vad_half.onnx", 16000, False),
    ("silero_vad_openvino_16k.onnx", 16000, False),
]


@pytest.fixture(scope="module")
def data(zoo):
    return zoo("silero-vad", "6.2.3") / "silero_vad" / "data"


def _chunks(audio: np.ndarray, rate: int):
    """Each chunk with its context, as silero-vad's OnnxWrapper builds them: (1, context + chunk) arrays."""
    size, context = (512, 64) if rate == 16000 else (256, 32)
    previous = np.zeros((1, context), np.float32)
    for start in range(0, len(audio) - size + 1, size):
        x = np.concatenate([previous, audio[None, start:start + size]], axis=1)
        previous = x[:, -context:]
        yield x


def _onnxruntime(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3  # silero's files carry unused initializers onnxruntime warns about
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name, rate, takes_sr", STREAMING)
def test_silero_vad_streams_like_onnxruntime(data, name, rate, takes_sr):
    model = le.load(data / name)
    general = Plan(model.graph, model.dtype, specialise=False)  # what each specialised run must equal bit for bit
    session = _onnxruntime(data / name)
    audio = packages.voice_like(10.0, rate)
    ours = theirs = np.zeros((2, 1, 128), np.float32)
    got, expected = [], []
    for x in _chunks(audio, rate):
        feeds = {"input": x}
        if takes_sr:
            feeds["sr"] = np.array(rate, np.int64)
        out = model.run({**feeds, "state": ours})
        want = general.run([{**feeds, "state": ours}.get(v.name) for v in model.graph.inputs],
                           Call([None] * len(model.recurrent_layers)))
        for name, value in zip(model.graph.outputs, want):
            np.testing.assert_array_equal(out[name], value, err_msg=name)
        ref = dict(zip(("output", "stateN"), session.run(["output", "stateN"], {**feeds, "state": theirs})))
        ours, theirs = out["stateN"], ref["stateN"]
        got.append(out["output"].item())
        expected.append(ref["output"].item())
    got, expected = np.array(got), np.array(expected)
    assert len(got) == 10 * rate // (512 if rate == 16000 else 256)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # The cell half of the state grows to hundreds on long voiced runs: float32 agrees to ~1e-6 of it.
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    # The stream is not trivial for the model: its probability moves.
    assert expected.max() - expected.min() > 0.3


def test_silero_vad_sample_rate_and_shapes_may_change_between_calls(data):
    """The engine compiles one program per signature (chunk shape, batch, the value of sr, which picks the If
    branch): switching 16 kHz -> 8 kHz -> 16 kHz and the batch size mid-stream must still match onnxruntime."""
    model = le.load(data / "silero_vad.onnx")
    session = _onnxruntime(data / "silero_vad.onnx")
    streams = {rate: list(_chunks(packages.voice_like(4.0, rate), rate)) for rate in (16000, 8000)}
    ours = theirs = np.zeros((2, 1, 128), np.float32)
    got, expected = [], []
    for block, (rate, batch) in enumerate([(16000, 1), (8000, 1), (16000, 1), (16000, 2), (8000, 1), (16000, 1)]):
        if ours.shape[1] != batch:
            ours = theirs = np.zeros((2, batch, 128), np.float32)
        for x in streams[rate][block * 8:block * 8 + 8]:
            feeds = {"input": np.repeat(x, batch, axis=0), "sr": np.array(rate, np.int64)}
            out = model.run({**feeds, "state": ours})
            ref = session.run(["output", "stateN"], {**feeds, "state": theirs})
            ours, theirs = out["stateN"], ref[1]
            got.append(out["output"])
            expected.append(ref[0])
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    assert len(model.plan(model.dtype).specialiser.compiled) == 3  # 16 kHz and 8 kHz at batch 1, 16 kHz at 2


def test_silero_vad_sequence_model(data):
    path = data / "silero_vad_16k_sequence.onnx"
    audio = packages.voice_like(10.0, 16000)
    x = np.concatenate(list(_chunks(audio, 16000)), axis=0)
    feeds = {"input": x, "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}
    out = le.load(path).run(feeds)
    ref = dict(zip(("speech_probs", "hn", "cn"), _onnxruntime(path).run(["speech_probs", "hn", "cn"], feeds)))
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=0, atol=1e-4, err_msg=key)


def test_silero_vad_other_files_refused(data):
    with pytest.raises(le.UnsafeModelError, match=r"silero_vad\.jit: refusing pickle global '__torch__.*TorchScript"):
        le.load(data / "silero_vad.jit")
    with pytest.raises(le.LoadError, match=r"silero_vad_16k\.safetensors: tensor '.*' is not a parameter of a bare "
                                           r"nn\.LSTM/GRU/RNN"):
        le.load(data / "silero_vad_16k.safetensors")


def test_example_vad_stream_prints_onnxruntime_segments(data, tmp_path):
    """examples/vad_stream.py on a WAV file prints the segments onnxruntime's probabilities give."""
    path = Path(__file__).parents[2] / "examples" / "vad_stream.py"
    spec = importlib.util.spec_from_file_location("vad_stream", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    audio = packages.voice_like(6.0, 16000, seed=1)
    wav = tmp_path / "voice.wav"
    with wave.open(str(wav), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    samples = example.read_wav(str(wav))
    session = _onnxruntime(data / "silero_vad.onnx")
    state = np.zeros((2, 1, 128), np.float32)
    probabilities = []
    for k, x in enumerate(_chunks(np.concatenate([samples, np.zeros(-len(samples) % 512, np.float32)]), 16000)):
        p, state = session.run(None, {"input": x, "state": state, "sr": np.array(16000, np.int64)})
        probabilities.append((k * 512 / 16000, float(p[0, 0])))
    expected = [f"speech {a:7.2f} s - {b:7.2f} s" for a, b in example.segments(probabilities, 0.5)]
    assert expected

    env = {**os.environ, "LSTM_ENGINE_ZOO_CACHE": str(packages.cache_dir())}
    done = subprocess.run([sys.executable, str(path), str(wav), "--model", str(data / "silero_vad.onnx")],
                          capture_output=True, text=True, env=env, timeout=300, check=True)
    lines = done.stdout.splitlines()
    assert lines == expected + [f"{len(expected)} speech segment(s) in 6.00 s of audio"]
