"""lstm_engine.ray on a real local Ray instance (2 CPUs): the Predictor in Ray Data, threads from num_cpus,
streams (session and pool) moved between actors through save_state, and `lstm-engine run --ray`."""
from __future__ import annotations

import numpy as np
import pytest
from test_scale_dask import (BATCH, LOOPBACK, assert_like_one_process, batched_forward, ids_model,
                             listening_addresses, lstm_model, make_data, run_on_cluster)

import lstm_engine as le
from lstm_engine.ray import Predictor

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory, 64, seed=1)


# -- the Predictor in plain Python ----------------------------------------------------------------

def test_predictor_on_dict_and_pandas_batches(data):
    x, lengths, path = data
    predict = Predictor(path, lengths_column="n", threads=1)
    out = predict({"x": x[:BATCH], "n": lengths[:BATCH], "id": np.arange(BATCH)})
    assert np.array_equal(out["y"], lstm_model().forward(x[:BATCH], lengths[:BATCH])[0])
    assert np.array_equal(out["id"], np.arange(BATCH))
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"tokens": [np.array([3, 4, 5]), np.array([7]), np.array([1, 2])]})
    scored = Predictor(ids_model(), column="tokens", output_column="h")(frame)
    want = ids_model().forward(np.array([[3, 4, 5], [7, 0, 0], [1, 2, 0]]), np.array([3, 1, 2]))[0]
    assert np.array_equal(np.stack(scored["h"]), want)


def test_predictor_refuses_what_it_cannot_read(data):
    x, lengths, path = data
    predict = Predictor(path)
    with pytest.raises(ValueError, match="no column 'x'"):
        predict({"features": x})
    with pytest.raises(TypeError, match="dict of arrays or a DataFrame"):
        predict(x)
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = x[0], x[1, :5, :2]
    with pytest.raises(ValueError, match=r"sequences\[1\]: shape \(5, 2\)"):
        predict({"x": ragged})
    with pytest.raises(TypeError, match="Model or a model file path"):
        Predictor(None)


# -- a real Ray instance ---------------------------------------------------------------------------

@pytest.mark.cluster
def test_cli_run_on_ray(tmp_path, data):
    # Before the module's own Ray instance starts: the command starts (and stops) one of its own.
    y, states, printed = run_on_cluster(tmp_path, data, "--ray", "local:2")
    assert "on Ray local:2" in printed and "64/64 sequences" in printed
    assert_like_one_process(data, y, states)


@pytest.mark.cluster
@pytest.mark.slow
def test_ray_serve_example_answers_like_forward():
    # Its own Ray instance and Serve (about 30 s here), before the module's: run with -m slow.
    import os
    import socket
    import subprocess
    import sys

    pytest.importorskip("ray.serve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "ray_serve.py")
    out = subprocess.run([sys.executable, example, "--port", str(port)], capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "32 requests through the handle: answers match model.forward" in out.stdout
    assert "HTTP: " in out.stdout


@pytest.mark.cluster
def test_init_local_refuses_a_ray_that_would_listen_on_the_network(tmp_path):
    import os
    import subprocess
    import sys

    pytest.importorskip("ray")
    code = "from lstm_engine.ray import init_local\ninit_local(1)\n"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")  # as if Ray had been imported first
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "not only on 127.0.0.1" in out.stderr, out.stderr[-2000:]


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    from lstm_engine.ray import init_local

    init_local(2)
    yield ray
    ray.shutdown()


@pytest.mark.cluster
def test_the_instance_listens_on_loopback_only(ray):
    ray.get(ray.remote(lambda: 1).remote(), timeout=60)  # a worker process up too
    listening = listening_addresses()
    assert {"gcs_server", "raylet"} <= {name for _, name, _ in listening}
    assert {ip for ip, _, _ in listening} <= LOOPBACK, listening


@pytest.mark.cluster
def test_map_batches_is_bit_identical(ray, data):
    x, lengths, path = data
    rows = [{"id": i, "x": x[i], "n": lengths[i]} for i in range(64)]
    # one block per batch, so each batch holds the same rows as the one-process run's
    ds = ray.data.from_items(rows, override_num_blocks=64 // BATCH)
    scored = ds.map_batches(Predictor, fn_constructor_args=(path,), fn_constructor_kwargs={"lengths_column": "n"},
                            compute=ray.data.ActorPoolStrategy(size=2), batch_size=BATCH).take_all()
    got = np.stack([r["y"] for r in sorted(scored, key=lambda r: r["id"])])
    assert np.array_equal(got, batched_forward(lstm_model(), x, lengths))


@pytest.mark.cluster
def test_read_numpy_in_blocks_of_the_batch_size_is_bit_identical(ray, data, tmp_path):
    # The README's recipe for a .npy file: read_numpy's blocks re-cut into blocks of exactly the batch size, so
    # that each batch holds the rows the one-process run batches together. Read as they come (3 blocks: 17, 16
    # and 16 rows), the first block's 17th row would run alone, through the one-sequence path, which rounds
    # differently from a batch of 16.
    x, _, path = data
    x = x[:49]
    np.save(tmp_path / "x.npy", x)
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        ds = ray.data.read_numpy(str(tmp_path / "x.npy"), override_num_blocks=3)
        ds = ds.repartition(target_num_rows_per_block=BATCH, strict=True)
        # one actor: the instance's other CPU runs the read and repartition tasks
        scored = ds.map_batches(Predictor, fn_constructor_args=(path,), fn_constructor_kwargs={"column": "data"},
                                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_size=BATCH)
        got = np.concatenate([b["y"] for b in scored.iter_batches(batch_size=None)])
    finally:
        context.execution_options.preserve_order = ordered
    assert np.array_equal(got, batched_forward(lstm_model(), x))


@pytest.mark.cluster
def test_map_batches_with_quantized_and_graph_models(ray, data, tmp_path):
    torch = pytest.importorskip("torch")
    from test_graph import lstm_head_graph

    x, lengths, _ = data
    torch.manual_seed(0)
    graph = le.Model(lstm_head_graph(torch.nn.LSTM(6, 8, batch_first=True), torch.nn.Linear(8, 3)))
    cases = [(le.quantize(lstm_model(), fmt), "n") for fmt in ("int8", "float16", "bfloat16")]
    cases += [(graph, None), (le.quantize(graph, "int8"), None)]  # the graph takes no lengths
    rows = [{"id": i, "x": x[i], "n": lengths[i]} for i in range(64)]
    for k, (model, lengths_column) in enumerate(cases):
        path = str(tmp_path / f"{k}.safetensors")
        le.save(model, path)
        given = path if k % 2 else model  # a path each actor loads, or the Model pickled as its file
        ds = ray.data.from_items(rows, override_num_blocks=64 // BATCH)
        scored = ds.map_batches(Predictor, fn_constructor_args=(given,),
                                fn_constructor_kwargs={"lengths_column": lengths_column},
                                compute=ray.data.ActorPoolStrategy(size=2), batch_size=BATCH).take_all()
        got = np.stack([r["y"] for r in sorted(scored, key=lambda r: r["id"])])
        assert np.array_equal(got, batched_forward(model, x, lengths if lengths_column else None)), k


@pytest.mark.cluster
def test_map_batches_with_a_model_and_ragged_sequences(ray, data):
    x, lengths, _ = data
    rows = [{"id": i, "x": x[i, :lengths[i]]} for i in range(32)]
    ds = ray.data.from_items(rows, override_num_blocks=2)
    scored = ds.map_batches(Predictor, fn_constructor_args=(lstm_model(),), compute=ray.data.ActorPoolStrategy(size=2),
                            batch_size=16).take_all()
    model = lstm_model()
    for r in scored:
        alone = model.forward(r["x"][None])[0][0]
        assert r["y"].shape == (lengths[r["id"]], 3)
        np.testing.assert_allclose(r["y"], alone, rtol=1e-5, atol=1e-6)  # padded with others: same up to rounding


@pytest.mark.cluster
def test_tasks_and_actors_use_the_cpus_ray_gave_them(ray, data):
    _, _, path = data

    @ray.remote
    def predictor_threads(path):
        return Predictor(path).model.threads

    @ray.remote
    class Holder:
        def __init__(self, path):
            self.predict = Predictor(path)

        def threads(self):
            return self.predict.model.threads

    # A task or actor may run in a worker process Ray started for another num_cpus, whose OMP_NUM_THREADS
    # is stale: the Predictor asks Ray what it was given.
    for cpus in (1, 2, 1):
        assert ray.get(predictor_threads.options(num_cpus=cpus).remote(path), timeout=60) == cpus
    for cpus in (2, 1):
        actor = Holder.options(num_cpus=cpus).remote(path)
        assert ray.get(actor.threads.remote(), timeout=60) == cpus
        ray.kill(actor)


@pytest.mark.cluster
def test_a_stream_moves_between_actors(ray, data, tmp_path):
    x, _, _ = data
    r = np.random.default_rng(4).standard_normal
    model = le.Model([le.LSTM(r((64, 6)) * 0.3, r((64, 16)) * 0.3, r(64), r(64)),
                      le.GRU(r((30, 16)) * 0.3, r((30, 10)) * 0.3, r(30), r(30)), le.Dense(r((3, 10)), r(3))])
    path = str(tmp_path / "streaming.safetensors")
    le.save(model, path)

    @ray.remote(num_cpus=1)
    class Streamer:
        def __init__(self, path):
            self.session = le.load(path).session(batch_size=4)

        def feed(self, chunk):
            return self.session.feed(chunk)

        def hand_over(self):
            return self.session.save_state()

        def take_over(self, blob):
            self.session.load_state(blob)

    a, b = Streamer.remote(path), Streamer.remote(path)
    first = ray.get(a.feed.remote(x[:4, :5]), timeout=60)
    ray.get(b.take_over.remote(ray.get(a.hand_over.remote(), timeout=60)), timeout=60)
    rest = ray.get(b.feed.remote(x[:4, 5:]), timeout=60)

    stay = model.session(batch_size=4)
    assert np.array_equal(first, stay.feed(x[:4, :5]))
    assert np.array_equal(rest, stay.feed(x[:4, 5:]))

    @ray.remote(num_cpus=1)
    class PoolServer:
        """Many users' streams in one pool; a user's stream is handed to another server by its state."""

        def __init__(self, path):
            self.pool = le.load(path).pool(max_batch=8)
            self.streams = {}

        def step(self, user, xs):
            stream = self.streams.get(user) or self.streams.setdefault(user, self.pool.open())
            return np.stack([stream.step(v) for v in xs])

        def hand_over(self, user):
            stream = self.streams.pop(user)
            blob = stream.save_state()
            stream.close()
            return blob

        def take_over(self, user, blob):
            self.streams[user] = self.pool.open()
            self.streams[user].load_state(blob)

    a, b = PoolServer.remote(path), PoolServer.remote(path)
    first = ray.get(a.step.remote("u1", x[0, :5]), timeout=60)
    ray.get(b.take_over.remote("u1", a.hand_over.remote("u1")), timeout=60)
    rest = ray.get(b.step.remote("u1", x[0, 5:]), timeout=60)
    with model.pool() as pool:
        stay = pool.open()
        assert np.array_equal(np.concatenate([first, rest]), np.stack([stay.step(v) for v in x[0]]))



@pytest.mark.cluster
def test_run_on_ray_survives_an_actor_killed_mid_job(ray, data):
    import os
    import signal

    import psutil

    from lstm_engine.ray import score_chunks

    x, lengths, path = data
    batch = 4  # 16 batches: some still to come when an actor dies
    killed = []

    def command(p):
        # Ray's short-lived helpers may exit (or linger as zombies) between the listing and the read.
        try:
            return p.cmdline()[0]
        except (psutil.Error, IndexError):
            return None

    def batches():
        for lo in range(0, len(x), batch):
            if lo == 6 * batch:  # the first results are in: the actors are up and busy
                # This instance's processes are this process's children; other Ray instances on the machine are not.
                seen = [(p, command(p)) for p in psutil.Process().children(recursive=True)]
                scorers = [p for p, c in seen if c in ("ray::_Scorer", "ray::_Scorer.forward")]
                assert scorers, [c for _, c in seen]
                os.kill(scorers[0].pid, signal.SIGKILL)
                killed.append(scorers[0].pid)
            yield lo, x[lo:lo + batch], lengths[lo:lo + batch]

    results = sorted(score_chunks("auto", le.load(path), batches()), key=lambda r: r[0])
    assert killed
    assert [lo for lo, _, _ in results] == list(range(0, len(x), batch))
    model = lstm_model()
    for lo, y, state in results:
        want_y, want_state = model.forward(x[lo:lo + batch], lengths[lo:lo + batch])
        assert np.array_equal(y, want_y), lo
        assert all(np.array_equal(a, b) for got, want in zip(state, want_state) for a, b in zip(got, want)), lo
