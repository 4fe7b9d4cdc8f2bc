"""Reading Keras files without Keras: models saved by Keras 3 during the run, and hand-built tf.keras 2 files."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import io
import json
import sys
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

from keras import layers as L  # noqa: E402

from lstm_engine.errors import LoadError, UnsafeModelError  # noqa: E402
from lstm_engine.formats._keras_file import KerasMask, read_keras  # noqa: E402

FORMATS = (".keras", "h5", "weights.h5")


# ----------------------------------------------------------------------------------------------------------
# Models


def _sequential(*layers):
    """A Sequential model with its weights replaced by seeded random values, so no tensor is a default."""
    model = keras.Sequential(list(layers))
    _randomise(model)
    return model


def _randomise(model):
    """Overwrite every weight with distinct random values."""
    rng = np.random.default_rng(7)
    for layer in model.layers:
        layer.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in layer.get_weights()])


def _functional_masked():
    """Input -> Masking -> LSTM(mask=any(x != 0, axis=-1)) -> Dense: op layers that only compute a mask."""
    inp = keras.Input((6, 3), name="features")
    x = L.Masking(0.0)(inp)
    mask = keras.ops.any(keras.ops.not_equal(inp, 0.0), axis=-1)
    x = L.LSTM(4, name="encoder")(x, mask=mask)
    model = keras.Model(inp, L.Dense(2)(x))
    _randomise(model)
    return model


def _functional_ids_mask():
    """Int ids -> Embedding -> GRU(mask=ids != 0) -> Dense."""
    inp = keras.Input((6,), dtype="int32")
    x = L.Embedding(9, 3)(inp)
    x = L.GRU(4)(x, mask=keras.ops.not_equal(inp, 0))
    model = keras.Model(inp, L.Dense(2)(x))
    _randomise(model)
    return model


def _functional_chain():
    """Input -> Masking -> LSTM -> Dense as a functional model."""
    inp = keras.Input((6, 3))
    x = L.Masking(-1.0)(inp)
    x = L.LSTM(4)(x)
    model = keras.Model(inp, L.Dense(2, activation="softmax")(x))
    _randomise(model)
    return model


BUILDERS = {
    "embedding_lstm": lambda: _sequential(
        keras.Input((6,), dtype="int32"),
        L.Embedding(12, 4, mask_zero=True),
        L.LSTM(5),
        L.Dense(3, activation="softmax"),
    ),
    "stacked_gru": lambda: _sequential(
        keras.Input((6, 3)),
        L.GRU(4, reset_after=False, return_sequences=True),
        L.GRU(5, reset_after=True, return_sequences=True),
        L.GRU(2, reset_after=False, use_bias=False),
    ),
    "simple_rnn": lambda: _sequential(
        keras.Input((6, 3)), L.SimpleRNN(4, return_sequences=True), L.SimpleRNN(3, use_bias=False)
    ),
    "bidirectional": lambda: _sequential(
        keras.Input((6, 3)),
        L.Bidirectional(L.LSTM(4, return_sequences=True)),
        L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode="sum"),
        L.Bidirectional(
            L.GRU(2, return_sequences=True),
            backward_layer=L.GRU(2, return_sequences=True, go_backwards=True),
            merge_mode="ave",
        ),
        L.Bidirectional(L.LSTM(2), merge_mode="mul"),
    ),
    "masking_lstm": lambda: _sequential(keras.Input((6, 3)), L.Masking(0.5), L.LSTM(4, return_sequences=False)),
    "norms": lambda: _sequential(
        keras.Input((6, 3)),
        L.LSTM(4, return_sequences=True),
        L.LayerNormalization(),
        L.BatchNormalization(center=False),
        L.TimeDistributed(L.Dense(3)),
        L.Dropout(0.2),
        L.Activation("tanh"),
        L.LayerNormalization(scale=False),
        L.BatchNormalization(scale=False),
        L.GlobalAveragePooling1D(),
        L.Dense(2, use_bias=False),
    ),
    "functional_chain": _functional_chain,
    "functional_masked": _functional_masked,
    "functional_ids_mask": _functional_ids_mask,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each model, saved once in every format: {key: (model, {format: (path, config)})}."""
    root = tmp_path_factory.mktemp("keras")
    out = {}
    for key, build in BUILDERS.items():
        # Keras numbers auto-named layers per process; start each model afresh so the names these tests
        # expect ('lstm', 'gru_1') do not depend on which tests built models before.
        keras.backend.clear_session()
        model = build()
        files = {}
        model.save(root / f"{key}.keras")
        files[".keras"] = (root / f"{key}.keras", None)
        model.save(root / f"{key}.h5")
        files["h5"] = (root / f"{key}.h5", None)
        model.save_weights(root / f"{key}.weights.h5")
        files["weights.h5"] = (root / f"{key}.weights.h5", model.to_json())
        out[key] = (model, files)
    return out


def _expected(layer):
    """A live layer's weights under the reader's canonical names."""
    if isinstance(layer, L.Bidirectional):
        return {
            f"{side}/{v.name}": keras.ops.convert_to_numpy(v)
            for side, sub in (("forward", layer.forward_layer), ("backward", layer.backward_layer))
            for v in sub.weights
        }
    return {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights}


def _assert_matches(spec, model):
    """Order, class names, names and every tensor of the spec equal the live model's."""
    live = [layer for layer in model.layers if not isinstance(layer, L.InputLayer)]
    read = [layer for layer in spec.layers if layer.class_name != "InputLayer"]
    assert [lay.class_name for lay in read] == [type(layer).__name__ for layer in live]
    assert [lay.name for lay in read] == [layer.name for layer in live]
    for got, layer in zip(read, live):
        expected = _expected(layer)
        assert list(got.weights) == list(expected), layer.name
        for name, value in expected.items():
            assert got.weights[name].dtype == value.dtype
            np.testing.assert_array_equal(got.weights[name], value, err_msg=f"{layer.name}/{name}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", list(BUILDERS))
def test_weights_order_and_names_match_keras(saved, key, fmt):
    model, files = saved[key]
    path, config = files[fmt]
    spec = read_keras(path, config=config)
    _assert_matches(spec, model)
    assert spec.source_format == fmt
    assert spec.model_class == ("Sequential" if isinstance(model, keras.Sequential) else "Functional")
    assert spec.input_shape == tuple(model.input_shape)
    if fmt == "weights.h5":
        assert spec.keras_version is None
    else:
        assert spec.keras_version == keras.__version__
    assert spec.backend == ("torch" if fmt == "h5" else None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bidirectional_and_time_distributed_configs_are_normalised(saved, fmt):
    path, config = saved["bidirectional"][1][fmt]
    spec = read_keras(path, config=config)
    concat, summed, averaged, multiplied = spec.layers[1:]
    assert concat.config["merge_mode"] == "concat" and summed.config["merge_mode"] == "sum"
    assert averaged.config["merge_mode"] == "ave" and multiplied.config["merge_mode"] == "mul"
    assert concat.config["forward_layer"]["class_name"] == "LSTM"
    assert concat.config["forward_layer"]["config"]["go_backwards"] is False
    assert concat.config["backward_layer"]["config"]["go_backwards"] is True
    assert concat.config["backward_layer"]["config"]["zero_output_for_mask"] is True
    assert multiplied.config["forward_layer"]["config"]["zero_output_for_mask"] is False
    assert averaged.config["backward_layer"]["class_name"] == "GRU"

    path, config = saved["norms"][1][fmt]
    distributed = read_keras(path, config=config).layers[4]
    assert distributed.class_name == "TimeDistributed"
    assert distributed.config["layer"]["class_name"] == "Dense"
    assert distributed.config["layer"]["config"]["units"] == 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_mask_ops_are_folded_into_the_rnn_layer(saved, fmt):
    path, config = saved["functional_masked"][1][fmt]
    spec = read_keras(path, config=config)
    assert [lay.class_name for lay in spec.layers] == ["InputLayer", "Masking", "LSTM", "Dense"]
    mask = spec.layers[2].explicit_mask
    assert isinstance(mask, KerasMask)
    assert (mask.source, mask.value, mask.reduce_last_axis) == ("features", 0.0, True)
    assert len(mask.ops) == 2
    assert all(lay.explicit_mask is None for i, lay in enumerate(spec.layers) if i != 2)

    path, config = saved["functional_ids_mask"][1][fmt]
    spec = read_keras(path, config=config)
    assert [lay.class_name for lay in spec.layers] == ["InputLayer", "Embedding", "GRU", "Dense"]
    mask = spec.layers[2].explicit_mask
    assert (mask.source, mask.value, mask.reduce_last_axis) == (spec.layers[0].name, 0.0, False)
    assert spec.input_dtype == "int32"


@pytest.mark.parametrize("as_", ["dict", "json", "file", "get_config"])
def test_weights_h5_accepts_config_in_every_form(saved, tmp_path, as_):
    model, files = saved["stacked_gru"]
    path, text = files["weights.h5"]
    if as_ == "dict":
        config = json.loads(text)
    elif as_ == "json":
        config = text
    elif as_ == "file":
        config = tmp_path / "model.json"
        config.write_text(text)
    else:
        config = model.get_config()
    _assert_matches(read_keras(path, config=config), model)


def test_weights_only_without_config_is_refused(saved):
    path, _ = saved["simple_rnn"][1]["weights.h5"]
    with pytest.raises(LoadError, match="config="):
        read_keras(path)


def test_bfloat16_weights_are_widened_to_float32(saved, tmp_path):
    # Keras 3.15 on torch fails to write bfloat16 layers itself, so store the layout it uses for them by hand:
    # 2-byte opaque elements tagged with a "dtype" attribute.
    model, files = saved["simple_rnn"]
    src, config = files["weights.h5"]
    path = _copy(src, tmp_path / "b.weights.h5")
    expected = {}
    with h5py.File(path, "a") as f:
        vars_group = f["layers/simple_rnn/cell/vars"]
        for index, name in enumerate(["kernel", "recurrent_kernel", "bias"]):
            value = vars_group[str(index)][()]
            top = (value.view(np.uint32) >> 16).astype(np.uint16)
            expected[name] = (top.astype(np.uint32) << 16).view(np.float32)
            del vars_group[str(index)]
            vars_group.create_dataset(str(index), data=top.view("V2")).attrs["dtype"] = "bfloat16"
    spec = read_keras(path, config=config)
    for name, value in expected.items():
        assert spec.layers[1].weights[name].dtype == np.float32
        np.testing.assert_array_equal(spec.layers[1].weights[name], value)


# ----------------------------------------------------------------------------------------------------------
# tf.keras 2 / Keras 2.2 legacy files, written by hand with h5py


def _rnn_config(class_name, name, units, **extra):
    """A tf.keras 2 style recurrent layer config."""
    config = {
        "name": name,
        "trainable": True,
        "dtype": "float32",
        "return_sequences": False,
        "return_state": False,
        "go_backwards": False,
        "stateful": False,
        "unroll": False,
        "time_major": False,
        "units": units,
        "activation": "tanh",
        "recurrent_activation": "sigmoid",
        "use_bias": True,
        "dropout": 0.0,
        "recurrent_dropout": 0.0,
        "implementation": 2,
    }
    config.update(extra)
    return {"class_name": class_name, "config": config}


def _write_legacy_h5(path, model_config, groups, split=()):
    """Write a tf.keras 2 style .h5: bytes attributes, weight_names, optionally split attributes.

    Without ``model_config`` it is a weights-only file (``save_weights("w.h5")``), groups at the root.
    """
    with h5py.File(path, "w") as f:
        if model_config is None:
            weights = f
        else:
            f.attrs["keras_version"] = b"2.15.0"
            f.attrs["backend"] = b"tensorflow"
            f.attrs["model_config"] = json.dumps(model_config).encode("utf8")
            weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = np.array([name.encode() for name, _ in groups])
        weights.attrs["keras_version"] = b"2.15.0"
        weights.attrs["backend"] = b"tensorflow"
        for layer_name, tensors in groups:
            group = weights.create_group(layer_name)
            names = np.array([n.encode() for n, _ in tensors]) if tensors else np.array([], dtype=np.float64)
            if layer_name in split:
                # Keras splits attributes that would overflow the 64 KiB object header this way.
                half = len(names) // 2
                group.attrs["weight_names0"] = names[:half]
                group.attrs["weight_names1"] = names[half:]
            else:
                group.attrs["weight_names"] = names
            for name, value in tensors:
                group.create_dataset(name, data=value)


@pytest.fixture(scope="module")
def tf2_model():
    """A live LSTM -> Bidirectional(GRU) -> Dense model whose weights the hand-built files carry."""
    return _sequential(
        keras.Input((5, 3)),
        L.LSTM(4, return_sequences=True, name="lstm"),
        L.Bidirectional(L.GRU(3), name="bidirectional"),
        L.Dense(2, activation="softmax", name="dense"),
    )


def _tf2_sequential_config():
    """The model_config tf.keras 2.15 writes for the tf2_model architecture."""
    dense = {"name": "dense", "dtype": "float32", "units": 2, "activation": "softmax", "use_bias": True}
    return {
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "config": {"batch_input_shape": [None, 5, 3], "dtype": "float32", "name": "lstm_input"},
                },
                _rnn_config("LSTM", "lstm", 4, return_sequences=True, batch_input_shape=[None, 5, 3]),
                {
                    "class_name": "Bidirectional",
                    "config": {
                        "name": "bidirectional",
                        "trainable": True,
                        "dtype": "float32",
                        "layer": _rnn_config("GRU", "gru", 3, reset_after=True),
                        "merge_mode": "concat",
                    },
                },
                {"class_name": "Dense", "config": dense},
            ],
        },
    }


def _tf2_groups(model, style):
    """Weight groups named the tf.keras 2 way (``lstm/lstm_cell/kernel:0``) or the Keras 2.2 way (``lstm/kernel:0``)."""
    lstm, bidi, dense = model.layers
    rnn = ["kernel", "recurrent_kernel", "bias"]

    def cell(prefix, cell_name, values):
        """Names for one recurrent layer's kernel, recurrent_kernel and bias."""
        if style == "tf2":
            return [(f"{prefix}/{cell_name}/{n}:0", v) for n, v in zip(rnn, values)]
        return [(f"{prefix}/{n}:0", v) for n, v in zip(rnn, values)]

    forward, backward = bidi.forward_layer.get_weights(), bidi.backward_layer.get_weights()
    return [
        ("lstm", cell("lstm", "lstm_cell", lstm.get_weights())),
        (
            "bidirectional",
            cell("bidirectional/forward_gru", "gru_cell", forward)
            + cell("bidirectional/backward_gru", "gru_cell", backward),
        ),
        ("dense", [(f"dense/{n}:0", v) for n, v in zip(["kernel", "bias"], dense.get_weights())]),
    ]


@pytest.mark.parametrize("style", ["tf2", "keras22"])
@pytest.mark.parametrize("split", [(), ("bidirectional",)])
def test_tf_keras_2_h5(tmp_path, tf2_model, style, split):
    path = tmp_path / "tf2.h5"
    _write_legacy_h5(path, _tf2_sequential_config(), _tf2_groups(tf2_model, style), split=split)
    spec = read_keras(path)
    assert (spec.keras_version, spec.backend, spec.source_format) == ("2.15.0", "tensorflow", "h5")
    assert spec.input_shape == (None, 5, 3)
    assert spec.layers[0].class_name == "InputLayer"
    _assert_matches(spec, tf2_model)
    backward = spec.layers[2].config["backward_layer"]["config"]
    assert backward["go_backwards"] is True and backward["name"] == "backward_gru"
    assert backward["zero_output_for_mask"] is False


def test_keras_22_sequential_config_as_a_list(tmp_path, tf2_model):
    config = _tf2_sequential_config()
    config["config"] = config["config"]["layers"][1:]
    _write_legacy_h5(tmp_path / "k22.h5", config, _tf2_groups(tf2_model, "keras22"))
    spec = read_keras(tmp_path / "k22.h5")
    assert spec.input_shape == (None, 5, 3)
    _assert_matches(spec, tf2_model)


def test_legacy_weights_only_h5_with_config(tmp_path, tf2_model):
    _write_legacy_h5(tmp_path / "w.h5", None, _tf2_groups(tf2_model, "tf2"))
    spec = read_keras(tmp_path / "w.h5", config=_tf2_sequential_config())
    assert (spec.keras_version, spec.source_format) == ("2.15.0", "h5")
    _assert_matches(spec, tf2_model)


def _renamed(groups, names):
    """The same weight groups under other layer names (what a file saved from another session of Keras 2 holds)."""
    out = []
    for (old, tensors), new in zip(groups, names):
        out.append((new, [(n.replace(old, new, 1), v) for n, v in tensors]))
    return out


def test_legacy_weights_paired_by_order_when_names_differ(tmp_path, tf2_model):
    # Keras 2.2 numbered layers per session: a file may say lstm_3 where the config says lstm.
    groups = _renamed(_tf2_groups(tf2_model, "keras22"), ["lstm_3", "bidirectional_7", "dense_2"])
    _write_legacy_h5(tmp_path / "w.h5", None, [("input_4", [])] + groups)
    with pytest.warns(UserWarning, match=r"w\.h5: .*paired by order.*lstm <- lstm_3, bidirectional <- bidirectional_7, "
                      r"dense <- dense_2"):
        spec = read_keras(tmp_path / "w.h5", config=_tf2_sequential_config())
    _assert_matches(spec, tf2_model)


def test_legacy_weights_paired_by_order_must_agree_in_shape(tmp_path, tf2_model):
    groups = _renamed(_tf2_groups(tf2_model, "keras22"), ["lstm_3", "bidirectional_7", "dense_2"])
    name, kernel = groups[0][1][0]
    groups[0][1][0] = (name, kernel[:, :12])  # another model's LSTM in first place
    _write_legacy_h5(tmp_path / "w.h5", None, groups)
    with pytest.warns(UserWarning, match="paired by order"), pytest.raises(
        LoadError, match=r"w\.h5: layer 'lstm' tensor 'kernel': expected shape \(3, 16\), found \(3, 12\)"
    ):
        read_keras(tmp_path / "w.h5", config=_tf2_sequential_config())


def test_legacy_weights_with_another_count_are_not_paired(tmp_path, tf2_model):
    groups = _renamed(_tf2_groups(tf2_model, "keras22"), ["lstm_3", "bidirectional_7", "dense_2"])
    _write_legacy_h5(tmp_path / "w.h5", None, groups[:2])
    with pytest.raises(LoadError, match=r"w\.h5: layer 'lstm': the file has no weights group for it"):
        read_keras(tmp_path / "w.h5", config=_tf2_sequential_config())


def test_cudnn_lstm_weights_refused(tmp_path, tf2_model):
    # Keras 2's CuDNNLSTM stores two biases per gate (8 * units values).
    groups = _tf2_groups(tf2_model, "keras22")
    name, bias = groups[0][1][2]
    groups[0][1][2] = (name, np.concatenate([bias, bias]))
    _write_legacy_h5(tmp_path / "cudnn.h5", _tf2_sequential_config(), groups)
    with pytest.raises(LoadError, match=r"cudnn\.h5: layer 'lstm' tensor 'bias': 32 values, two per gate and unit: "
                                        r"weights of a Keras 2 CuDNNLSTM layer"):
        read_keras(tmp_path / "cudnn.h5")


def test_unknown_layers_named_before_the_graph_shape(tmp_path):
    inp = keras.Input((6, 3))
    a = L.LSTM(4, return_sequences=True, name="a")(inp)
    b = L.LSTM(4, return_sequences=True, name="b")(a)
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling1D(name="pool")(L.Add(name="sum")([a, b]))))
    model.save(tmp_path / "branch.keras")
    with pytest.raises(LoadError, match=r"branch\.keras: layer 'sum' \(Add\), layer 'pool' \(GlobalAveragePooling1D\): "
                                        r"Keras layer classes not supported, and the model is not a chain .*'a' branches"):
        read_keras(tmp_path / "branch.keras")


def test_tf_keras_2_functional_with_tf_op_lambda_mask(tmp_path, tf2_model):
    lstm_weights = _tf2_groups(tf2_model, "tf2")[0][1]
    lstm = _rnn_config("LSTM", "lstm", 4, return_sequences=True)
    lstm["name"] = "lstm"
    lstm["inbound_nodes"] = [[["input_1", 0, 0, {"mask": ["tf.math.reduce_any", 0, 0]}]]]
    config = {
        "class_name": "Functional",
        "config": {
            "name": "model",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "config": {"batch_input_shape": [None, 5, 3], "dtype": "float32", "name": "input_1"},
                    "name": "input_1",
                    "inbound_nodes": [],
                },
                {
                    "class_name": "TFOpLambda",
                    "config": {"name": "tf.math.not_equal", "dtype": "float32", "function": "math.not_equal"},
                    "name": "tf.math.not_equal",
                    "inbound_nodes": [["input_1", 0, 0, {"y": -1.0, "name": None}]],
                },
                {
                    "class_name": "TFOpLambda",
                    "config": {"name": "tf.math.reduce_any", "dtype": "float32", "function": "math.reduce_any"},
                    "name": "tf.math.reduce_any",
                    "inbound_nodes": [["tf.math.not_equal", 0, 0, {"axis": -1}]],
                },
                lstm,
            ],
            "input_layers": [["input_1", 0, 0]],
            "output_layers": [["lstm", 0, 0]],
        },
    }
    groups = [("input_1", []), ("tf.math.not_equal", []), ("tf.math.reduce_any", []), ("lstm", lstm_weights)]
    _write_legacy_h5(tmp_path / "f.h5", config, groups)
    spec = read_keras(tmp_path / "f.h5")
    assert [lay.name for lay in spec.layers] == ["input_1", "lstm"]
    assert spec.layers[1].explicit_mask == KerasMask("input_1", -1.0, True, ("tf.math.not_equal", "tf.math.reduce_any"))
    np.testing.assert_array_equal(spec.layers[1].weights["recurrent_kernel"], tf2_model.layers[0].get_weights()[1])


# ----------------------------------------------------------------------------------------------------------
# Damaged and mismatched files


def _copy(src, dst):
    """Copy a file, returning the new path."""
    dst.write_bytes(src.read_bytes())
    return dst


def _rewrite_keras_weights(src, dst, edit):
    """Copy a .keras archive, letting ``edit(h5py.File)`` change model.weights.h5."""
    with zipfile.ZipFile(src) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "a") as f:
        edit(f)
    members["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_legacy_h5_with_a_deleted_dataset(saved, tmp_path):
    path = _copy(saved["embedding_lstm"][1]["h5"][0], tmp_path / "m.h5")
    with h5py.File(path, "a") as f:
        group = f["model_weights/lstm"]
        del group[[n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]][1]]
    with pytest.raises(LoadError, match=r"m\.h5: layer 'lstm' tensor 'recurrent_kernel'.*missing"):
        read_keras(path)


def test_weights_h5_with_a_deleted_dataset(saved, tmp_path):
    src, config = saved["stacked_gru"][1]["weights.h5"]
    path = _copy(src, tmp_path / "w.weights.h5")
    with h5py.File(path, "a") as f:
        del f["layers/gru_1/cell/vars/2"]
    with pytest.raises(LoadError, match=r"w\.weights\.h5: layer 'gru_1' tensor 'bias'"):
        read_keras(path, config=config)


def test_dataset_claiming_far_more_than_it_stores(saved, tmp_path):
    src, config = saved["simple_rnn"][1]["weights.h5"]
    path = _copy(src, tmp_path / "bomb.weights.h5")
    with h5py.File(path, "a") as f:
        del f["layers/simple_rnn/cell/vars/0"]
        f.create_dataset("layers/simple_rnn/cell/vars/0", shape=(8192, 8192), dtype="f4", chunks=True)
    with pytest.raises(LoadError, match=r"bomb\.weights\.h5: layer 'simple_rnn(_\d+)?' tensor 'kernel': .*claims"):
        read_keras(path, config=config)


def test_keras_archive_with_a_wrong_shape(saved, tmp_path):
    def edit(f):
        """Replace the recurrent kernel with one sized for 4 units instead of 5."""
        del f["layers/lstm/cell/vars/1"]
        f["layers/lstm/cell/vars/1"] = np.zeros((5, 16), np.float32)

    _rewrite_keras_weights(saved["embedding_lstm"][1][".keras"][0], tmp_path / "bad.keras", edit)
    expected = r"bad\.keras: layer 'lstm' tensor 'recurrent_kernel': expected shape \(5, 20\), found \(5, 16\)"
    with pytest.raises(LoadError, match=expected):
        read_keras(tmp_path / "bad.keras")


def test_legacy_h5_with_a_wrong_shape(saved, tmp_path):
    path = _copy(saved["simple_rnn"][1]["h5"][0], tmp_path / "m.h5")
    with h5py.File(path, "a") as f:
        group = f["model_weights/simple_rnn"]
        name = group.attrs["weight_names"][0]
        name = name.decode() if isinstance(name, bytes) else name
        del group[name]
        group[name] = np.zeros((7, 4), np.float32)
    with pytest.raises(LoadError, match=r"layer 'simple_rnn' tensor 'kernel': expected shape \(3, 4\), found \(7, 4\)"):
        read_keras(path)


def test_extra_tensor_in_a_vars_group(saved, tmp_path):
    _rewrite_keras_weights(
        saved["masking_lstm"][1][".keras"][0],
        tmp_path / "extra.keras",
        lambda f: f.create_dataset("layers/lstm/cell/vars/3", data=np.zeros(3)),
    )
    with pytest.raises(LoadError, match=r"extra\.keras: layer 'lstm(_\d+)?': unexpected tensor"):
        read_keras(tmp_path / "extra.keras")


@pytest.mark.parametrize("fmt", [".keras", "h5"])
def test_truncated_files(saved, tmp_path, fmt):
    src = saved["bidirectional"][1][fmt][0]
    data = src.read_bytes()
    path = tmp_path / f"cut{src.suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="cut"):
        read_keras(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.keras"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(LoadError, match=r"noise\.keras: not a Keras file"):
        read_keras(path)


def test_missing_file(tmp_path):
    with pytest.raises(LoadError, match="cannot be read"):
        read_keras(tmp_path / "absent.keras")


def test_keras_archive_with_bad_json(saved, tmp_path):
    with zipfile.ZipFile(saved["simple_rnn"][1][".keras"][0]) as src, zipfile.ZipFile(tmp_path / "j.keras", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"{not json" if name == "config.json" else src.read(name))
    with pytest.raises(LoadError, match=r"j\.keras: config\.json: invalid JSON"):
        read_keras(tmp_path / "j.keras")


def test_bad_json_config_argument(saved):
    path, _ = saved["simple_rnn"][1]["weights.h5"]
    with pytest.raises(LoadError, match="invalid JSON"):
        read_keras(path, config='{"class_name": ')


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_naming_a_layer_without_weights(saved, fmt):
    path, text = saved["masking_lstm"][1][fmt]
    config = json.loads(text) if text else _stored_config(path, fmt)
    extra = json.loads(json.dumps(config["config"]["layers"][-1]))
    extra["config"]["name"] = "phantom"
    config["config"]["layers"].append(extra)
    with pytest.raises(LoadError, match=rf"{path.name}: layer 'phantom'"):
        read_keras(path, config=config)


def _stored_config(path, fmt):
    """The model config embedded in a .keras or legacy .h5 file."""
    if fmt == ".keras":
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    with h5py.File(path) as f:
        return json.loads(f.attrs["model_config"])


def test_config_of_another_model_is_refused(saved):
    path, _ = saved["simple_rnn"][1]["weights.h5"]
    expected = r"simple_rnn\.weights\.h5: layer 'lstm(_\d+)?': weights group 'layers/lstm/cell/vars' is missing"
    with pytest.raises(LoadError, match=expected):
        read_keras(path, config=saved["masking_lstm"][1]["weights.h5"][1])


def test_corrupted_keras_archive(saved, tmp_path):
    data = bytearray(saved["stacked_gru"][1][".keras"][0].read_bytes())
    start = data.index(b"\x89HDF")
    for offset in range(start + 4096, start + 4160):
        data[offset] ^= 0xFF
    (tmp_path / "flip.keras").write_bytes(bytes(data))
    with pytest.raises(LoadError, match=r"flip\.keras: .*damaged"):
        read_keras(tmp_path / "flip.keras")


def test_branching_functional_model_is_refused(tmp_path):
    inp = keras.Input((6, 3))
    x = L.LSTM(4, name="trunk")(inp)
    model = keras.Model(inp, L.Add()([L.Dense(2)(x), L.Dense(2)(x)]))
    model.save(tmp_path / "branch.keras")
    with pytest.raises(LoadError, match=r"branch\.keras: layer 'trunk' branches"):
        read_keras(tmp_path / "branch.keras")


def test_shared_layer_is_refused(tmp_path):
    inp = keras.Input((6, 3))
    shared = L.Dense(3, name="twice")
    model = keras.Model(inp, L.LSTM(2)(shared(shared(inp))))
    model.save(tmp_path / "shared.keras")
    with pytest.raises(LoadError, match=r"shared\.keras: layer 'twice' is called 2 times"):
        read_keras(tmp_path / "shared.keras")


def test_op_on_the_data_path_is_refused(tmp_path):
    inp = keras.Input((6, 3))
    model = keras.Model(inp, L.LSTM(2, name="rnn")(keras.ops.tanh(inp)))
    model.save(tmp_path / "op.keras")
    with pytest.raises(LoadError, match=r"op\.keras: layer 'rnn' takes its input from op 'tanh"):
        read_keras(tmp_path / "op.keras")


def test_mask_from_another_op_is_refused(tmp_path):
    inp = keras.Input((6, 3))
    mask = keras.ops.any(keras.ops.greater(inp, 0.0), axis=-1)
    model = keras.Model(inp, L.LSTM(2, name="rnn")(inp, mask=mask))
    model.save(tmp_path / "gt.keras")
    with pytest.raises(LoadError, match=r"gt\.keras: layer 'rnn' receives a mask that is not any\(x != value"):
        read_keras(tmp_path / "gt.keras")


def test_unsupported_layer_with_weights_is_refused(tmp_path):
    model = keras.Sequential([keras.Input((6, 3)), L.Conv1D(2, 3, name="conv")])
    model.save(tmp_path / "conv.keras")
    with pytest.raises(LoadError, match=r"conv\.keras: layer 'conv': weights of layer class 'Conv1D' are not"):
        read_keras(tmp_path / "conv.keras")


def test_missing_h5py_is_reported(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    for fmt in (".keras", "h5"):
        with pytest.raises(LoadError, match=r"needs h5py: pip install h5py \(from an lstm_engine checkout: pip install '\.\[keras\]'\)"):
            read_keras(saved["simple_rnn"][1][fmt][0])


def test_npz_weights_with_pickled_variables_are_refused(tmp_path):
    from keras.src.saving import saving_lib

    model = _sequential(keras.Input((4, 3)), L.LSTM(2))
    saving_lib.save_model(model, tmp_path / "n.keras", weights_format="npz")
    with pytest.raises(UnsafeModelError, match=r"n\.keras: model\.weights\.npz: entry .*refusing pickle global 'keras"):
        read_keras(tmp_path / "n.keras")


def test_npz_weights_holding_plain_arrays_are_read(saved, tmp_path):
    model, files = saved["masking_lstm"]
    contents = {"__root__": {}, "layers/masking": {}, "layers/lstm": {}}
    contents["layers/lstm/cell"] = {str(i): w for i, w in enumerate(model.layers[1].get_weights())}
    npz = io.BytesIO()
    np.savez(npz, **{k: np.array(v, dtype=object) for k, v in contents.items()})
    with zipfile.ZipFile(files[".keras"][0]) as src, zipfile.ZipFile(tmp_path / "p.keras", "w") as dst:
        dst.writestr("config.json", src.read("config.json"))
        dst.writestr("metadata.json", src.read("metadata.json"))
        dst.writestr("model.weights.npz", npz.getvalue())
    _assert_matches(read_keras(tmp_path / "p.keras"), model)
