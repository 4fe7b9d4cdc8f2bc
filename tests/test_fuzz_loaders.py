"""Fuzzing every loader through ``le.load``: mutated and truncated real files, and random bytes.

The real files are made during the run: torch.save (zip and legacy) and safetensors state_dicts, a pickle of NumPy
arrays, le.save models, Keras 3 ``.keras`` archives and legacy ``.h5`` files. Each case is a seeded mutation of one of them — bit flips, overwritten integers,
truncation, cut or repeated chunks, and format-aware edits that keep the container valid so the damage reaches the
parser behind it (pickle opcodes of ``data.pkl``, JSON of safetensors headers, Keras configs and the engine's
architecture metadata, HDF5 datasets and attributes) — or random bytes, with and without a format's magic number.

Cases run in batches in worker subprocesses (tests/_fuzz_worker.py): a segfault shows as the worker's exit status
and a hang as a passed deadline, without taking pytest down, and the worker restarts after the case that killed
it. Every case must end in a model that loads and runs, or a LoadError naming the file; never a crash, a hang, an
exception of another type, or an allocation the file does not justify (the worker caps its address space, and a
MemoryError behind an error counts as a failure).
"""
from __future__ import annotations

import copy
import io
import json
import os
import pickle
import pickletools
import random
import select
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import lstm_engine as le

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")
safetensors_torch = pytest.importorskip("safetensors.torch")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fuzz_worker.py")
HEADROOM = 1 << 30  # address space a worker may use beyond its imports: far above any case here
CASE_DEADLINE = 30.0  # seconds one case may take before it counts as a hang
SEED = 20240611


# ----------------------------------------------------------------------------------------------------------
# The worker pool


def _run_batch(cases: list[tuple[str, str]], deadline: float, worker: str = WORKER) -> dict[str, dict]:
    """Run (case_id, path) pairs through worker processes, restarting after a crash or a hang."""
    results: dict[str, dict] = {}
    pending = list(cases)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    while pending:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, env=env)
            proc.stdin.write(json.dumps({"cases": pending, "headroom": HEADROOM}).encode())
            proc.stdin.close()
            current, started, buf = None, time.monotonic(), b""
            fd = proc.stdout.fileno()
            hung = False
            while True:
                wait = CASE_DEADLINE * 4 if current is None else deadline - (time.monotonic() - started)
                ready, _, _ = select.select([fd], [], [], max(wait, 0))
                if not ready:
                    hung = True
                    proc.kill()
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.startswith(b"start "):
                        current, started = line[6:].decode(), time.monotonic()
                    else:
                        result = json.loads(line)
                        results[result["id"]] = result
                        current = None
            status = proc.wait()
            err.seek(0)
            stderr = err.read().decode(errors="replace")[-2000:]
        done = {case_id for case_id, _ in pending if case_id in results}
        if current is not None:
            outcome = "hang" if hung else "crash"
            results[current] = {"id": current, "outcome": outcome,
                                "detail": f"exit status {status}; stderr: {stderr}", "peak_growth": 0}
            done.add(current)
        elif len(done) < len(pending):
            raise RuntimeError(f"fuzz worker stopped between cases (status {status}): {stderr}")
        pending = [case for case in pending if case[0] not in done]
    return results


def run_cases(cases: list[tuple[str, str]], deadline: float = CASE_DEADLINE) -> dict[str, dict]:
    """Every case's result, the cases split between two workers (this machine has two cores)."""
    halves = [cases[0::2], cases[1::2]]
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda part: _run_batch(part, deadline), halves))
    return {**parts[0], **parts[1]}


# ----------------------------------------------------------------------------------------------------------
# Real files, made by the frameworks and by le.save


def _seeded(module):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module.eval()


def _keras_models():
    from keras import layers as L

    seq = keras.Sequential([keras.Input((None, 3)), L.Masking(0.0), L.LSTM(4, return_sequences=True),
                            L.LayerNormalization(), L.Dense(2)])
    inp = keras.Input((5,), dtype="int32")
    x = L.Embedding(10, 3, mask_zero=True)(inp)
    x = L.Bidirectional(L.GRU(4))(x)
    functional = keras.Model(inp, L.Dense(2, activation="softmax")(x))
    rng = np.random.default_rng(5)
    for model in (seq, functional):
        for layer in model.layers:
            layer.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in layer.get_weights()])
    return seq, functional


def _graph_model(rng):
    """A graph model (format version 2): an LSTM read at its last step, glue ops, an If on a run-time flag."""
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    lstm = le.LSTM(r(16, 3), r(16, 4), r(16), r(16))
    then_g = le.Graph([], ["o"], [le.Node("Mul", ["y", "half"], ["o"], {}, "scale")], {"half": np.array(0.5, "f4")})
    else_g = le.Graph([], ["o"], [le.Node("Softmax", ["y"], ["o"], {"axis": -1}, "softmax")])
    nodes = [le.Node("Recurrent", ["x"], ["out", "h", "c"], {"layer": 0}, "lstm"),
             le.Node("Gather", ["out", "last"], ["lo"], {"axis": 1}, "last"),
             le.Node("LayerNormalization", ["lo", "g", "b4"], ["n"], {"epsilon": 1e-5}, "norm"),
             le.Node("Gemm", ["n", "w", "b"], ["y"], {"transB": 1}, "fc"),
             le.Node("If", ["flag"], ["z"], {"then_branch": then_g, "else_branch": else_g}, "if"),
             le.Node("Reshape", ["c"], ["cf"], {"shape": [-1, 4]}, "flat"),
             le.Node("Concat", ["z", "cf"], ["zc"], {"axis": 1}, "cat")]
    g = le.Graph([le.ValueInfo("x", "float", ["batch", "steps", 3]), le.ValueInfo("flag", "bool", [])],
                 ["zc", "h"], nodes, {"last": np.array(-1, np.int64), "g": r(4), "b4": r(4), "w": r(2, 4),
                                      "b": r(2)}, [lstm], output_structure=(0, 1))
    return le.Model(g)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{name: path} of real model files of every format lstm_engine loads."""
    root = tmp_path_factory.mktemp("fuzz_sources")
    out = {}
    torch.save(_seeded(torch.nn.LSTM(3, 4, num_layers=2)).state_dict(), root / "lstm.pt")
    torch.save(_seeded(torch.nn.GRU(3, 4, bidirectional=True, batch_first=True)).state_dict(), root / "gru.pt")
    safetensors_torch.save_file(_seeded(torch.nn.LSTM(3, 4, proj_size=2)).state_dict(),
                                str(root / "lstm_proj.safetensors"))
    emb, rnn, norm, head = _seeded(torch.nn.Sequential(torch.nn.Embedding(10, 3), torch.nn.LSTM(3, 4, batch_first=True),
                                                       torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)))
    chain = le.Model([le.Embedding(emb.weight), *le.from_torch(rnn).layers,
                      le.LayerNorm(norm.weight, norm.bias), le.Dense(head.weight, head.bias)])
    le.save(chain, root / "native_ids.safetensors")
    # Quantized engine files: int8 tensors with their scales, and bfloat16 bits.
    le.save(le.quantize(chain, "int8"), root / "native_int8.safetensors")
    le.save(le.quantize(chain, "bfloat16"), root / "native_bf16.safetensors")
    rng = np.random.default_rng(1)
    gru = le.GRU(rng.standard_normal((12, 3)), rng.standard_normal((12, 4)), rng.standard_normal(12),
                 rng.standard_normal(12), dtype=(np.float32, np.float64))
    bn = le.BatchNorm(rng.standard_normal(4), rng.random(4) + 0.5, dtype=(np.float32, np.float64))
    dense = le.Dense(rng.standard_normal((2, 4)), rng.standard_normal(2), activation="tanh",
                     dtype=(np.float32, np.float64))
    le.save(le.Model([le.Masking(), gru, bn, dense]), root / "native_float.safetensors")
    le.save(_graph_model(rng), root / "native_graph.safetensors")
    # A legacy (pre-zip) torch.save stream, and a pickle of NumPy arrays (as packages ship their weights).
    torch.save(_seeded(torch.nn.LSTM(3, 4, bidirectional=True)).state_dict(), root / "legacy.pth",
               _use_new_zipfile_serialization=False)
    with open(root / "gru_numpy.pkl", "wb") as f:
        pickle.dump({k: v.numpy() for k, v in _seeded(torch.nn.GRU(3, 4)).state_dict().items()}, f, protocol=2)
    seq, functional = _keras_models()
    seq.save(root / "keras_seq.keras")
    functional.save(root / "keras_ids.keras")
    seq.save(root / "keras_seq.h5")
    for name in os.listdir(root):
        out[name] = str(root / name)
    return out


# ----------------------------------------------------------------------------------------------------------
# Mutators: bytes -> bytes, driven by a random.Random


INTERESTING_INTS = [0, 1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1,
                    2**64 - 1, 10**6, 10**12, -1, -2**31, -2**63]


def flip_bits(rng, data):
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_bytes(rng, data):
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return bytes(out)


def overwrite_int(rng, data):
    width = rng.choice([1, 2, 4, 8])
    value = rng.choice(INTERESTING_INTS) % (1 << (8 * width))
    at = rng.randrange(max(len(data) - width, 1))
    raw = value.to_bytes(width, rng.choice(["little", "big"]))
    return data[:at] + raw + data[at + width:]


def truncate(rng, data):
    return data[:rng.randrange(len(data))]


def cut_chunk(rng, data):
    a = rng.randrange(len(data))
    return data[:a] + data[a + rng.randint(1, 64):]


def repeat_chunk(rng, data):
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 256))
    return data[:b] + data[a:b] * rng.randint(1, 4) + data[b:]


def insert_random(rng, data):
    a = rng.randrange(len(data) + 1)
    return data[:a] + rng.randbytes(rng.randint(1, 64)) + data[a:]


BYTE_MUTATORS = [flip_bits, set_bytes, overwrite_int, truncate, cut_chunk, repeat_chunk, insert_random]


def byte_mutation(rng, data):
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not data:
            break
        data = rng.choice(BYTE_MUTATORS)(rng, data)
    return data


# -- zip archives: rebuild with valid CRCs so the damage reaches what is inside ---------------------------


def zip_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def make_zip(members):
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        for name, content in members:
            zf.writestr(name, content)
    return buf.getvalue()


def zip_member_mutation(rng, data, weights, mutate):
    """Mutate one member (picked by ``weights(name)``) with ``mutate(rng, name, bytes)``, or rename/drop/add one."""
    members = zip_members(data)
    kind = rng.random()
    if kind < 0.06:
        del members[rng.randrange(len(members))]
    elif kind < 0.10:
        i = rng.randrange(len(members))
        members.append((members[i][0] if rng.random() < 0.5 else members[i][0] + "x", members[i][1]))
    elif kind < 0.14:
        i = rng.randrange(len(members))
        name = members[i][0]
        members[i] = (rng.choice([name.upper(), "x/" + name, name.split("/")[-1], "../" + name]), members[i][1])
    else:
        i = rng.choices(range(len(members)), [weights(n) for n, _ in members])[0]
        name, content = members[i]
        members[i] = (name, mutate(rng, name, content))
    return make_zip(members)


# -- pickles: edit opcodes, keeping the stream parseable up to the edit ------------------------------------


GLOBALS = ["torch FloatStorage", "torch HalfStorage", "torch BFloat16Storage", "torch LongStorage",
           "torch BoolStorage", "torch ComplexFloatStorage", "torch UntypedStorage", "torch float8_e4m3fn",
           "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3", "torch._utils _rebuild_parameter",
           "collections OrderedDict", "builtins set", "_codecs encode", "torch Size", "builtins eval",
           "os system", "torch.nn.modules.rnn LSTM", "__torch__.M forward", "torch.storage _load_from_bytes",
           "numpy.core.multiarray _reconstruct", "numpy dtype", "numpy ndarray", "numpy.core.multiarray scalar",
           "copy_reg _reconstructor", "__builtin__ object", "madmom.ml.nn.layers LSTMLayer"]
STRINGS = ["", "0", "1", "storage", "cpu", "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "weight_hr_l0",
           "weight_ih_l0_reverse", "weight_ih_l7", "x" * 5000, "../data/0", "a/b", "\u00e9\u4e2d"]


def _encode_int(value):
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + value.to_bytes(2, "little")
    if -2**31 <= value < 2**31:
        return b"J" + value.to_bytes(4, "little", signed=True)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _encode_str(text):
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + len(raw).to_bytes(4, "little") + raw


def pickle_mutation(rng, data):
    try:
        ops = list(pickletools.genops(data))
    except Exception:  # noqa: BLE001 - already broken: fall back to bytes
        return byte_mutation(rng, data)
    spans = [(op, arg, pos, ops[k + 1][2] if k + 1 < len(ops) else len(data)) for k, (op, arg, pos) in enumerate(ops)]
    kind = rng.random()
    ints = [s for s in spans if isinstance(s[1], int) and s[0].name in ("BININT", "BININT1", "BININT2", "LONG1")]
    strs = [s for s in spans if isinstance(s[1], str) and s[0].name in ("BINUNICODE", "SHORT_BINUNICODE",
                                                                        "BINSTRING", "SHORT_BINSTRING")]
    globs = [s for s in spans if s[0].name == "GLOBAL"]
    if kind < 0.45 and ints:
        _, arg, a, b = rng.choice(ints)
        value = rng.choice(INTERESTING_INTS + [arg + 1, arg - 1, arg * 2, arg * 10**6])
        return data[:a] + _encode_int(value) + data[b:]
    if kind < 0.6 and strs:
        _, _, a, b = rng.choice(strs)
        return data[:a] + _encode_str(rng.choice(STRINGS + [s[1] for s in strs])) + data[b:]
    if kind < 0.7 and globs:
        _, _, a, b = rng.choice(globs)
        module, name = rng.choice(GLOBALS).split(" ")
        return data[:a] + b"c" + module.encode() + b"\n" + name.encode() + b"\n" + data[b:]
    _, _, a, b = rng.choice(spans[1:-1] or spans)
    if kind < 0.8:
        return data[:a] + data[b:]
    if kind < 0.9:
        return data[:b] + data[a:b] * rng.randint(1, 3) + data[b:]
    _, _, c, d = rng.choice(spans[1:-1] or spans)
    if b <= c:
        return data[:a] + data[c:d] + data[b:c] + data[a:b] + data[d:]
    return data[:a] + data[b:]


# -- JSON: replace, drop, copy or deepen one node -----------------------------------------------------------

_DEEP = "__deeply_nested__"
INTERESTING_JSON = [None, True, False, 0, -1, 1, 2, 3, 10**12, 2**64, -10**12, 0.5, 1e308, "", "x", "float64",
                    "float16", "F32", "BF16", "F8_E4M3", "I64", "BOOL", "LSTM", "GRU", "Embedding", "Model",
                    "Functional", "Sequential", "relu", "nope", [], {}, [10**6, 10**6], [0], [-1], [1, 2, 3],
                    {"class_name": "Lambda", "config": {}}, 10**400, -10**400, float("nan"), float("inf"), _DEEP]


def _json_nodes(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_nodes(v, path + (i,))


def _at(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def json_mutation(rng, obj):
    """A mutated deep copy of a JSON value, as text (deep nesting is spliced in as text)."""
    obj = copy.deepcopy(obj)
    nodes = list(_json_nodes(obj))
    path = rng.choice(nodes[1:] or nodes)
    kind = rng.random()
    if not path:
        obj = rng.choice(INTERESTING_JSON)
    else:
        parent, key = _at(obj, path[:-1]), path[-1]
        if kind < 0.6:
            parent[key] = rng.choice(INTERESTING_JSON)
        elif kind < 0.75:
            del parent[key]
        elif kind < 0.9:
            parent[key] = copy.deepcopy(_at(obj, rng.choice(nodes)))
        elif isinstance(parent, dict):
            parent[key + "_" if isinstance(key, str) else key] = parent.pop(key)
        else:
            parent.insert(key, copy.deepcopy(parent[key]))
    text = json.dumps(obj)
    return text.replace(json.dumps(_DEEP), "[" * 100_000 + "]" * 100_000)


# -- safetensors: header JSON (and the engine's architecture JSON inside it) -------------------------------


def safetensors_mutation(rng, data):
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    meta = header.get("__metadata__", {})
    kind = rng.random()
    if kind < 0.3 and meta.get("architecture"):
        key = rng.choice(["architecture", "architecture", "metadata", "dtypes"]
                         + ["graph", "graph", "graph"] * ("graph" in meta))
        try:
            inner = json.loads(meta.get(key, "null"))
        except ValueError:
            inner = None
        meta[key] = json_mutation(rng, inner)
        text = json.dumps(header)
    elif kind < 0.8:
        text = json_mutation(rng, header)
    else:
        return data[:8 + n] + byte_mutation(rng, body) if body else byte_mutation(rng, data)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


# -- HDF5: rewrite datasets and attributes with h5py, so the file stays a valid HDF5 file ------------------


def _h5_items(f):
    found = []
    f.visititems(lambda name, obj: found.append(name))
    return found


def _h5_dataset_value(rng, old):
    choice = rng.randrange(7)
    if choice == 0:
        return np.zeros([rng.randint(0, 3) for _ in range(rng.randint(0, 3))], np.float32)
    if choice == 1:
        return old.astype(rng.choice([np.int32, np.float16, np.float64, np.complex64, np.bool_, "S3"]))
    if choice == 2:
        return old.reshape(-1) if old.ndim != 1 else old.reshape(1, -1)
    if choice == 3:
        return np.full(old.shape, rng.choice([np.nan, np.inf, -np.inf, 1e30]), old.dtype)
    if choice == 4:
        return np.concatenate([old, old], axis=0) if old.ndim else old
    if choice == 5:
        return old.T.copy()
    return None  # a dataset that claims 10**12 elements and stores none


def h5_mutation(rng, data):
    """Replace one dataset, or rewrite or delete one attribute, of an HDF5 image (bytes -> bytes)."""
    bio = io.BytesIO(data)
    with h5py.File(bio, "r+") as f:
        names = _h5_items(f)
        datasets = [n for n in names if isinstance(f[n], h5py.Dataset)]
        holders = [f] + [f[n] for n in names]
        with_attrs = [(obj, key) for obj in holders for key in obj.attrs]
        if rng.random() < 0.5 and datasets:
            name = rng.choice(datasets)
            old = np.asarray(f[name][()])
            del f[name]
            value = _h5_dataset_value(rng, old)
            if value is None:
                f.create_dataset(name, shape=(10**6, 10**6), dtype="f4", chunks=(1, 1024))
            else:
                f.create_dataset(name, data=value)
        elif with_attrs:
            obj, key = rng.choice(with_attrs)
            value = obj.attrs[key]
            if isinstance(value, (str, bytes)) and str(value if isinstance(value, str) else value.decode(
                    errors="replace")).lstrip().startswith("{"):
                text = value if isinstance(value, str) else value.decode()
                obj.attrs[key] = json_mutation(rng, json.loads(text))
            elif rng.random() < 0.3:
                del obj.attrs[key]
            else:
                obj.attrs[key] = rng.choice([np.array([b"x", b"lstm"]), np.array([], dtype="S1"), 7,
                                             np.array([b"nope:0"] * 3), "x" * 300, np.arange(4)])
        elif names:
            del f[rng.choice(names)]
    return bio.getvalue()


# -- per format ----------------------------------------------------------------------------------------------


def legacy_mutation(rng, data):
    """A mutation of one of a legacy torch.save stream's pickles (mostly the object's), or of its storage data."""
    stream = io.BytesIO(data)
    bounds = []
    for _ in range(5):
        start = stream.tell()
        for _ in pickletools.genops(stream):
            pass
        bounds.append((start, stream.tell()))
    if rng.random() < 0.2:
        return byte_mutation(rng, data)
    a, b = rng.choice(bounds[1:] + [bounds[3]] * 3)
    return data[:a] + pickle_mutation(rng, data[a:b]) + data[b:]


def structured_mutation(rng, name, data):
    """A format-aware mutation of the source file ``name``."""
    if name.endswith(".pth"):
        return legacy_mutation(rng, data)
    if name.endswith(".pkl"):
        return pickle_mutation(rng, data)
    if name.endswith(".pt"):
        return zip_member_mutation(rng, data, lambda n: 20 if n.endswith("data.pkl") else 1,
                                   lambda r, n, c: pickle_mutation(r, c) if n.endswith("data.pkl")
                                   else byte_mutation(r, c) if c else c + b"x")
    if name.endswith(".safetensors"):
        return safetensors_mutation(rng, data)
    if name.endswith(".keras"):
        def member(r, n, c):
            if n.endswith(".json"):
                return json_mutation(r, json.loads(c)).encode() if r.random() < 0.8 else byte_mutation(r, c)
            return h5_mutation(r, c) if r.random() < 0.6 else byte_mutation(r, c)

        return zip_member_mutation(rng, data, lambda n: {"config.json": 5, "model.weights.h5": 5}.get(n, 1), member)
    if name.endswith(".h5"):
        return h5_mutation(rng, data)
    if name.endswith(".onnx"):
        from test_fuzz_onnx import proto_mutation  # ONNX's sources and mutations live with its fuzz test

        return proto_mutation(rng, data)
    raise ValueError(name)


MAGICS = [b"", b"PK\x03\x04", b"\x89HDF\r\n\x1a\n", (100).to_bytes(8, "little") + b"{",
          b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")]


def random_file(rng):
    return rng.choice(MAGICS) + rng.randbytes(rng.choice([0, 1, 7, 64, 512, 4096]))


def make_cases(sources, root, per_source, random_files, seed=SEED):
    """Write the fuzz cases under ``root``: [(case_id, path)], the originals first."""
    cases = [(f"original:{name}", path) for name, path in sorted(sources.items())]
    rng = random.Random(seed)
    n = 0
    for name, path in sorted(sources.items()):
        with open(path, "rb") as f:
            original = f.read()
        for k in range(per_source):
            strategy = "structured" if k % 2 else "bytes"
            try:
                data = (structured_mutation(rng, name, original) if strategy == "structured"
                        else byte_mutation(rng, original))
            except Exception as exc:  # noqa: BLE001 - a mutator that cannot apply falls back to bytes
                strategy = f"bytes({type(exc).__name__})"
                data = byte_mutation(rng, original)
            case = os.path.join(root, f"{n}{os.path.splitext(name)[1]}")
            with open(case, "wb") as f:
                f.write(data)
            cases.append((f"{name}:{strategy}:{n}", case))
            n += 1
    for _ in range(random_files):
        case = os.path.join(root, f"{n}.bin")
        with open(case, "wb") as f:
            f.write(random_file(rng))
        cases.append((f"random:{n}", case))
        n += 1
    return cases


FAILURES = ("crash", "hang", "other", "unnamed", "alloc", "forward", "wrong")


def check(results, cases):
    outcomes = Counter(r["outcome"] for r in results.values())
    print(f"\nloader fuzzing: {len(cases)} cases: {dict(outcomes)}")
    assert len(results) == len(cases)
    for case_id, _ in cases:
        if case_id.startswith("original:"):
            assert results[case_id]["outcome"] == "loaded", results[case_id]
    bad = [(case_id, results[case_id]) for case_id, _ in cases if results[case_id]["outcome"] in FAILURES]
    assert not bad, "\n".join(f"{cid}: {r['outcome']}: {r['detail']}" for cid, r in bad[:20])
    # The mutations reach past the first check: both outcomes occur for every source.
    assert outcomes["load_error"] > len(cases) // 4 and outcomes["loaded"] > len(cases) // 50


def test_fuzz_loaders(sources, tmp_path):
    cases = make_cases(sources, str(tmp_path), per_source=220, random_files=200)
    check(run_cases(cases), cases)


@pytest.mark.slow
def test_fuzz_loaders_long(sources, tmp_path):
    cases = make_cases(sources, str(tmp_path), per_source=4000, random_files=4000, seed=SEED + 1)
    check(run_cases(cases), cases)


def test_harness_sees_crashes_and_hangs(tmp_path):
    """A worker killed by a signal or stuck in a case is reported for that case, and the batch goes on."""
    crash = tmp_path / "crash.py"
    crash.write_text("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)\n")
    hang = tmp_path / "hang.py"
    hang.write_text("import time; time.sleep(60)\n")
    good = tmp_path / "good.py"
    good.write_text("pass\n")
    # A stand-in worker that runs each case file as code, with the real worker's protocol.
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import json, sys, runpy\n"
        "job = json.loads(sys.stdin.read())\n"
        "for cid, path in job['cases']:\n"
        "    print('start', cid, flush=True)\n"
        "    runpy.run_path(path)\n"
        "    print(json.dumps({'id': cid, 'outcome': 'loaded', 'detail': '', 'peak_growth': 0}), flush=True)\n")
    results = _run_batch([("a", str(good)), ("b", str(crash)), ("c", str(good)), ("d", str(hang)),
                          ("e", str(good))], deadline=3.0, worker=str(runner))
    assert {k: r["outcome"] for k, r in results.items()} == {
        "a": "loaded", "b": "crash", "c": "loaded", "d": "hang", "e": "loaded"}
    assert "-11" in results["b"]["detail"]


# ----------------------------------------------------------------------------------------------------------
# Headers that claim 10**12 elements: refused before anything that size is allocated


def _safetensors_bytes(header, body):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


class _Storage:
    """Pickles as the persistent id torch.save writes for a FloatStorage of ``numel`` elements in data/0."""

    def __init__(self, numel):
        self.numel = numel


class _Rebuild:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())."""

    def __init__(self, numel, size, stride):
        self.args = (_Storage(numel), 0, size, stride, False, {})

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) if isinstance(obj, _Storage) else None


def _huge_torch_zip(size, stride, numel, record_bytes):
    """A torch.save-style zip whose one tensor claims ``size`` over a storage of ``numel`` floats."""
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump({"weight_ih_l0": _Rebuild(numel, size, stride)})
    return make_zip([("archive/data.pkl", buf.getvalue()), ("archive/byteorder", b"little"),
                     ("archive/data/0", b"\x00" * record_bytes), ("archive/version", b"3\n")])


def _huge_h5(path, source):
    """The Keras .h5 ``source`` with its first kernel replaced by a (10**6, 10**6) dataset storing nothing."""
    with open(source, "rb") as f:
        data = f.read()
    bio = io.BytesIO(data)
    with h5py.File(bio, "r+") as f:
        names = _h5_items(f)
        kernel = next(n for n in names if n.rsplit("/", 1)[-1] in ("kernel", "kernel:0", "0")
                      and isinstance(f[n], h5py.Dataset))
        del f[kernel]
        f.create_dataset(kernel, shape=(10**6, 10**6), dtype="f4", chunks=(1, 1024))
    with open(path, "wb") as f:
        f.write(bio.getvalue())


def test_huge_claims_refused_before_allocating(sources, tmp_path):
    big = {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}
    files = {
        "st_offsets": _safetensors_bytes({"w": big}, b"\x00" * 16),
        "st_mismatch": _safetensors_bytes({"w": dict(big, data_offsets=[0, 16])}, b"\x00" * 16),
        "st_native": _safetensors_bytes(
            {"__metadata__": {"format": "lstm_engine", "format_version": "1", "architecture": "[]"},
             "layers.0.weight": dict(big, data_offsets=[0, 16])}, b"\x00" * 16),
        "st_header_len": (10**12).to_bytes(8, "little") + b"{}",
        "pt_storage": _huge_torch_zip((10**6, 10**6), (10**6, 1), 10**12, 64),
        "pt_zero_strides": _huge_torch_zip((10**6, 10**6), (0, 0), 1, 64),
        "pt_numel_bytes": _huge_torch_zip((4,), (1,), 2**62, 64),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = str(tmp_path / f"{name}.bin")
        with open(paths[name], "wb") as f:
            f.write(data)
    paths["h5_dataset"] = str(tmp_path / "huge.h5")
    _huge_h5(paths["h5_dataset"], sources["keras_seq.h5"])
    with open(sources["keras_seq.keras"], "rb") as f:
        members = zip_members(f.read())
    h5_path = str(tmp_path / "inner.h5")
    with open(h5_path, "wb") as f:
        f.write(dict(members)["model.weights.h5"])
    _huge_h5(h5_path, h5_path)
    with open(h5_path, "rb") as f:
        inner = f.read()
    paths["keras_dataset"] = str(tmp_path / "huge.keras")
    with open(paths["keras_dataset"], "wb") as f:
        f.write(make_zip([(n, inner if n == "model.weights.h5" else c) for n, c in members]))
    # A stored member that claims 10**12 bytes: the zip's own size fields, patched in the central directory.
    bomb = bytearray(make_zip(members))
    for at in [i for i in range(len(bomb)) if bomb[i:i + 4] == b"PK\x01\x02"]:
        name_len = int.from_bytes(bomb[at + 28:at + 30], "little")
        if bomb[at + 46:at + 46 + name_len] == b"config.json":
            bomb[at + 24:at + 28] = (2**32 - 1).to_bytes(4, "little")  # uncompressed size
    paths["keras_member_size"] = str(tmp_path / "bomb.keras")
    with open(paths["keras_member_size"], "wb") as f:
        f.write(bytes(bomb))

    results = run_cases(sorted(paths.items()))
    for name, result in sorted(results.items()):
        print(f"{name}: {result['detail'][-160:]} (peak +{result['peak_growth'] >> 10} kB)")
        assert result["outcome"] == "load_error", (name, result)
        # Nothing near the claimed size was touched: the peak grew by less than 64 MB.
        assert result["peak_growth"] < 64 << 20, (name, result)


# ----------------------------------------------------------------------------------------------------------
# Failures the fuzzing found, kept as fixed cases (each was a crash of le.load's contract or a hang)


def _patch_central_directory(data, name, patch):
    """Apply ``patch(bytearray, offset)`` to the central directory entry of member ``name``."""
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        name_len = int.from_bytes(out[at + 28:at + 30], "little")
        if out[at + 46:at + 46 + name_len] == name.encode():
            patch(out, at)
        at = out.find(b"PK\x01\x02", at + 1)
    return bytes(out)


def _zero_free_space(data):
    """The HDF5 image with its global heap's free-space object set to size 0 (HDF5 then walks it forever)."""
    out = bytearray(data)
    at = out.find(b"GCOL")
    size = int.from_bytes(out[at + 8:at + 16], "little")
    p = 16
    while int.from_bytes(out[at + p:at + p + 2], "little"):
        p += 16 + (int.from_bytes(out[at + p + 8:at + p + 16], "little") + 7) // 8 * 8
    assert int.from_bytes(out[at + p + 8:at + p + 16], "little") == size - p  # the free space, found
    out[at + p + 8:at + p + 16] = bytes(8)
    return bytes(out)


def _native_with(architecture_text):
    return _safetensors_bytes({"__metadata__": {"format": "lstm_engine", "format_version": "1",
                                                "architecture": architecture_text}}, b"")


def test_fuzz_findings_refused(sources, tmp_path):
    with open(sources["lstm.pt"], "rb") as f:
        pt = f.read()
    pkl = next(n for n, _ in zip_members(pt) if n.endswith("data.pkl"))

    def version_255(buf, at):
        buf[at + 6] = 255

    def non_utf8_name(buf, at):
        buf[at + 8] |= 0x08  # general purpose flag bit 11: the name is UTF-8
        buf[at + 9] |= 0x08
        buf[at + 46] = 0xFF

    bool_weights = tmp_path / "bool.pt"
    torch.save({"weight_ih_l0": torch.zeros(8, 3, dtype=torch.bool), "weight_hh_l0": torch.zeros(8, 2)},
               bool_weights)
    mismatched = tmp_path / "mismatched.pt"
    lstm = torch.nn.LSTM(3, 4, num_layers=2).state_dict()
    lstm["weight_ih_l1"] = torch.zeros(16, 5)
    torch.save(lstm, mismatched)
    with open(sources["keras_seq.keras"], "rb") as f:
        members = zip_members(f.read())
    config = json.loads(dict(members)["config.json"])
    next(layer for layer in config["config"]["layers"]
         if layer["class_name"] == "LayerNormalization")["config"]["epsilon"] = 10**400
    with open(sources["keras_seq.h5"], "rb") as f:
        h5 = f.read()
    files = {
        "st_dtype_list": _safetensors_bytes({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
                                            bytes(4)),
        "st_dtype_dict": _safetensors_bytes({"w": {"dtype": {}, "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        "pt_zip_version": _patch_central_directory(pt, pkl, version_255),
        "pt_zip_name": _patch_central_directory(pt, pkl, non_utf8_name),
        "native_deep": _native_with("[" * 100_000 + "]" * 100_000),
        "native_class_list": _native_with('[{"class": ["LSTM"], "config": {}}]'),
        "native_class_dict": _native_with('[{"class": {}, "config": {}}]'),
        "native_eps": _native_with('[{"class": "LayerNorm", "config": {"eps": 1' + "0" * 400 + "}}]"),
        "native_size": _native_with('[{"class": "LayerNorm", "config": {"normalized_shape": Infinity}}]'),
        "keras_eps": make_zip([(n, json.dumps(config).encode() if n == "config.json" else c) for n, c in members]),
        "h5_heap": _zero_free_space(h5),
        "keras_heap": make_zip([(n, _zero_free_space(c) if n.endswith(".h5") else c) for n, c in members]),
    }
    paths = {"pt_bool": str(bool_weights), "pt_mismatched": str(mismatched)}
    for name, data in files.items():
        paths[name] = str(tmp_path / name)
        with open(paths[name], "wb") as f:
            f.write(data)
    results = run_cases(sorted(paths.items()), deadline=20.0)
    for name in paths:
        assert results[name]["outcome"] == "load_error", (name, results[name])
