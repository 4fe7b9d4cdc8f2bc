"""lstm_engine.dask on a real local cluster: two worker processes, results bit for bit those of one-process
forward on the same batches, a worker killed mid-job, and `lstm-engine run --dask`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import lstm_engine as le

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
led = pytest.importorskip("lstm_engine.dask")

pytestmark = pytest.mark.timeout(240)

BATCH = 16


def lstm_model(dtype=np.float32):
    rng = np.random.default_rng(7)
    r = rng.standard_normal
    return le.Model([
        le.LSTM(r((2, 64, 6)) * 0.3, r((2, 64, 16)) * 0.3, r((2, 64)), r((2, 64)), dtype=dtype),
        le.GRU(r((2, 30, 32)) * 0.3, r((2, 30, 10)) * 0.3, r((2, 30)), r((2, 30)), dtype=dtype),
        le.Dense(r((3, 20)), r(3), dtype=dtype),
    ])


def ids_model():
    rng = np.random.default_rng(8)
    r = rng.standard_normal
    return le.Model([le.Embedding(r((50, 6))), le.LSTM(r((48, 6)), r((48, 12)), r(48), r(48),
                                                        return_sequences=False)])


def listening_addresses() -> set:
    """(address, process name, pid) of every TCP socket this process and the processes it started listen on."""
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    found = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, proc.name(), proc.pid) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def batched_forward(model, x, lengths=None, batch=BATCH):
    return np.concatenate([model.forward(x[i:i + batch], None if lengths is None else lengths[i:i + batch])[0]
                           for i in range(0, len(x), batch)])


def make_data(tmp_path_factory, batch: int, seed: int) -> tuple:
    """(x (batch, 12, 6), lengths, path of lstm_model() saved)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 12, 6)).astype(np.float32)
    lengths = rng.integers(1, 13, batch)
    path = tmp_path_factory.mktemp("scale") / "model.safetensors"
    le.save(lstm_model(), path)
    return x, lengths, str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory, 100, seed=0)


# -- graph building: no cluster needed ------------------------------------------------------------

def test_result_is_lazy_with_the_right_chunks_dtype_and_meta(data):
    x, lengths, path = data
    y = led.forward(da.from_array(x, chunks=(BATCH, 4, 6)), path, lengths=lengths)
    assert y.shape == (100, 12, 3) and y.dtype == np.float32
    assert y.chunks == ((16,) * 6 + (4,), (12,), (3,))
    assert type(y._meta) is np.ndarray and y._meta.dtype == np.float32 and y._meta.ndim == 3
    final = led.forward(np.random.default_rng(1).integers(0, 50, (30, 9)), ids_model(), batch_size=8)
    assert final.shape == (30, 12) and final.chunks == ((8, 8, 8, 6), (12,)) and final.dtype == np.float32


def test_local_scheduler_matches_forward(data):
    x, lengths, path = data
    y = led.forward(x, path, lengths=lengths, batch_size=BATCH).compute(scheduler="threads")
    assert np.array_equal(y, batched_forward(lstm_model(), x, lengths))
    ids = np.random.default_rng(1).integers(0, 50, (30, 9))
    got = led.forward(da.from_array(ids, chunks=8), ids_model()).compute(scheduler="sync")
    assert np.array_equal(got, batched_forward(ids_model(), ids, batch=8))


def test_a_graph_model(data):
    torch = pytest.importorskip("torch")
    from test_graph import lstm_head_graph

    torch.manual_seed(0)
    model = le.Model(lstm_head_graph(torch.nn.LSTM(6, 8, batch_first=True), torch.nn.Linear(8, 3)))
    x = data[0][:40]
    y = led.forward(x, model, batch_size=BATCH)
    assert y.shape == (40, 3) and y.chunks == ((16, 16, 8), (3,))
    assert np.array_equal(y.compute(scheduler="sync"), batched_forward(model, x))


def test_bad_input_is_refused_before_anything_runs(data):
    x, lengths, path = data
    with pytest.raises(ValueError, match=r"\(batch, steps, 6\)"):
        led.forward(x[:, :, :5], path)
    with pytest.raises(TypeError, match="dtype"):
        led.forward(x.astype(np.complex64), path)
    with pytest.raises(ValueError, match=r"expected shape \(100,\)"):
        led.forward(x, path, lengths=lengths[:50])
    with pytest.raises(TypeError, match="integers"):
        led.forward(x, path, lengths=lengths.astype(float))
    with pytest.raises(ValueError, match="token ids"):
        led.forward(x, ids_model())
    with pytest.raises(TypeError, match="Model or a model file path"):
        led.forward(x, 42)
    with pytest.raises(ValueError, match="threads"):
        led.forward(x, path, threads=0)
    with pytest.raises(ValueError, match="lengths"):
        led.forward(x, path, lengths=np.full(100, 13)).compute(scheduler="sync")


# -- a real cluster ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None, worker_dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.mark.cluster
def test_the_cluster_listens_on_loopback_only(client):
    listening = listening_addresses()
    assert len({pid for _, _, pid in listening}) >= 3  # the scheduler here, and each worker's process
    assert {ip for ip, _, _ in listening} <= LOOPBACK, listening


@pytest.mark.cluster
def test_cluster_results_are_bit_identical(client, data):
    x, lengths, path = data
    want = batched_forward(lstm_model(), x, lengths)
    xd = da.from_array(x, chunks=(BATCH, 12, 6))
    with distributed.get_task_stream(client) as tasks:
        from_path = client.compute(led.forward(xd, path, lengths=da.from_array(lengths, chunks=BATCH)))
        from_model = client.compute(led.forward(xd, lstm_model(), lengths=lengths))
        assert np.array_equal(from_path.result(timeout=120), want)
        assert np.array_equal(from_model.result(timeout=120), want)
    assert len({t["worker"] for t in tasks.data if "run_block" in t["key"][0]}) == 2  # both workers took part


@pytest.mark.cluster
@pytest.mark.parametrize("fmt", ["int8", "float16", "bfloat16"])
def test_quantized_models_on_the_cluster_are_bit_identical(client, data, tmp_path, fmt):
    x, lengths, _ = data
    model = le.quantize(lstm_model(), fmt)
    path = str(tmp_path / f"{fmt}.safetensors")
    le.save(model, path)
    want = batched_forward(model, x, lengths)
    xd = da.from_array(x, chunks=(BATCH, 12, 6))
    from_path = client.compute(led.forward(xd, path, lengths=lengths))
    from_model = client.compute(led.forward(xd, model, lengths=lengths))
    assert np.array_equal(from_path.result(timeout=120), want)
    assert np.array_equal(from_model.result(timeout=120), want)


@pytest.mark.cluster
def test_graph_models_on_the_cluster_are_bit_identical(client, data):
    torch = pytest.importorskip("torch")
    from test_graph import lstm_head_graph

    torch.manual_seed(0)
    model = le.Model(lstm_head_graph(torch.nn.LSTM(6, 8, batch_first=True), torch.nn.Linear(8, 3)))
    x = data[0]
    for m in (model, le.quantize(model, "int8")):
        y = client.compute(led.forward(x, m, batch_size=BATCH)).result(timeout=120)
        assert np.array_equal(y, batched_forward(m, x))


@pytest.mark.cluster
def test_workers_use_their_share_of_the_cores(client, data):
    _, _, path = data

    def threads_here(path):
        from lstm_engine._scale import worker_model
        from lstm_engine.dask import _concurrent_tasks

        return worker_model(path, None, _concurrent_tasks()).threads, os.environ.get("OMP_NUM_THREADS")

    # two single-threaded workers on this machine: one core each, as the nanny's OMP_NUM_THREADS says
    assert set(client.run(threads_here, path).values()) == {(1, "1")}
    assert client.submit(threads_here, path, pure=False).result(timeout=60)[0] == 1


@pytest.mark.cluster
def test_dataframe_column_of_sequences(client, data):
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    x, lengths, path = data
    frame = pd.DataFrame({"id": np.arange(40), "x": [x[i, :lengths[i]] for i in range(40)]})
    with pytest.raises(TypeError, match="convert-string"):
        led.map_partitions(dd.from_pandas(frame, npartitions=4), path, column="x")
    with dask.config.set({"dataframe.convert-string": False}):
        df = dd.from_pandas(frame, npartitions=4)
    with pytest.raises(ValueError, match="no_such"):
        led.map_partitions(df, path, column="no_such")
    scored = led.map_partitions(df, path, column="x", output="y")
    assert list(scored._meta.columns) == ["id", "x", "y"]
    got = scored.compute().sort_values("id")
    model = lstm_model()
    for part in range(4):  # each partition is one batch padded to its longest sequence
        rows = slice(10 * part, 10 * part + 10)
        steps = lengths[rows]
        padded = np.zeros((10, steps.max(), 6), np.float32)
        for i, s in enumerate(steps):
            padded[i, :s] = x[10 * part + i, :s]
        want = model.forward(padded, steps)[0]
        for i, s in enumerate(steps):
            assert np.array_equal(got["y"].iloc[10 * part + i], want[i, :s])


def _kill_worker_once(block: np.ndarray, marker: str) -> np.ndarray:
    """Identity, except that the first worker to run it dies (SIGKILL), as a crashed machine would."""
    if block.size == 0:
        return block
    try:
        distributed.get_worker()
    except ValueError:  # not in a worker: never kill the test itself
        return block
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return block
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    return block


@pytest.mark.cluster
def test_a_worker_killed_mid_job_still_gives_the_whole_result(client, data, tmp_path):
    x, lengths, path = data
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    try:
        xd = da.from_array(x, chunks=(BATCH, 12, 6))
        # the first block to run kills its worker: its chunks, finished or not, are lost and rescheduled
        xd = xd.map_blocks(_kill_worker_once, str(tmp_path / "killed"), dtype=x.dtype,
                           meta=np.empty((0, 0, 0), x.dtype))
        y = client.compute(led.forward(xd, path, lengths=lengths)).result(timeout=180)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "killed").exists()
    assert np.array_equal(y, batched_forward(lstm_model(), x, lengths))
    client.wait_for_workers(2, timeout=60)


def run_on_cluster(tmp_path, data, *where: str) -> tuple:
    """`lstm-engine run` of data's model on its sequences with --state-out: (output, states, stdout+stderr)."""
    x, lengths, path = data
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "lengths.npy", lengths)
    out = subprocess.run([sys.executable, "-m", "lstm_engine.cli", "run", path, tmp_path / "x.npy", "--lengths",
                          tmp_path / "lengths.npy", "--batch-size", str(BATCH), "-o", tmp_path / "y.npy",
                          "--state-out", tmp_path / "s.npz", *where], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return np.load(tmp_path / "y.npy"), np.load(tmp_path / "s.npz"), out.stdout + out.stderr


def assert_like_one_process(data, y, states) -> None:
    x, lengths, _ = data
    model = lstm_model()
    assert np.array_equal(y, batched_forward(model, x, lengths))
    h = np.concatenate([model.forward(x[i:i + BATCH], lengths[i:i + BATCH])[1][1][0]
                        for i in range(0, len(x), BATCH)], axis=1)
    assert np.array_equal(states["layer1_h"], h)


@pytest.mark.cluster
def test_cli_run_on_dask(tmp_path, data):
    y, states, printed = run_on_cluster(tmp_path, data, "--dask", "local:2")
    assert "on Dask local:2" in printed
    assert "100/100 sequences" in printed  # the progress bar
    assert_like_one_process(data, y, states)
