"""A trained run on new data: metalearn.load_run (no dataset needed), run.preprocess (the data's
own image pipeline), run.adapt / run.predict (the evaluator's maths), and `metalearn predict`.

The runs are trained here on a copy of a few characters of the real Omniglot release
(../shared/data/omniglot), found through METALEARN_DATA at training time only: the saved
configs have data.root=null, so nothing afterwards can read the data unless a test gives it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import metalearn as run_metalearn
from PIL import Image, ImageDraw

import metalearn
from metalearn import cli
from metalearn.algorithms.base import classification_loss
from metalearn.config import ConfigError
from metalearn.data.base import DataError, DataSpec
from metalearn.data.episodic import sample_episode
from metalearn.data.omniglot import OmniglotConfig, load_omniglot, split_classes
from metalearn.data.tfds import TfdsConfig
from metalearn.data.tfds import _decode as tfds_decode
from metalearn.rundir import RunDir, RunDirError
from metalearn.types import Split, Task

REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/omniglot"
needs_real_data = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"no Omniglot copy at {REAL_DATA}"
)
SETS = ("images_background", "images_evaluation")
SIZE = 14  # data.image_size of the runs
SPLIT_SIZES = (18, 6, 6)  # 3 background alphabets x 6 + 2 evaluation alphabets x 6 characters
TINY = [
    "data=omniglot",
    "data.n_way=3",
    "data.k_shot=1",
    "data.k_query=2",
    f"data.image_size={SIZE}",
    f"data.split_sizes=[{','.join(map(str, SPLIT_SIZES))}]",
    "data.download=false",
    "model.hidden=8",
    "train.steps=3",
    "train.meta_batch=2",
    "eval.every=3",
    "eval.num_tasks=4",
    "eval.val_tasks=4",
    "eval.batch=4",
]
SINUSOID = ["train.steps=2", "eval.every=2", "eval.num_tasks=2", "eval.val_tasks=2"]
LOGIT_ATOL = 1e-4  # jitted (run.adapt/predict) against eager (algo.adapt/predict) float32 maths


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    """The first 6 characters of the first 3 background and 2 evaluation alphabets of the real
    release, their PNG files copied byte for byte into zips of the release's layout."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"no Omniglot copy at {REAL_DATA}")
    root = tmp_path_factory.mktemp("omniglot")
    for name, n_alphabets in zip(SETS, (3, 2), strict=True):
        with (
            zipfile.ZipFile(REAL_DATA / f"{name}.zip") as source,
            zipfile.ZipFile(root / f"{name}.zip", "w") as copy,
        ):
            members = sorted(n for n in source.namelist() if n.endswith(".png"))
            alphabets = sorted({m.split("/")[1] for m in members})[:n_alphabets]
            for alphabet in alphabets:
                chars = sorted({m.split("/")[2] for m in members if m.split("/")[1] == alphabet})
                for m in members:
                    if m.split("/")[1] == alphabet and m.split("/")[2] in chars[:6]:
                        copy.writestr(m, source.read(m))
    return root


class Drawings:
    """Omniglot as training sees it (cached uint8 arrays, the split) and the PNG bytes of each
    drawing, to write the same drawings as a user's files."""

    def __init__(self, root: Path, xdg: Path):
        self.root = root
        self.xdg = xdg  # an XDG_CACHE_HOME holding the cache of these arrays (experiment.restore's)
        cache = xdg / "metalearn" / "omniglot"
        self.data = load_omniglot(root, image_size=SIZE, cache_dir=cache, download=False)
        self.split = split_classes(self.data, sizes=SPLIT_SIZES)

    def png(self, row: int, drawing: int) -> bytes:
        name = SETS[0] if self.data.background[row] else SETS[1]
        with zipfile.ZipFile(self.root / f"{name}.zip") as zf:
            prefix = f"{name}/{self.data.characters[row]}/"
            members = sorted(m for m in zf.namelist() if m.startswith(prefix))
            return zf.read(members[drawing])

    def write(self, folder: Path, rows, drawings) -> list[Path]:
        """PNG files of drawings `drawings` of each character row, class-major."""
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for r in rows:
            for d in drawings:
                files.append(folder / f"char{r}_{d}.png")
                files[-1].write_bytes(self.png(r, d))
        return files

    def training_inputs(self, rows, drawings) -> jax.Array:
        """The float32 model inputs training gives these drawings (data/episodic.py's scaling)."""
        pixels = self.data.images[np.asarray(rows)][:, np.asarray(drawings)]
        x = jnp.asarray(pixels.reshape(-1, SIZE, SIZE)).astype(jnp.float32) / 255.0
        return x[..., None]


@pytest.fixture(scope="module")
def drawings(omniglot_root, tmp_path_factory) -> Drawings:
    return Drawings(omniglot_root, tmp_path_factory.mktemp("xdg"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env, omniglot_root) -> dict[str, Path]:
    """Tiny protonet and maml runs on the Omniglot copy, and a sinusoid (regression) run."""
    cwd = tmp_path_factory.mktemp("runs")
    train_env = {**env, "METALEARN_DATA": str(omniglot_root)}  # data.root stays null
    out, times = {}, {}
    for name, args in (
        ("protonet", [*TINY, "algo=protonet"]),
        ("maml", [*TINY, "algo=maml"]),
        ("sinusoid", SINUSOID),
    ):
        started = time.perf_counter()
        run_metalearn(["train", *args, f"hydra.run.dir={cwd / name}"], train_env, cwd, check=True)
        times[name] = round(time.perf_counter() - started, 1)
        out[name] = cwd / name
    print(f"training times (s): {times}", file=sys.stderr)
    return out


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """Omniglot cannot be found (no METALEARN_DATA, an empty cache) and building any task
    source fails the test."""
    monkeypatch.delenv("METALEARN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a dataset was loaded")

    import metalearn.data
    import metalearn.data.omniglot
    import metalearn.experiment

    monkeypatch.setattr(metalearn.data, "make_task_source", refuse)
    monkeypatch.setattr(metalearn.experiment, "make_task_source", refuse)
    monkeypatch.setattr(metalearn.data.omniglot, "load_omniglot", refuse)


@pytest.fixture
def with_data(monkeypatch, omniglot_root, drawings):
    """The Omniglot copy reachable (for experiment.restore: the evaluator's path), cache built."""
    monkeypatch.setenv("METALEARN_DATA", str(omniglot_root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(drawings.xdg))


def tree_digest(path: Path) -> dict:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------- the image pipeline (fast)


@needs_real_data
def test_preprocess_of_png_files_equals_the_training_inputs(drawings, tmp_path):
    """Drawings written to PNG files, opened as PIL images, given as arrays (uint8, bool, float
    in [0, 1]) or re-saved as RGB come out of OmniglotConfig.preprocess bit for bit as training
    reads them: the cached uint8 arrays scaled as the episode sampler scales them."""
    cfg = OmniglotConfig(image_size=SIZE)
    rows, ids = drawings.split["test"][:3], [0, 5, 19]
    files = drawings.write(tmp_path / "pngs", rows, ids)
    expected = np.asarray(drawings.training_inputs(rows, ids))
    from_files = cfg.preprocess(files)
    assert from_files.dtype == np.float32 and from_files.shape == (9, SIZE, SIZE, 1)
    np.testing.assert_array_equal(from_files, expected)  # tolerance 0: the same pipeline

    pil = [Image.open(f) for f in files]
    full = np.stack([np.asarray(im.convert("L")) for im in pil])  # uint8 [9, 105, 105]
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for f, im in zip(files, pil, strict=True):
        im.convert("RGB").save(rgb / f.name)
    for images in (
        pil,
        full,
        list(full),
        full > 127,
        full.astype(np.float64) / 255,
        full[..., None],
        [rgb / f.name for f in files],
    ):
        np.testing.assert_array_equal(cfg.preprocess(images), expected)

    # The episode sampler's own output (jitted) holds exactly these arrays.
    pixels = jnp.asarray(drawings.data.images[rows][:, [0, 5, 19]])
    episode = jax.jit(lambda k: sample_episode(k, pixels, n_way=3, k_shot=1, k_query=2))(
        jax.random.PRNGKey(0)
    )
    sampled = np.concatenate([episode.support.x, episode.query.x])
    assert sorted(map(bytes, sampled)) == sorted(map(bytes, from_files))


@needs_real_data
@pytest.mark.parametrize("channels, invert", [(3, False), (1, False), (1, True)])
def test_tfds_preprocess_equals_its_cache_pipeline(drawings, channels, invert):
    """TfdsConfig.preprocess on encoded images gives what its cache holds (tfds._decode) / 255."""
    cfg = TfdsConfig(name="omniglot", image_size=20, channels=channels, invert=invert)
    pngs = [drawings.png(r, 0) for r in drawings.split["val"][:2]]
    cached = np.stack([tfds_decode(b, 20, channels, invert, "omniglot", "here") for b in pngs])
    out = cfg.preprocess([Image.open(io.BytesIO(b)) for b in pngs])
    assert out.shape == (2, 20, 20, channels) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.asarray(jnp.asarray(cached).astype(jnp.float32) / 255.0))


def test_bad_images_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    cases = [
        ([garbage], "garbage.png is not an image"),
        ([truncated], "truncated.png does not decode"),
        ([tmp_path / "missing.png"], "missing.png cannot be read"),
        (np.full((2, 8, 8), 2.0), r"float images must be in \[0, 1\]"),
        (np.zeros((8, 8)), r"a batch \[N, H, W\]"),
        ([np.zeros((8, 8, 2), np.uint8)], r"has shape \[8, 8, 2\]"),
        ([np.full((8, 8), 300)], "outside 0-255"),
        ([], "No images"),
        (3, "got a int"),
    ]
    for images, match in cases:
        with pytest.raises(DataError, match=match):
            OmniglotConfig(image_size=SIZE).preprocess(images)


def test_data_spec_round_trip_and_damage():
    spec = DataSpec("classification", 5, 1100, (28, 28, 1))
    record = json.loads(json.dumps(spec.to_json()))
    assert DataSpec.from_json(record) == spec
    no_kind = {k: v for k, v in record.items() if k != "kind"}
    bad_values = [{"n_out": "5"}, {"input_shape": [28, -1]}, {"kind": "x"}, {"task_names": [1]}]
    for bad in [[], no_kind, *({**record, **change} for change in bad_values)]:
        with pytest.raises(ValueError):
            DataSpec.from_json(bad)


# ------------------------------------------------------------------------ trained runs (slow)


@pytest.mark.slow
def test_runs_record_their_data_spec(runs):
    spec = json.loads((runs["protonet"] / "data_spec.json").read_text())
    assert spec == {
        "kind": "classification", "n_out": 3, "n_train_classes": SPLIT_SIZES[0],
        "input_shape": [SIZE, SIZE, 1], "n_tasks": 0, "task_names": [], "classes_per_task": [],
    }  # fmt: skip
    spec = json.loads((runs["sinusoid"] / "data_spec.json").read_text())
    assert spec["kind"] == "regression" and spec["input_shape"] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["protonet", "maml"])
@pytest.mark.parametrize("checkpoint", ["best", "latest"])
def test_load_run_needs_no_dataset(runs, no_data, drawings, algo, checkpoint):
    """(a) With Omniglot unreachable and task sources refused, a run loads, its parameters are
    the checkpoint's, and it adapts and predicts."""
    run = metalearn.load_run(runs[algo], checkpoint=checkpoint)
    assert run.n_way == 3 and run.input_shape == (SIZE, SIZE, 1) and run.checkpoint_step == 3
    stored = RunDir(runs[algo]).read_arrays(checkpoint)
    prefix = ".params" if checkpoint == "latest" else ""
    for path, leaf in jax.tree_util.tree_flatten_with_path(run.params)[0]:
        np.testing.assert_array_equal(stored[prefix + jax.tree_util.keystr(path)], leaf)
    x = np.asarray(drawings.training_inputs(drawings.split["test"][:3], [0, 1]))
    logits = run.predict(run.adapt(x[::2], [0, 1, 2]), x[1::2])
    assert logits.shape == (3, 3) and np.all(np.isfinite(logits))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_predictions_on_png_files_equal_the_evaluator(runs, with_data, drawings, tmp_path, algo):
    """(b) PNG files of real drawings -> preprocess -> adapt -> predict gives the logits of the
    run's evaluator path (experiment.restore, algo.adapt/predict, un-jitted) on the training arrays
    of the same drawings, within LOGIT_ATOL; the evaluator's loss and accuracy agree."""
    from metalearn.experiment import restore

    exp, params, _ = restore(runs[algo], [], "best")
    run = metalearn.load_run(runs[algo])
    rows = drawings.split["test"][[4, 0, 2]]
    support = run.preprocess(drawings.write(tmp_path / "support", rows, [3]))
    query = run.preprocess(drawings.write(tmp_path / "query", rows, [7, 11, 12]))
    xs, xq = drawings.training_inputs(rows, [3]), drawings.training_inputs(rows, [7, 11, 12])
    np.testing.assert_array_equal(support, xs)
    np.testing.assert_array_equal(query, xq)
    ys, yq = jnp.arange(3), jnp.repeat(jnp.arange(3), 3)

    key = jax.random.PRNGKey(7)
    task_params = exp.algo.adapt(params, Split(xs, ys), key, exp.eval_inner_steps)
    expected = exp.algo.predict(params, task_params, xq)
    logits = run.predict(run.adapt(support, np.arange(3), key=key), query)
    assert logits.shape == (9, 3)
    np.testing.assert_allclose(logits, expected, atol=LOGIT_ATOL, rtol=0)
    print(f"{algo}: max |logit difference| = {np.abs(logits - expected).max():.2e}")
    task = Task(Split(xs, ys), Split(xq, yq), jnp.zeros((), jnp.int32))
    loss, metrics = exp.algo.evaluate(params, task, key, exp.eval_inner_steps)
    api_loss, api_metrics = classification_loss(jnp.asarray(logits), yq)
    np.testing.assert_allclose(api_loss, loss, atol=LOGIT_ATOL)
    assert float(api_metrics["accuracy"]) == float(metrics["accuracy"])
    predicted = run.classify(support, np.arange(3), query, key=key)
    np.testing.assert_array_equal(predicted, np.argmax(logits, -1))


@pytest.mark.slow
def test_the_number_of_classes_comes_from_the_support_labels(runs, no_data, drawings):
    """Prototypes take any N; MAML's head has the trained n_way, so another N is an error."""
    x = np.asarray(drawings.training_inputs(drawings.split["test"][:5], [0, 1]))
    proto = metalearn.load_run(runs["protonet"])
    for n in (2, 5):
        logits = proto.predict(proto.adapt(x[: 2 * n : 2], np.arange(n)), x[1::2])
        assert logits.shape == (5, n)
    maml = metalearn.load_run(runs["maml"])
    with pytest.raises(DataError, match=r"5 classes.*maml.*fixed by training \(data.n_way=3\)"):
        maml.adapt(x[::2], np.arange(5))
    assert maml.predict(maml.adapt(x[:6:2], [2, 0, 1]), x[1::2]).shape == (5, 3)


@pytest.mark.slow
def test_bad_api_input_is_a_clear_error(runs, no_data, drawings):
    run = metalearn.load_run(runs["protonet"])
    x = np.asarray(drawings.training_inputs(drawings.split["test"][:3], [0]))
    with pytest.raises(DataError, match=r"0..N-1 with every class present.*\[0, 2, 3\]"):
        run.adapt(x, [0, 2, 3])
    with pytest.raises(DataError, match="N >= 2"):
        run.adapt(x, [0, 0, 0])
    with pytest.raises(DataError, match=r"one class label per support example \(\[3\]\)"):
        run.adapt(x, [0, 1])
    with pytest.raises(DataError, match="integer class labels"):
        run.adapt(x, [0.5, 1, 2])
    raw = np.zeros((3, 105, 105), np.float32)
    with pytest.raises(DataError, match=r"\[3, 105, 105\].*\[n, 14, 14, 1\].*run.preprocess first"):
        run.adapt(raw, [0, 1, 2])
    with pytest.raises(TypeError, match="what run.adapt returned"):
        run.predict(np.zeros((3, 8)), x)
    with pytest.raises(ConfigError, match="use 'best' or 'latest'"):
        metalearn.load_run(runs["protonet"], checkpoint="nonexistent")
    with pytest.raises(RunDirError, match="not a metalearn run directory"):
        metalearn.load_run(runs["protonet"] / "checkpoints")


@pytest.mark.slow
def test_a_data_option_without_a_pipeline_is_a_clear_error(runs, no_data, monkeypatch):
    run = metalearn.load_run(runs["protonet"])
    monkeypatch.delattr(OmniglotConfig, "preprocess")
    with pytest.raises(DataError, match=r"data=omniglot \(OmniglotConfig\) has no image pipeline"):
        run.preprocess(np.zeros((1, 20, 20), np.uint8))


@pytest.mark.slow
def test_vector_data(runs, no_data, monkeypatch):
    """Sinusoid: preprocess returns the float32 inputs unchanged; adapt/predict regress and give
    the evaluator's predictions; there are no classes to classify."""
    run = metalearn.load_run(runs["sinusoid"])
    x = np.linspace(-5, 5, 10, dtype=np.float64)[:, None]
    prepared = run.preprocess(x)
    assert prepared.dtype == np.float32
    np.testing.assert_array_equal(prepared, x.astype(np.float32))
    y = np.sin(x)
    out = run.predict(run.adapt(prepared[:5], y[:5]), prepared[5:])
    params = run.algo.adapt(run.params, Split(prepared[:5], y[:5].astype(np.float32)),
                            jax.random.PRNGKey(run.config.eval.seed), run.inner_steps)  # fmt: skip
    np.testing.assert_allclose(out, run.algo.predict(run.params, params, prepared[5:]), atol=1e-5)
    assert out.shape == (5, 1)
    with pytest.raises(DataError, match="regression data"):
        run.classify(prepared[:5], [0, 1, 0, 1, 0], prepared[5:])


@pytest.mark.slow
def test_a_run_without_data_spec_loads_its_data(runs, with_data, drawings, tmp_path, caplog):
    """Older runs (no data_spec.json) are rebuilt with their data, as `metalearn eval` does,
    saying so; they predict exactly as the run with the file. A damaged file is an error."""
    old = tmp_path / "old"
    shutil.copytree(runs["protonet"], old)
    (old / "data_spec.json").unlink()
    x = np.asarray(drawings.training_inputs(drawings.split["test"][:3], [0, 1]))
    with caplog.at_level("WARNING", logger="metalearn"):
        run = metalearn.load_run(old)
    assert "has no data_spec.json" in caplog.text and "loading the run's data" in caplog.text
    new = metalearn.load_run(runs["protonet"])
    assert run.spec == new.spec
    np.testing.assert_array_equal(
        run.predict(run.adapt(x[::2], [0, 1, 2]), x[1::2]),
        new.predict(new.adapt(x[::2], [0, 1, 2]), x[1::2]),
    )
    (old / "data_spec.json").write_text('{"kind": "classification"')
    with pytest.raises(RunDirError, match="data_spec.json is damaged"):
        metalearn.load_run(old)


# ---------------------------------------------------------------------- metalearn predict


def draw(shape: str, shift: int) -> Image.Image:
    """A dark shape on white, Omniglot's convention, shifted by a few pixels."""
    image = Image.new("L", (105, 105), 255)
    pen = ImageDraw.Draw(image)
    a, b = 25 + shift, 80 + shift
    if shape == "bar":
        pen.rectangle((a, 45 + shift, b, 60 + shift), fill=0)
    elif shape == "ring":
        pen.ellipse((a, a, b, b), outline=0, width=8)
    else:  # cross
        pen.line((a, a, b, b), fill=0, width=8)
        pen.line((a, b, b, a), fill=0, width=8)
    return image


@pytest.fixture
def shapes(tmp_path) -> tuple[Path, Path, list[str]]:
    """An easy synthetic 3-way split: one support drawing per shape; queries, in subfolders by
    their true class, shifted copies (and one image loose at the top of the query folder)."""
    support, query = tmp_path / "support", tmp_path / "query"
    names = ["bar", "cross", "ring"]
    for name in names:
        (support / name).mkdir(parents=True)
        draw(name, 0).save(support / name / "1.png")
        (query / name).mkdir(parents=True)
        for shift in (-6, 3, 9):
            draw(name, shift).save(query / name / f"shift{shift}.png")
    draw("ring", 2).convert("RGB").save(query / "loose_ring.jpg")
    (query / "notes.txt").write_text("not an image")
    return support, query, names


@pytest.mark.slow
def test_predict_command(runs, shapes, tmp_path, env):
    """(c) One `path,predicted_class` line per query image, the same predictions (so the same
    accuracy) as the API on the same files; the CSV is written; the run is left untouched; no
    data is reachable by the process (METALEARN_DATA unset, an empty cache)."""
    support, query, names = shapes
    before = tree_digest(runs["protonet"])
    output = tmp_path / "out" / "predictions.csv"
    env = {**env, "XDG_CACHE_HOME": str(tmp_path / "empty-cache")}
    result = run_metalearn(
        ["predict", str(runs["protonet"]), "--support", str(support), "--query", str(query),
         "--output", str(output)], env, tmp_path, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    queries = sorted(p for p in query.rglob("*") if p.suffix in (".png", ".jpg"))
    assert len(lines) == len(queries) == 10
    predicted = dict(line.rsplit(",", 1) for line in lines)
    assert sorted(map(Path, predicted)) == queries and set(predicted.values()) <= set(names)
    assert output.read_text().splitlines() == ["path,predicted_class", *lines]
    assert tree_digest(runs["protonet"]) == before

    run = metalearn.load_run(runs["protonet"])
    support_files = [support / n / "1.png" for n in names]
    api = run.classify(run.preprocess(support_files), [0, 1, 2], run.preprocess(queries))
    assert [predicted[str(q)] for q in queries] == [names[c] for c in api]
    truth = [q.parent.name if q.parent != query else "ring" for q in queries]
    accuracy = np.mean([predicted[str(q)] == t for q, t in zip(queries, truth, strict=True)])
    api_accuracy = np.mean([names[c] == t for c, t in zip(api, truth, strict=True)])
    assert accuracy == api_accuracy
    print(f"metalearn predict: accuracy {accuracy:.2f} on the synthetic split")


def predict_error(argv, monkeypatch, capsys) -> str:
    """Run `metalearn predict ...` in this process; it must exit 2 with one paragraph."""
    monkeypatch.setattr(sys, "argv", ["metalearn", "predict", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("metalearn: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_predict_errors(runs, shapes, tmp_path, no_data, monkeypatch, capsys):
    """(d) Each mistake is one paragraph naming it, exit code 2, and nothing written."""
    support, query, _ = shapes
    proto = runs["protonet"]
    before = tree_digest(proto)

    def error(*argv) -> str:
        return predict_error(argv, monkeypatch, capsys)

    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    assert "is not a metalearn run directory" in error(
        not_a_run, "--support", support, "--query", query
    )
    empty_query = tmp_path / "empty_query"
    (empty_query / "sub").mkdir(parents=True)
    (empty_query / "sub" / "readme.txt").write_text("no images here")
    assert "holds no images" in error(proto, "--support", support, "--query", empty_query)
    assert "does not exist" in error(proto, "--support", support, "--query", tmp_path / "nope")

    (support / "dog").mkdir()
    message = error(proto, "--support", support, "--query", query)
    assert f"The class folder {support / 'dog'} holds no images" in message
    (support / "dog" / "broken.png").write_bytes(b"\x89PNG but not really")
    message = error(proto, "--support", support, "--query", query)
    assert f"{support / 'dog' / 'broken.png'} is not an image" in message
    shutil.rmtree(support / "dog")

    (query / "truncated.png").write_bytes((support / "bar" / "1.png").read_bytes()[:100])
    assert "truncated.png does not decode as an image" in error(
        proto, "--support", support, "--query", query
    )
    (query / "truncated.png").unlink()

    loose = tmp_path / "loose"
    (loose / "only").mkdir(parents=True)
    draw("bar", 0).save(loose / "only" / "1.png")
    assert "at least 2 classes" in error(proto, "--support", loose, "--query", query)
    draw("bar", 0).save(loose / "stray.png")
    assert "images outside class subfolders (stray.png)" in error(
        proto, "--support", loose, "--query", query
    )

    assert "trained on regression data (data=sinusoid)" in error(
        runs["sinusoid"], "--support", support, "--query", query
    )
    four = tmp_path / "four"
    shutil.copytree(support, four)
    shutil.copytree(support / "bar", four / "zigzag")
    assert "4 classes, but this run's maml learner" in error(
        runs["maml"], "--support", four, "--query", query
    )

    inside = proto / "predictions.csv"
    message = error(proto, "--support", support, "--query", query, "--output", inside)
    assert "is inside the run directory" in message and not inside.exists()
    other = runs["maml"] / "evals" / "p.csv"
    assert "is inside the run directory" in error(
        proto, "--support", support, "--query", query, "--output", other
    )
    assert tree_digest(proto) == before


@pytest.mark.slow
def test_predict_error_in_a_process_has_no_traceback(tmp_path, env, shapes):
    support, query, _ = shapes
    result = run_metalearn(
        ["predict", str(tmp_path), "--support", str(support), "--query", str(query)], env, tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("metalearn: error: ") and "not a metalearn run" in result.stderr
    assert result.stdout == ""


def test_help_lists_predict(monkeypatch, capsys):
    for argv, expected in (
        (["--help"], "predict RUN_DIR --support DIR --query DIR [--output FILE.csv]"),
        (["predict", "--help"], "--checkpoint {best,latest}"),
    ):
        monkeypatch.setattr(sys, "argv", ["metalearn", *argv])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 0 and expected in capsys.readouterr().out
