"""data=meta_dataset on small synthetic copies of both on-disk forms, written here with the
test's own tf.train.Example encoder and TFRecord framing (a bitwise CRC-32C, independent of the
module's table-driven one).

Every image is an 8 x 8 PNG whose colour says where it belongs: red its class id, green its
position in the class's file, blue its source, so the arrays read can be checked exactly.
"""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from metalearn.checks import ConfigError
from metalearn.data import meta_dataset as md
from metalearn.data.base import SPLITS, DataError
from metalearn.data.meta_dataset import MetaDatasetConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
SIZE = 8
BLUE = {"toy": 10, "omniglot": 20, "ilsvrc_2012": 30, "aircraft": 40, "traffic_sign": 50}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test reads or writes the real cache, or finds the user's data."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("METALEARN_DATA", raising=False)


# ------------------------------------------------------------------ the test's own encoders


def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    crc = crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: two's complement, 10 bytes
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:  # a length-delimited field
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def example(features: dict, packed: bool = True) -> bytes:
    """tf.train.Example: bytes values as BytesList, ints as Int64List, floats as FloatList."""
    entries = b""
    for key, values in features.items():
        if isinstance(values[0], bytes):
            lst = field(1, b"".join(field(1, v) for v in values))
        elif isinstance(values[0], float):
            lst = field(2, field(1, struct.pack(f"<{len(values)}f", *values)))
        elif packed:
            lst = field(3, field(1, b"".join(varint(v) for v in values)))
        else:
            lst = field(3, b"".join(varint(1 << 3) + varint(v) for v in values))
        entries += field(1, field(1, key.encode()) + field(2, lst))
    return field(1, entries)


def tfrecord(records: list[bytes]) -> bytes:
    out = b""
    for r in records:
        head = struct.pack("<Q", len(r))
        out += head + struct.pack("<I", masked(head)) + r + struct.pack("<I", masked(r))
    return out


def picture(source: str, c: int, i: int) -> np.ndarray:
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = c * 7 % 256, i * 11 % 256, BLUE[source]
    pixels[0, :, 0] = np.arange(SIZE) * 30  # a ramp: a transposed image would not match
    return pixels


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def record(source: str, c: int, i: int) -> bytes:
    return example({"image": [png(picture(source, c, i))], "label": [c]})


# ------------------------------------------------------------------ the synthetic sources

TOY_SIZES = [5, 7, 4, 6, 9, 5, 4, 6, 5, 5, 7, 4]  # 6 train, 3 val, 3 test classes
OMNI_SUPERS = [3, 4, 3, 3]  # 2 train superclasses, 1 val, 1 test
AIR_SIZES = [6, 4, 5, 5, 4, 6, 5, 4, 5]  # 3 / 3 / 3


def flat_spec(name: str, sizes: list[int], per_split=(6, 3, 3), split_key=str) -> dict:
    return {
        "__class__": "DatasetSpecification",
        "name": name,
        "classes_per_split": dict(zip(map(split_key, ("TRAIN", "VALID", "TEST")), per_split)),
        "images_per_class": {str(c): n for c, n in enumerate(sizes)},
        "class_names": {str(c): f"{name}-{c}" for c in range(len(sizes))},
        "path": "/path/to/records",
        "file_pattern": "{}.tfrecords",
    }


def omniglot_spec() -> dict:
    n = sum(OMNI_SUPERS)
    return {
        "__class__": "BiLevelDatasetSpecification",
        "name": "omniglot",
        "superclasses_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 1},
        "classes_per_superclass": {str(s): k for s, k in enumerate(OMNI_SUPERS)},
        "images_per_class": {str(c): 4 for c in range(n)},
        "superclass_names": {str(s): f"alphabet{s}" for s in range(4)},
        "class_names": {str(c): f"char{c}" for c in range(n)},
        "path": "/path",
        "file_pattern": "{}.tfrecords",
    }


# ILSVRC: per split a small WordNet DAG; its leaves are the split's classes (ids by split, sorted
# by wn_id). "x" spans all; "a" and "b" 3 leaves each; "c" (a second parent of l3) spans 2.
ILSVRC_DAG = {
    "TRAIN": {"x": ["a", "b"], "a": ["l1", "l2", "l3"], "b": ["l4", "l5", "l6"], "c": ["l3", "l4"]},
    "VALID": {"y": ["m1", "m2", "m3"]},
    "TEST": {"z": ["t1", "t2", "t3"]},
}


def ilsvrc_spec() -> dict:
    subgraphs, counts, names, c = {}, {}, {}, 0
    for split, edges in ILSVRC_DAG.items():
        nodes = set(edges) | {k for kids in edges.values() for k in kids}
        subgraphs[split] = [
            {"wn_id": n, "words": n, "children_ids": edges.get(n, []), "parents_ids": []}
            for n in sorted(nodes)
        ]
        leaves = sorted(n for n in nodes if n not in edges)
        counts[split] = {n: 4 + i for i, n in enumerate(leaves)}
        counts[split].update({n: 99 for n in edges})  # internal nodes: images spanned
        for leaf in leaves:
            names[str(c)], c = leaf, c + 1
    return {
        "__class__": "HierarchicalDatasetSpecification",
        "name": "ilsvrc_2012",
        "split_subgraphs": subgraphs,
        "images_per_class": counts,
        "class_names": names,
        "path": "/path",
        "file_pattern": "{}.tfrecords",
    }


def spec_sizes(spec: dict) -> dict[int, int]:
    return {c: n for split in SPLITS for c, n in spec_classes(spec)[split]}


def spec_classes(spec: dict) -> dict[str, list[tuple[int, int]]]:
    parsed = md.parse_spec(spec, "test")
    return {s: [(c, parsed.totals[c]) for c in parsed.classes[s]] for s in SPLITS}


def write_records(root: Path, name: str, spec: dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    for c, n in spec_sizes(spec).items():
        (folder / f"{c}.tfrecords").write_bytes(tfrecord([record(name, c, i) for i in range(n)]))
    return folder


def write_tfds(root: Path, name: str, spec: dict, shards: int = 2) -> Path:
    """md_tfds's layout: records of all classes in class order, cut into shards."""
    folder = root / "meta_dataset" / name / "1.0.0"
    folder.mkdir(parents=True)
    records, relative, start = [], {}, 0
    for split, tfds_split in zip(SPLITS, ("train", "valid", "test")):
        relative[tfds_split] = {}
        for rel, (c, n) in enumerate(spec_classes(spec)[split]):
            relative[tfds_split][str(rel)] = [start, start + n]
            for i in range(n):
                image = png(picture(name, c, i))
                records.append(
                    example({"image": [image], "format": [b"png"], "filename": [b"f.png"],
                             "label": [c], "class_name": [f"{name}-{c}".encode()]})
                )  # fmt: skip
            start += n
    meta = {"dataset_specs": {"v1": spec}, "relative_class_slices": {"v1": relative}}
    (folder / "metadata.json").write_text(json.dumps(meta))
    (folder / "dataset_info.json").write_text(json.dumps({"name": "meta_dataset"}))
    (folder / "features.json").write_text("{}")
    cuts = np.array_split(np.arange(len(records)), shards)
    for k, idx in enumerate(cuts):
        shard = folder / f"meta_dataset-all_classes.tfrecord-{k:05d}-of-{shards:05d}"
        shard.write_bytes(tfrecord([records[i] for i in idx]))
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("md")
    write_records(root, "toy", flat_spec("toy", TOY_SIZES, split_key=lambda s: f"Split.{s}"))
    write_records(root, "omniglot", omniglot_spec())
    write_records(root, "ilsvrc_2012", ilsvrc_spec())
    ts = flat_spec("traffic_sign", [4, 5, 4, 6], per_split=(0, 0, 4))
    write_records(root, "traffic_sign", ts)
    write_tfds(root, "aircraft", flat_spec("aircraft", AIR_SIZES, per_split=(3, 3, 3)))
    return root


def config(root: Path, **settings) -> MetaDatasetConfig:
    base = dict(root=str(root), sources=["toy"], image_size=SIZE, min_way=3, max_way=5,
                max_query=2, max_support=12, max_support_per_class=4)  # fmt: skip
    return MetaDatasetConfig(**{**base, **settings})


# ------------------------------------------------------------------ TFRecord and Example


def test_crc32c_known_vectors():
    assert md.crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value
    assert md.crc32c(b"") == 0
    assert md.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4
    assert md.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert md.crc32c(bytes(range(32))) == 0x46DD794E
    rng = np.random.default_rng(0)
    for n in (1, 255, 2047, 2048, 2049, 4097, 9000):  # both sides of the vectorised path
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert md.crc32c(data) == crc32c_bitwise(data), n
        assert md.masked_crc(data) == masked(data)


def test_example_decodes_what_was_encoded():
    features = {"image": [b"\x00\xffpixels", b""], "label": [3, -2, 2**40], "w": [0.5, -1.25]}
    assert md.parse_example(example(features)) == features
    assert md.parse_example(example({"label": [7, -1]}, packed=False)) == {"label": [7, -1]}
    assert md.parse_example(b"") == {}


def test_tfrecord_framing_round_trips_and_skips(tmp_path):
    path = tmp_path / "r.tfrecords"
    records = [b"a", b"b" * 3000, b""]
    path.write_bytes(tfrecord(records))
    assert [r for _, r in md.read_tfrecords(path)] == records
    assert [r for _, r in md.read_tfrecords(path, lambda i: i != 1)] == [b"a", None, b""]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-3], "record 1 is truncated"),
        (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "record 0 fails its CRC-32C check"),
        (lambda b: b[:3] + bytes([b[3] ^ 1]) + b[4:], "record 0 has a length that fails"),
        (lambda b: b + b"\x01\x02", "record 2 is truncated"),
    ],
)
def test_a_damaged_tfrecord_file_is_an_error_naming_it(tmp_path, damage, message):
    path = tmp_path / "3.tfrecords"
    path.write_bytes(damage(tfrecord([b"first record!" * 3, b"second"])))
    with pytest.raises(DataError, match=message) as e:
        list(md.read_tfrecords(path))
    assert str(path) in str(e.value)


# ------------------------------------------------------------------ reading both forms


def expected_part(name: str, spec: dict, split: str, cap: int | None = None):
    sizes = spec_classes(spec)[split]
    counts = [min(n, cap) if cap else n for _, n in sizes]
    images = [picture(name, c, i) for (c, _), k in zip(sizes, counts) for i in range(k)]
    return np.stack(images), np.array(counts), np.array([n for _, n in sizes])


@pytest.mark.parametrize(
    "name, spec, cap",
    [
        ("toy", flat_spec("toy", TOY_SIZES), None),
        ("toy", flat_spec("toy", TOY_SIZES), 5),
        ("omniglot", omniglot_spec(), None),
        ("ilsvrc_2012", ilsvrc_spec(), None),
        ("aircraft", flat_spec("aircraft", AIR_SIZES, per_split=(3, 3, 3)), 4),
    ],
)
def test_both_forms_read_each_splits_classes_and_images(root, name, spec, cap):
    found = md.find_source(name, str(root))
    assert found.form == ("md_tfds" if name == "aircraft" else "records")
    for split in SPLITS:
        part = md.load_part(found, split, SIZE, cap)
        images, counts, totals = expected_part(name, spec, split, cap)
        np.testing.assert_array_equal(part.counts, counts)
        np.testing.assert_array_equal(part.totals, totals)
        np.testing.assert_array_equal(part.images, images)


def test_the_hierarchies_are_read_as_groups(root):
    omni = md.find_source("omniglot", str(root)).spec
    assert omni.classes == {"train": list(range(7)), "val": [7, 8, 9], "test": [10, 11, 12]}
    assert omni.groups["train"] == [(0, 1, 2), (3, 4, 5, 6)] and omni.groups["val"] == [(0, 1, 2)]
    ilsvrc = md.find_source("ilsvrc_2012", str(root)).spec
    assert ilsvrc.dag and ilsvrc.classes["test"] == [9, 10, 11]
    assert ilsvrc.groups["train"] == [(0, 1, 2), (3, 4, 5), (2, 3), (0, 1, 2, 3, 4, 5)]  # a b c x
    assert ilsvrc.totals[0] == 4 and ilsvrc.totals[5] == 9


def test_images_are_resized_once_to_rgb(tmp_path):
    spec = flat_spec("toy", [2, 2, 2], per_split=(1, 1, 1))
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    gray = Image.fromarray(np.full((20, 30), 200, np.uint8))  # grayscale, not square
    for c in range(3):
        (folder / f"{c}.tfrecords").write_bytes(
            tfrecord([example({"image": [png(np.asarray(gray))], "label": [c]})] * 2)
        )
    part = md.load_part(md.find_source("toy", str(tmp_path)), "val", 6, None)
    assert part.images.shape == (2, 6, 6, 3) and np.all(part.images == 200)


def test_the_cache_is_reused_and_a_damaged_one_rebuilt(root, monkeypatch, caplog, tmp_path):
    found = md.find_source("toy", str(root))
    first = md.load_part(found, "train", SIZE, None)
    (cached,) = (tmp_path / "xdg" / "metalearn" / "meta_dataset").glob("toy-train-*.npz")
    real = md.read_tfrecords
    monkeypatch.setattr(md, "read_tfrecords", lambda *a: pytest.fail("read the records again"))
    np.testing.assert_array_equal(md.load_part(found, "train", SIZE, None).images, first.images)
    cached.write_bytes(cached.read_bytes()[:100])  # a damaged cache file
    monkeypatch.setattr(md, "read_tfrecords", real)
    with caplog.at_level("WARNING", logger="metalearn"):
        again = md.load_part(found, "train", SIZE, None)
    assert "Discarded the cache file" in caplog.text
    np.testing.assert_array_equal(again.images, first.images)


def test_a_missing_source_names_the_folders_and_forms(tmp_path):
    with pytest.raises(DataError) as e:
        md.find_source("fungi", str(tmp_path))
    message = str(e.value)
    for text in (str(tmp_path / "fungi"), str(tmp_path / "meta_dataset" / "fungi"),
                 "dataset_spec.json", "convert_datasets_to_records", "tfds build md_tfds",
                 "data.root", "METALEARN_DATA"):  # fmt: skip
        assert text in message
    assert "\n" not in message
    with pytest.raises(DataError, match="data.root is not set, and neither is the METALEARN"):
        md.find_source("fungi", None)


def test_damaged_or_partial_sources_are_errors_naming_them(root, tmp_path):
    bad = tmp_path / "bad"
    folder = write_records(bad, "toy", flat_spec("toy", TOY_SIZES))
    (folder / "4.tfrecords").unlink()
    with pytest.raises(DataError, match=r"lacks 1 of the class files .*4\.tfrecords"):
        md.find_source("toy", str(bad))
    (folder / "4.tfrecords").write_bytes(b"garbage!" * 3)
    found = md.find_source("toy", str(bad))
    with pytest.raises(DataError, match=f"{folder / '4.tfrecords'} is damaged: record 0"):
        md.load_part(found, "train", SIZE, None)
    (folder / "4.tfrecords").write_bytes(tfrecord([example({"label": [4]})] * 9))
    with pytest.raises(DataError, match="record 0 of .*4.tfrecords has no 'image'"):
        md.load_part(found, "train", SIZE, None)
    (folder / "dataset_spec.json").write_text('{"__class__": "Something"}')
    with pytest.raises(DataError, match="is not a Meta-Dataset specification"):
        md.find_source("toy", str(bad))
    tfds = md.find_source("aircraft", str(root)).folder
    shards = tmp_path / "shards" / "meta_dataset" / "aircraft" / "1.0.0"
    shards.mkdir(parents=True)
    for p in tfds.iterdir():
        if not p.name.endswith("00001-of-00002"):
            (shards / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="holds 1 of its 2 shards"):
        md.find_source("aircraft", str(tmp_path / "shards"))


def test_metalearn_data_and_its_meta_dataset_subfolder_are_looked_in(root, monkeypatch):
    monkeypatch.setenv("METALEARN_DATA", str(root))
    assert md.find_source("aircraft", None).form == "md_tfds"  # in meta_dataset/aircraft/1.0.0
    assert md.find_source("toy", None).folder == root / "toy"


def test_splits_that_cannot_make_episodes_fail_before_reading(root, tmp_path):
    with pytest.raises(DataError, match="has no meta-train classes .*traffic_sign has 0"):
        md.make_source(config(root, sources=["traffic_sign"]))
    with pytest.raises(DataError, match="toy has 3 meta-validation classes, fewer than data.min"):
        md.make_source(config(root, min_way=4, max_way=5))
    with pytest.raises(DataError, match="A superclass of omniglot's meta-train classes has 3"):
        md.make_source(config(root, sources=["omniglot"], min_way=4, max_way=5))
    small = tmp_path / "small"
    write_records(small, "toy", flat_spec("toy", [3, 1, 4, 5, 3, 3, 3, 3, 3, 3, 3, 3]))
    with pytest.raises(DataError, match=r"class 1 \(toy-1\) of toy has 1 image"):
        md.make_source(config(small))


# ------------------------------------------------------------------ episodes

SHAPE = md.Shape(min_way=3, max_way=8, max_query=4, max_support=30, max_support_per_class=10,
                 draws=40)  # fmt: skip
COUNTS = np.array([2, 3, 40, 9, 12, 5, 7, 30, 4, 16, 6, 25])


def arrays(counts=COUNTS, groups=None, dag=False, size=2) -> md.EpisodeArrays:
    """A split of len(counts) classes whose image i has pixel values (i % 256, i // 256, 0)."""
    n = int(counts.sum())
    images = np.zeros((n, size, size, 3), np.uint8)
    images[..., 0], images[..., 1] = (
        (np.arange(n) % 256)[:, None, None],
        (np.arange(n) // 256)[:, None, None],
    )
    part = md.Part(images, counts.astype(np.int32), (counts * 10).astype(np.int32))
    return md.episode_arrays([(part, groups or [], dag)])


PLANS = jax.jit(jax.vmap(md.plan_episode, in_axes=(0, None, None)), static_argnums=2)


@pytest.fixture(scope="module")
def plans():
    a = arrays()
    return a, jax.device_get(PLANS(jax.random.split(jax.random.PRNGKey(0), 2000), a, SHAPE))


def test_episodes_follow_algorithm_1(plans):
    a, p = plans
    offsets, counts = np.asarray(a.offsets), np.asarray(a.counts)
    for e in range(200):
        n, q = int(p.n_way[e]), int(p.n_query[e])
        classes, shots = p.classes[e][:n], p.shots[e][:n]
        assert SHAPE.min_way <= n <= SHAPE.max_way and len(set(classes)) == n
        assert q == min(SHAPE.max_query, (counts[classes] // 2).min())
        left = counts[classes] - q
        assert np.all(shots >= 1) and np.all(shots <= left) and np.all(p.shots[e][n:] == 0)
        assert shots.sum() <= min(
            SHAPE.max_support, np.minimum(SHAPE.max_support_per_class, left).sum()
        )
        s_slot, q_slot = p.support_slot[e], p.query_slot[e]
        assert np.array_equal(np.bincount(s_slot[s_slot >= 0], minlength=n), shots)
        assert np.array_equal(np.bincount(q_slot[q_slot >= 0], minlength=n), np.full(n, q))
        assert np.all(s_slot[shots.sum() :] == -1)  # real slots first, then padding
        for slot in range(n):
            lo, hi = offsets[classes[slot]], offsets[classes[slot]] + counts[classes[slot]]
            sup, qry = p.support[e][s_slot == slot], p.query[e][q_slot == slot]
            assert np.all((lo <= sup) & (sup < hi)) and np.all((lo <= qry) & (qry < hi))
            assert len(set(sup) | set(qry)) == len(sup) + len(qry)  # distinct, disjoint


def test_the_way_is_uniform_and_every_class_is_drawn(plans):
    _, p = plans
    ways = np.bincount(p.n_way, minlength=SHAPE.max_way + 1)[SHAPE.min_way :]
    expected = len(p.n_way) / len(ways)
    chi2 = ((ways - expected) ** 2 / expected).sum()
    assert chi2 < 25, ways  # 5 degrees of freedom: 20.5 is the 0.1% tail
    drawn = np.bincount(p.classes[np.arange(SHAPE.max_way)[None] < p.n_way[:, None]], minlength=12)
    share = drawn / drawn.sum()
    assert np.all(np.abs(share - 1 / 12) < 0.02), share  # classes uniformly


def test_larger_classes_get_larger_support_shares(plans):
    a, p = plans
    counts = np.asarray(a.counts)
    big, small = [], []
    for e in range(len(p.n_way)):
        n = int(p.n_way[e])
        cls, shots = p.classes[e][:n], p.shots[e][:n]
        both = [i for i in range(n) if cls[i] in (2, 9)]  # 40 and 16 images
        if len(both) == 2 and p.n_query[e] == 1:
            i, j = both if cls[both[0]] == 2 else both[::-1]
            big.append(shots[i]), small.append(shots[j])
    assert np.mean(big) > np.mean(small) and counts[2] > counts[9]


def test_a_sampled_task_is_padded_and_labelled(plans):
    a, _ = plans

    @jax.jit
    @jax.vmap
    def draw(key):
        plan = md.plan_episode(key, a, SHAPE)
        return plan, md.sample_episode(key, a, SHAPE, False), md.sample_episode(key, a, SHAPE, True)

    plans_, local, by_class = jax.device_get(draw(jax.random.split(jax.random.PRNGKey(3), 5)))
    assert local.support.x.shape == (5, SHAPE.max_support, 2, 2, 3)
    assert local.query.x.shape == (5, SHAPE.max_way * SHAPE.max_query, 2, 2, 3)
    for e in range(5):
        plan = jax.tree.map(lambda v, e=e: v[e], plans_)
        for task, global_labels in ((local, False), (by_class, True)):
            task = jax.tree.map(lambda v, e=e: v[e], task)
            for split, index, slot in ((task.support, plan.support, plan.support_slot),
                                       (task.query, plan.query, plan.query_slot)):  # fmt: skip
                x, y, mask = split
                assert x.dtype == np.float32 and y.dtype == np.int32 and mask.dtype == bool
                assert np.array_equal(mask, slot >= 0)
                assert np.all(y[~mask] == -1) and np.all(x[~mask] == 0)
                pixels = np.round(x[mask] * 255).astype(int)
                assert np.array_equal(pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 0, 1], index[mask])
                labels = plan.classes[slot[mask]] if global_labels else slot[mask]
                assert np.array_equal(y[mask], labels)
        real = local.support.y[e][local.support.mask[e]]
        assert set(real.tolist()) == set(range(int(plan.n_way)))  # labels 0..N-1


def test_groups_and_dag_nodes_confine_episodes():
    counts = np.full(10, 6)
    groups = [(0, 1, 2), (3, 4, 5, 6, 7, 8, 9)]
    keys = jax.random.split(jax.random.PRNGKey(1), 400)
    for dag in (False, True):
        p = jax.device_get(PLANS(keys, arrays(counts, groups, dag), SHAPE))
        seen = set()
        for e in range(len(keys)):
            chosen = set(p.classes[e][: p.n_way[e]].tolist())
            group = next(g for g in groups if chosen <= set(g))
            seen.add(group)
            if dag:  # all of a node's classes, up to max_way
                assert len(chosen) == min(len(group), SHAPE.max_way)
        assert seen == set(groups)
        picked_small = np.mean([p.classes[e][0] < 3 for e in range(len(keys))])
        assert 0.4 < picked_small < 0.6  # groups with equal odds


def test_the_task_source_serves_every_split(root):
    cfg = config(root, sources=["toy", "omniglot", "ilsvrc_2012", "aircraft", "traffic_sign"])
    source = md.make_source(cfg)
    assert source.kind == "classification" and source.n_out == 5 and source.episodes is None
    assert source.input_shape == (SIZE, SIZE, 3)
    assert source.n_train_classes == 6 + 7 + 6 + 3  # traffic_sign has no training classes
    assert source.splits["test"].counts.shape == (3 + 3 + 3 + 3 + 4,)
    np.testing.assert_allclose(np.asarray(source.splits["test"].group_p).sum(), 1, rtol=1e-6)
    keys = jax.random.split(jax.random.PRNGKey(2), 8)
    sample = jax.vmap(source.sample, in_axes=(0, None, None))
    for split in SPLITS:  # evaluation traces the same sampler on val and test
        tasks = jax.eval_shape(sample, keys, source.splits[split], False)
        assert tasks.support.x.shape == (8, 12, SIZE, SIZE, 3)
        assert tasks.query.mask.shape == (8, 10)
    tasks = jax.jit(sample, static_argnums=2)(keys, source.splits["test"], False)
    assert np.all(np.asarray(tasks.query.mask).sum(1) >= 3)


# ------------------------------------------------------------------ the schema


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"min_way": 1}, "data.min_way=1 is not allowed: it must be >= 2"),
        (
            {"min_way": 9, "max_way": 8},
            r"data.max_way=8 is not allowed: it must be >= 9 \(data.min",
        ),
        ({"max_query": 0}, "data.max_query=0 is not allowed"),
        (
            {"max_support": 20},
            r"data.max_support=20 is not allowed: it must be >= 50 \(data.max_way",
        ),
        ({"image_size": 4}, "data.image_size=4 is not allowed"),
        ({"max_per_class": 1}, "data.max_per_class=1 is not allowed"),
        ({"sources": []}, r"data.sources=\[\] is not allowed"),
        ({"sources": ["a/b"]}, "is not allowed: give one or more distinct source folder names"),
        ({"sources": ["dtd", "dtd"]}, "is not allowed: give one or more distinct"),
        ({"md_version": "v3"}, "data.md_version='v3' is not allowed"),
        ({"k_shot": 5}, "do not apply to data=meta_dataset"),
        ({"root": " "}, "data.root=' ' is not allowed"),
        ({"max_support_per_class": 0}, "data.max_support_per_class=0 is not allowed"),
    ],
)
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        MetaDatasetConfig(**settings)


def composed(overrides):
    from metalearn.config import register_schemas, to_config

    register_schemas()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_config(compose("config", overrides=overrides), overrides)


def test_hydra_composes_the_option_with_conv4(root):
    cfg = composed(["data=meta_dataset", f"data.root={root}", "data.sources=[toy,omniglot]",
                    "algo=protonet"])  # fmt: skip
    assert isinstance(cfg.data, MetaDatasetConfig) and cfg.data.sources == ["toy", "omniglot"]
    assert (cfg.data.max_way, cfg.data.max_support, cfg.data.max_per_class) == (50, 500, 200)
    assert cfg.model.name == "conv4" and cfg.model.downsample == "maxpool"
    with pytest.raises(ConfigError, match="data.min_way=1 is not allowed"):
        composed(["data=meta_dataset", "algo=protonet", "data.min_way=1"])


@pytest.mark.slow  # compiles and runs a protonet training run in this process
def test_metalearn_train_runs_protonet_on_meta_dataset(root, tmp_path, monkeypatch):
    from metalearn import cli

    run = tmp_path / "run"
    argv = ["metalearn", "train", "data=meta_dataset", f"data.root={root}",
            "data.sources=[toy,aircraft]", "data.image_size=16", "data.min_way=3",
            "data.max_way=4", "data.max_query=2", "data.max_support=8", "algo=protonet",
            "model.hidden=8", "train.steps=2", "train.meta_batch=2", "eval.every=2",
            "eval.val_tasks=4", "eval.num_tasks=4", "progress=false",
            f"hydra.run.dir={run}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["data"] == "meta_dataset"
    assert 0 <= summary["test"]["accuracy"] <= 1
