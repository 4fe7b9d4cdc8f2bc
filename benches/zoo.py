"""Zoo models against what their authors ship, timed interleaved in one run, ratios printed.

    python benches/zoo.py [--rounds N] [--clock cpu|wall]

silero-vad 6.2.3 (STFT, convolutions, LSTM): per 512-sample chunk with its state carried, against onnxruntime on the
package's own silero_vad.onnx. g2p-en 2.1.0 (GRU encoder-decoder): per word (encode + greedy decode) and per decode step against the package's own
NumPy code (compiled from its g2p.py, see tests/zoo/zoo_packages.py), and the encoding of all its words as one padded
batch with lengths against torch's packed GRU. Every system runs on one thread (engine, BLAS, torch). Outputs are
checked equal before timing; each round times every system in turn, so drift on a shared machine hits them alike;
medians over rounds are printed. Times are the calling thread's CPU time by default (every system runs on that one
thread): on a machine shared with other work, wall time also counts the waits for a core (``--clock wall``). Packages are fetched with pip download into the zoo cache, never installed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))
import zoo_packages as packages  # noqa: E402
from peers import machine  # noqa: E402

import lstm_engine as le  # noqa: E402
from lstm_engine import _kernels  # noqa: E402

MAX_STEPS = 20


def _time_into(fn: Callable[[], object], rounds: list[float], clock: Callable[[], float]) -> None:
    """Run fn once and append the time it took by clock, in seconds, to rounds."""
    start = clock()
    fn()
    rounds.append(clock() - start)


class G2pEn:
    """g2p-en's network in lstm_engine, and the package's NumPy code beside it."""

    def __init__(self) -> None:
        folder = packages.fetch("g2p-en", "2.1.0") / "g2p_en"
        self.ref = packages.g2p_en(folder)
        self.words = packages.g2p_en_words(folder)
        w = le.load_state_dict(folder / "checkpoint20.npz")
        self.w = w
        self.encoder = le.Model([le.Embedding(w["enc_emb"]),
                                 le.GRU(w["enc_w_ih"], w["enc_w_hh"], w["enc_b_ih"], w["enc_b_hh"])], threads=1)
        self.decoder = le.Model([le.Embedding(w["dec_emb"]),
                                 le.GRU(w["dec_w_ih"], w["dec_w_hh"], w["dec_b_ih"], w["dec_b_hh"]),
                                 le.Dense(w["fc_w"], w["fc_b"])], threads=1)
        self.session = self.decoder.session()
        g2idx = self.ref.g2idx
        self.rows = [np.array([[g2idx.get(ch, 1) for ch in word] + [g2idx["</s>"]]]) for word in self.words]
        lengths = np.array([r.shape[1] for r in self.rows])
        self.lengths = lengths
        self.batch = np.zeros((len(self.rows), lengths.max()), np.int64)
        for b, r in enumerate(self.rows):
            self.batch[b, :lengths[b]] = r[0]
        self.states = [self.encoder.forward(r)[1][0][0] for r in self.rows]

    # -- per word: encode + greedy decode --------------------------------------------------------
    def engine_word(self, b: int) -> list[int]:
        h = self.encoder.forward(self.rows[b])[1][0][0]
        return self.engine_decode(h)

    def engine_decode(self, h: np.ndarray) -> list[int]:
        session = self.session
        session.state = [(h,)]
        token = np.array([2])
        out = []
        for _ in range(MAX_STEPS):
            token = session.step(token).argmax(axis=1)
            if token[0] == 3:
                break
            out.append(int(token[0]))
        return out

    def reference_word(self, b: int) -> list[str]:
        return self.ref.predict(self.words[b])

    def reference_decode(self, h: np.ndarray) -> list[int]:
        """The decode loop of g2p-en's predict, step for step, with its own grucell."""
        ref = self.ref
        dec = np.take(ref.dec_emb, [2], axis=0)
        out = []
        for _ in range(MAX_STEPS):
            h = ref.grucell(dec, h, ref.dec_w_ih, ref.dec_w_hh, ref.dec_b_ih, ref.dec_b_hh)
            pred = (np.matmul(h, ref.fc_w.T) + ref.fc_b).argmax()
            if pred == 3:
                break
            out.append(int(pred))
            dec = np.take(ref.dec_emb, [pred], axis=0)
        return out

    # -- a padded batch with lengths vs torch's packed GRU ---------------------------------------
    def torch_encoder(self) -> Callable[[], np.ndarray]:
        import torch

        w = {k: torch.from_numpy(v) for k, v in self.w.items()}
        emb = torch.nn.Embedding.from_pretrained(w["enc_emb"])
        gru = torch.nn.GRU(w["enc_w_ih"].shape[1], w["enc_w_hh"].shape[1], batch_first=True)
        gru.load_state_dict({"weight_ih_l0": w["enc_w_ih"], "weight_hh_l0": w["enc_w_hh"],
                             "bias_ih_l0": w["enc_b_ih"], "bias_hh_l0": w["enc_b_hh"]})
        ids, lengths = torch.from_numpy(self.batch), torch.from_numpy(self.lengths)

        def run() -> np.ndarray:
            with torch.no_grad():
                packed = torch.nn.utils.rnn.pack_padded_sequence(emb(ids), lengths, batch_first=True,
                                                                 enforce_sorted=False)
                return gru(packed)[1].numpy()

        return run

    def check(self) -> None:
        for b, word in enumerate(self.words):
            got = [self.ref.idx2p[i] for i in self.engine_word(b)]
            assert got == self.reference_word(b), word
            assert self.engine_decode(self.states[b]) == self.reference_decode(self.states[b][0]), word
        h = self.encoder.forward(self.batch, lengths=self.lengths)[1][0][0]
        np.testing.assert_allclose(h, self.torch_encoder()(), rtol=0, atol=1e-5)


class SileroVad:
    """silero_vad.onnx in lstm_engine and in onnxruntime, streaming 10 s of voice-like audio chunk by chunk."""

    def __init__(self) -> None:
        import onnxruntime as ort

        path = packages.fetch("silero-vad", "6.2.3") / "silero_vad" / "data" / "silero_vad.onnx"
        self.model = le.load(path)
        self.model.threads = 1
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        audio = packages.voice_like(10.0, 16000)
        context = np.zeros((1, 64), np.float32)
        self.chunks = []
        for start in range(0, len(audio) - 511, 512):
            x = np.concatenate([context, audio[None, start:start + 512]], axis=1)
            self.chunks.append(x)
            context = x[:, -64:]
        self.sr = np.array(16000, np.int64)

    def engine(self) -> list[float]:
        state = np.zeros((2, 1, 128), np.float32)
        out = []
        for x in self.chunks:
            result = self.model.run({"input": x, "state": state, "sr": self.sr})
            state = result["stateN"]
            out.append(result["output"].item())
        return out

    def reference(self) -> list[float]:
        state = np.zeros((2, 1, 128), np.float32)
        out = []
        for x in self.chunks:
            p, state = self.session.run(None, {"input": x, "state": state, "sr": self.sr})
            out.append(p.item())
        return out

    def check(self) -> None:
        np.testing.assert_allclose(self.engine(), self.reference(), rtol=0, atol=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="the calling thread's CPU time (default) or wall time")
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    _kernels.set_blas_threads(1)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {machine()}; torch {torch.__version__}; "
          f"kernels: {_kernels.VARIANTS[_kernels.simd_level()]}; 1 thread each; {args.clock} time; "
          f"load average {os.getloadavg()[0]:.2f}")

    vad = SileroVad()
    vad.check()
    g2p = G2pEn()
    g2p.check()
    n = len(g2p.words)
    steps = sum(len(g2p.engine_decode(h)) + 1 for h in g2p.states)
    torch_encode = g2p.torch_encoder()
    timed = {
        "silero-vad per 512-sample chunk": (vad.engine, vad.reference, "onnxruntime", len(vad.chunks)),
        "g2p-en per word (encode + decode)": (
            lambda: [g2p.engine_word(b) for b in range(n)], lambda: [g2p.reference_word(b) for b in range(n)],
            "g2p-en NumPy", n),
        "g2p-en per decode step": (
            lambda: [g2p.engine_decode(h) for h in g2p.states],
            lambda: [g2p.reference_decode(h[0]) for h in g2p.states], "g2p-en NumPy", steps),
        f"g2p-en encode {n} words, padded + lengths": (
            lambda: g2p.encoder.forward(g2p.batch, lengths=g2p.lengths), torch_encode, "torch packed GRU", 1),
    }
    print(f"\n{'workload':44} {'lstm_engine':>12} {'reference':>12}  ratio  reference is")
    for name, (engine, reference, who, per) in timed.items():
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(args.rounds):
            _time_into(engine, ours, clock)
            _time_into(reference, theirs, clock)
        a, b = statistics.median(ours) / per * 1e6, statistics.median(theirs) / per * 1e6
        print(f"{name:44} {a:10.1f}us {b:10.1f}us  {a / b:5.2f}  {who}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
