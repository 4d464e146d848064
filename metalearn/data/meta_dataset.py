"""data=meta_dataset: Meta-Dataset (Triantafillou et al. 2020), variable-way variable-shot episodes
of one or more of its sources (aircraft, cu_birds, dtd, fungi, ilsvrc_2012, mscoco, omniglot,
quickdraw, traffic_sign, vgg_flower), read from local files without TensorFlow. Per source, the
first form found in data.root (or $METALEARN_DATA), then in its subfolder meta_dataset/:

1. records: `<source>/dataset_spec.json` and a `<class id>.tfrecords` (or `<id>_<shard>`) file
   per class, as google-research/meta-dataset's dataset_conversion scripts write them; each
   record a tf.train.Example with `image` (encoded JPEG / PNG) and `label`.
2. md_tfds: `<source>/<version>/` (e.g. meta_dataset/omniglot/1.0.0/) holding metadata.json and
   the shards `meta_dataset-all_classes.tfrecord-NNNNN-of-MMMMM` of `tfds build md_tfds`;
   metadata.json's relative_class_slices say which records are which class, for the protocol
   data.md_version (v1: the paper's; v2: VTAB+MD's).

A split's classes are the spec's (get_classes: ids numbered TRAIN, then VALID, then TEST; by
superclass for Omniglot's bi-level spec, the leaves of each split's WordNet subgraph for ILSVRC's
hierarchical one). A source serves the splits it has classes in (traffic_sign and mscoco: test
and val only). Each (source, split) is decoded once with PIL to data.image_size RGB and cached
as one flat uint8 array [images, S, S, 3] with each class's count (its first data.max_per_class
images), in `$XDG_CACHE_HOME/metalearn/meta_dataset/`, keyed by the files' names, sizes and
mtimes and the settings; flat, since class sizes range from 20 (Omniglot) to 100,000+.

Episodes follow Algorithm 1 and meta-dataset's data/sampling.py, on the device: a way N uniform
in [min_way, min(max_way, classes)], N classes without replacement, q = min(max_query,
min_c floor(count_c / 2)) queries per class, a support budget |S| = min(max_support,
sum_c floor(beta * min(max_support_per_class, count_c - q) + 1)), beta ~ U[0, 1), and
k_c = min(floor(R_c (|S| - N)) + 1, count_c - q) support images, R_c proportional to
exp(U(log 0.5, log 2)) * images_c. images_c is the class's size in the spec, so capping what is
stored keeps the class imbalance. Episodes are padded to max_support support and max_way *
max_query query slots (types.Split's mask: padded slots have label -1 and zero pixels). With
data.hierarchy, as Meta-Dataset: Omniglot's episodes come from one alphabet drawn uniformly (the
way uniform up to its size), ILSVRC's take the leaves below one WordNet node spanning min_way to
392 of them, subsampled to max_way (no way drawn). With several sources, each episode comes
from one source drawn uniformly. Not implemented: example-level pools (`{}_{}` files are read
as shards of one pool), fixed-way / fixed-shot episodes, min_examples_in_class,
ignore_hierarchy_probability, and per-source results (evaluate one source at a time for them).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from metalearn import registry
from metalearn.checks import MAX_EXAMPLES, at_most, choice, require
from metalearn.data.base import SPLITS, DataConfig, DataError, TaskSource, open_images, scale_pixels
from metalearn.data.imagenet_files import decode_image, default_cache_dir
from metalearn.data.omniglot import read_cache_file, write_cache_file
from metalearn.types import Split, Task

log = logging.getLogger("metalearn")

_CACHE_VERSION = 1  # bump when preprocessing changes, so old cache files are not reused
_SPLIT_KEYS = {"TRAIN": "train", "VALID": "val", "TEST": "test"}  # the spec's Split names
_TFDS_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # metadata.json's names
_MAX_SPANNING_LEAVES = 392  # sampling.py: DAG nodes spanning more leaves are not eligible
_LOG_WEIGHTS = (math.log(0.5), math.log(2.0))  # sampling.py's min / max log-weight

# ---------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord framing checks it


def _crc_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    return t


_TABLE = _crc_table()
_TABLE_INTS = _TABLE.tolist()
_BASIS = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
_LANE = 64  # bytes per lane of the vectorised CRC (short lanes: few Python iterations)


def _byte_tables(columns: np.ndarray) -> np.ndarray:
    """A GF(2)-linear map of 32-bit registers, given by the images of its 32 basis vectors, as
    four 256-entry tables (one per register byte): applying it is 4 lookups and 3 XORs."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # [256, 8]
    tables = np.zeros((4, 256), np.uint32)
    for j in range(4):
        picked = np.where(bits == 1, columns[8 * j : 8 * j + 8][None, :], 0).astype(np.uint32)
        tables[j] = np.bitwise_xor.reduce(picked, axis=1)
    return tables


def _apply(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.bitwise_xor.reduce([tables[j][(x >> (8 * j)) & 255] for j in range(4)])


def _zero_shifts(levels: int = 40) -> list[np.ndarray]:
    """shifts[i]: the register's change over 2**i zero bytes (a CRC's state is linear in it)."""
    shifts = [_byte_tables(_TABLE[_BASIS & 255] ^ (_BASIS >> 8))]
    for _ in range(1, levels):
        prev = shifts[-1]
        shifts.append(_byte_tables(_apply(prev, _apply(prev, _BASIS))))
    return shifts


_SHIFTS = _zero_shifts()


def crc32c(data: bytes | memoryview) -> int:
    """The CRC-32C of data. Long inputs are cut into lanes whose CRCs are computed side by side
    (numpy over lanes, a Python loop over the 64 bytes of a lane), then combined pairwise with
    the zero-byte shift of the CRC's linear register, so a MB costs ~10 ms, not a second."""
    n = len(data)
    if n < 32 * _LANE:  # short records: the scalar loop is faster
        crc = 0xFFFFFFFF
        for b in bytes(data):
            crc = _TABLE_INTS[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    raw = np.frombuffer(data, np.uint8).astype(np.uint32)
    raw[:4] ^= 0xFF  # the initial register 0xFFFFFFFF, as the first 4 bytes XORed with it
    lanes = -(-n // _LANE)
    lanes += lanes % 2  # an even number, for the pairwise combine
    padded = np.zeros(lanes * _LANE, np.uint32)
    padded[-n:] = raw  # leading zeros leave a zero register unchanged
    rows = padded.reshape(lanes, _LANE).T.copy()
    regs = np.zeros(lanes, np.uint32)
    for row in rows:
        regs = _TABLE[(regs ^ row) & 255] ^ (regs >> 8)
    level = int(math.log2(_LANE))
    while len(regs) > 1:
        if len(regs) % 2:
            regs = np.concatenate([np.zeros(1, np.uint32), regs])
        regs = _apply(_SHIFTS[level], regs[0::2]) ^ regs[1::2]
        level += 1
    return int(regs[0]) ^ 0xFFFFFFFF


def masked_crc(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits, plus a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# TFRecord files and tf.train.Example records


def read_tfrecords(
    path: Path, keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, bytes | None]]:
    """(index, record) for each record of a TFRecord file; records `keep` refuses are skipped
    unread (None). A bad CRC or a truncated record is a DataError naming the file and record."""

    def damaged(i: int, what: str) -> DataError:
        return DataError(
            f"{path} is damaged: record {i} {what}. Replace the file with a fresh copy (or "
            "convert the source again)."
        )

    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e}).") from None
    with f:
        size, i = os.fstat(f.fileno()).st_size, 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise damaged(i, "is truncated (the file ends inside its length header)")
            (length,) = struct.unpack("<Q", head[:8])
            if masked_crc(head[:8]) != struct.unpack("<I", head[8:])[0]:
                raise damaged(i, "has a length that fails its CRC-32C check")
            if f.tell() + length + 4 > size:
                raise damaged(i, f"is truncated (it needs {length} bytes; the file ends first)")
            if keep is not None and not keep(i):
                f.seek(length + 4, os.SEEK_CUR)
                yield i, None
            else:
                data, crc = f.read(length), f.read(4)
                if masked_crc(data) != struct.unpack("<I", crc)[0]:
                    raise damaged(i, "fails its CRC-32C check")
                yield i, data
            i += 1


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("a varint runs past the end of its message")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if b < 0x80:
            return value, pos


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message: an int for varints, bytes for
    fixed 32/64-bit values, a memoryview for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = bytes(buf[pos : pos + width]), pos + width
        else:
            raise ValueError(f"field {number} has the unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire, value


def _feature(buf: memoryview) -> list:
    """A tf.train.Feature: bytes_list = 1, float_list = 2, int64_list = 3 (packed or not)."""
    values: list = []
    for kind, _, lst in _fields(buf):
        if not isinstance(lst, memoryview):
            raise ValueError(f"Feature field {kind} is not a list")
        values = []
        for _, wire, v in _fields(lst):
            if kind == 1:
                values.append(bytes(v))
            elif kind == 2:  # packed (wire type 2) or one fixed32 (wire type 5)
                values.extend(np.frombuffer(v, "<f4").tolist())
            elif kind == 3 and wire == 0:
                values.append(v - (1 << 64) if v >= 1 << 63 else v)
            elif kind == 3 and wire == 2:
                pos = 0
                while pos < len(v):
                    x, pos = _varint(v, pos)
                    values.append(x - (1 << 64) if x >= 1 << 63 else x)
    return values


def parse_example(record: bytes) -> dict[str, list]:
    """A serialized tf.train.Example as {feature name: its list of values}."""
    features: dict[str, list] = {}
    for number, _, msg in _fields(memoryview(record)):
        if number != 1 or not isinstance(msg, memoryview):
            continue  # Example.features is field 1
        for entry_number, _, entry in _fields(msg):
            if entry_number != 1 or not isinstance(entry, memoryview):
                continue  # Features.feature: a map, entries of (key = 1, value = 2)
            key, value = "", []
            for n, _, v in _fields(entry):
                if n == 1:
                    key = bytes(v).decode("utf-8", errors="replace")
                elif n == 2:
                    value = _feature(v)
            features[key] = value
    return features


# ---------------------------------------------------------------------------------------------
# Dataset specifications (meta_dataset/data/dataset_spec.py, as to_dict writes them)


class Spec(NamedTuple):
    classes: dict[str, list[int]]  # split -> its class ids, in order
    totals: dict[int, int]  # class id -> images in the source
    names: dict[int, str]
    groups: dict[str, list[tuple[int, ...]]]  # split -> hierarchy groups (positions in split)
    dag: bool  # groups are DAG nodes: an episode takes all (up to max_way) of a group's classes
    pattern: str  # file_pattern: "{}.tfrecords" or "{}_{}.tfrecords"


def parse_spec(d: Any, where: str) -> Spec:
    """The classes per split, image counts and hierarchy of a dataset_spec.json record."""
    try:
        kind = d["__class__"]
        pattern = d.get("file_pattern", "{}.tfrecords")
        names = {int(k): str(v) for k, v in d.get("class_names", {}).items()}
        if kind == "DatasetSpecification":
            per_split = _by_split(d["classes_per_split"])
            classes, groups = _consecutive(per_split), {}
            totals = {int(k): _count(v) for k, v in d["images_per_class"].items()}
        elif kind == "BiLevelDatasetSpecification":
            classes, groups = _bilevel(d)
            totals = {int(k): _count(v) for k, v in d["images_per_class"].items()}
        elif kind == "HierarchicalDatasetSpecification":
            classes, groups, totals = _hierarchical(d, names)
        else:
            raise ValueError(f"__class__ {kind!r} is none of meta-dataset's specifications")
        missing = [c for split in SPLITS for c in classes[split] if c not in totals]
        if missing:
            raise ValueError(f"images_per_class lacks class {missing[0]}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(
            f"{where} is not a Meta-Dataset specification metalearn understands ("
            f"{type(e).__name__}: {e}): it reads the JSON of meta-dataset's DatasetSpecification, "
            "BiLevelDatasetSpecification and HierarchicalDatasetSpecification (their to_dict). "
            "Convert the source again with google-research/meta-dataset's scripts."
        ) from None
    if pattern not in ("{}.tfrecords", "{}_{}.tfrecords"):
        raise DataError(f"{where}: file_pattern {pattern!r} is none of meta-dataset's.")
    return Spec(classes, totals, names, groups, kind == "HierarchicalDatasetSpecification", pattern)


def _by_split(d: dict) -> dict[str, Any]:
    """A dict keyed by Split names ("TRAIN", or "Split.TRAIN") as metalearn's split names."""
    out = {_SPLIT_KEYS[str(k).split(".")[-1].upper()]: v for k, v in d.items()}
    if set(out) != set(SPLITS):
        raise ValueError(f"its splits are {sorted(d)}, not TRAIN, VALID and TEST")
    return out


def _count(v: Any) -> int:
    return sum(int(n) for n in v.values()) if isinstance(v, dict) else int(v)  # pools: merged


def _consecutive(per_split: dict[str, Any]) -> dict[str, list[int]]:
    """get_classes: class ids are numbered consecutively, TRAIN, then VALID, then TEST."""
    out, start = {}, 0
    for split in SPLITS:
        out[split] = list(range(start, start + int(per_split[split])))
        start += int(per_split[split])
    return out


def _bilevel(d: dict) -> tuple[dict[str, list[int]], dict[str, list[tuple[int, ...]]]]:
    """Omniglot: superclasses numbered TRAIN, VALID, TEST; classes by superclass in that order."""
    sizes = {int(k): int(v) for k, v in d["classes_per_superclass"].items()}
    supers = _consecutive(_by_split(d["superclasses_per_split"]))
    classes, groups, start = {}, {}, 0
    for split in SPLITS:
        groups[split], first = [], start
        for s in supers[split]:
            groups[split].append(tuple(range(start - first, start - first + sizes[s])))
            start += sizes[s]
        classes[split] = list(range(first, start))
    return classes, groups


def _hierarchical(d: dict, names: dict[int, str]):
    """ILSVRC: each split's classes are the leaves of its WordNet subgraph (numbered by split,
    as get_classes does); its groups, each internal node's spanning leaves."""
    ids = {wn: c for c, wn in names.items()}
    counts = _by_split(d["images_per_class"])
    classes, groups, totals = {}, {}, {}
    for split, nodes in _by_split(d["split_subgraphs"]).items():
        children = {n["wn_id"]: list(n["children_ids"]) for n in nodes}
        leaves = sorted(wn for wn, kids in children.items() if not kids)
        first = min((ids[wn] for wn in leaves), default=0)
        classes[split] = list(range(first, first + len(leaves)))
        if sorted(ids[wn] for wn in leaves) != classes[split]:
            raise ValueError(f"the {split} leaves are not consecutive class ids")
        totals.update({ids[wn]: int(counts[split][wn]) for wn in leaves})
        span = _spanning(children)
        groups[split] = [
            tuple(sorted(ids[leaf] - first for leaf in span[wn])) for wn in sorted(children)
            if children[wn]
        ]  # fmt: skip
    return classes, groups, totals


def _spanning(children: dict[str, list[str]]) -> dict[str, frozenset]:
    """The leaves below each node of a DAG (memoised: nodes share descendants)."""
    span: dict[str, frozenset] = {}

    def below(wn: str) -> frozenset:
        if wn not in span:
            kids = children[wn]
            span[wn] = frozenset(kids and frozenset().union(*map(below, kids)) or [wn])
        return span[wn]

    for wn in children:
        below(wn)
    return span


# ---------------------------------------------------------------------------------------------
# Finding a source on disk


class Found(NamedTuple):
    source: str
    form: str  # "records" | "md_tfds"
    folder: Path
    spec: Spec
    spec_files: tuple[Path, ...]  # what every split's cache key covers
    shards: tuple[Path, ...] = ()  # md_tfds: the shards, in order
    slices: dict[str, list[tuple[int, int]]] | None = None  # md_tfds: records of each class


def _bases(root: str | None) -> tuple[list[Path], str]:
    if root is not None:
        base, label = Path(root).expanduser(), f"data.root={root}"
    else:
        env = os.environ.get("METALEARN_DATA")
        if not env:
            raise DataError(
                "Meta-Dataset has no folder to be read from: data.root is not set, and neither "
                f"is the METALEARN_DATA environment variable. {_HOW}"
            )
        base, label = Path(env), f"METALEARN_DATA={env}"
    return [base, base / "meta_dataset"], label


_HOW = (
    "metalearn reads Meta-Dataset from local files and downloads nothing. Per source it reads "
    "either (1) the records of google-research/meta-dataset's conversion scripts "
    "(python -m meta_dataset.dataset_conversion.convert_datasets_to_records "
    "--dataset=SOURCE --records_root=DIR): DIR/SOURCE/ holding dataset_spec.json and one "
    "<class id>.tfrecords file per class; or (2) the md_tfds build (tfds build md_tfds, in "
    "meta_dataset/data/tfds): meta_dataset/SOURCE/1.0.0/ holding dataset_info.json, "
    "metadata.json and the shards meta_dataset-all_classes.tfrecord-*-of-*. Point data.root at "
    "the folder holding the source folders (the records root, or the TFDS data folder such as "
    "~/tensorflow_datasets), or set METALEARN_DATA to such a folder (or one whose subfolder "
    "meta_dataset/ is)."
)


def find_source(source: str, root: str | None, md_version: str = "v1") -> Found:
    """The first form of `source` found in the folders looked in, or a DataError."""
    bases, label = _bases(root)
    for base in bases:
        folder = base / source
        if (folder / "dataset_spec.json").is_file():
            return _records_form(source, folder)
        versions = sorted(
            (p for p in folder.glob("*") if (p / "dataset_info.json").is_file()),
            key=lambda p: [int(x) if x.isdigit() else 0 for x in p.name.split(".")],
        )
        if versions:
            return _tfds_form(source, versions[-1], md_version)
    looked = ", ".join(str(b / source) for b in bases)
    raise DataError(f"Meta-Dataset's {source!r} was not found at {label} (in {looked}). {_HOW}")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} does not read as JSON ({e}): restore it.") from None


def _class_files(folder: Path, spec: Spec, c: int) -> list[Path]:
    if spec.pattern == "{}.tfrecords":
        return [folder / f"{c}.tfrecords"]
    return sorted(folder.glob(f"{c}_*.tfrecords"))


def _records_form(source: str, folder: Path) -> Found:
    spec_file = folder / "dataset_spec.json"
    spec = parse_spec(_load_json(spec_file), str(spec_file))
    missing = [
        f"{c}.tfrecords"
        for split in SPLITS
        for c in spec.classes[split]
        if not any(p.is_file() for p in _class_files(folder, spec, c))
    ]
    if missing:
        raise DataError(
            f"{folder} lacks {len(missing)} of the class files its dataset_spec.json names "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the conversion "
            "did not finish, or the copy is partial. Convert the source again (google-research/"
            "meta-dataset's convert_datasets_to_records)."
        )
    return Found(source, "records", folder, spec, (spec_file,))


_SHARD = re.compile(r".+-all_classes\.tfrecord-(\d+)-of-(\d+)$")


def _tfds_form(source: str, folder: Path, md_version: str) -> Found:
    meta_file = folder / "metadata.json"  # which records are which class
    meta = _load_json(meta_file)
    try:
        spec_dict = meta["dataset_specs"][md_version]
        relative = meta["relative_class_slices"][md_version]
    except (KeyError, TypeError):
        raise DataError(
            f"{meta_file} holds no {md_version} protocol for {source} (md_tfds has v1 for every "
            "source and v2 for all but vgg_flower); set data.md_version to one it holds."
        ) from None
    spec = parse_spec(spec_dict, f"{meta_file} (dataset_specs.{md_version})")
    shards = sorted((p for p in folder.iterdir() if _SHARD.match(p.name)), key=lambda p: p.name)
    if not shards:
        other = sorted(p.name for p in folder.iterdir() if "all_classes" in p.name)[:2]
        hint = f" (it holds {', '.join(other)}: build with --file_format=tfrecord)" if other else ""
        raise DataError(f"{folder} holds no shards *-all_classes.tfrecord-*-of-*{hint}.")
    total = int(_SHARD.match(shards[0].name).group(2))
    if len(shards) != total:
        raise DataError(f"{folder} holds {len(shards)} of its {total} shards: the copy is partial.")
    try:
        slices = {
            s: [tuple(map(int, relative[_TFDS_SPLITS[s]][str(i)])) for i in range(len(c))]
            for s, c in spec.classes.items()
        }
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{meta_file}: relative_class_slices lacks classes of its spec.") from None
    return Found(source, "md_tfds", folder, spec, (meta_file,), tuple(shards), slices)


# ---------------------------------------------------------------------------------------------
# Reading a (source, split) once, and its cache


class Part(NamedTuple):
    images: np.ndarray  # uint8 [n, S, S, 3], class by class
    counts: np.ndarray  # int32 [C]: the images of each class in `images`
    totals: np.ndarray  # int32 [C]: each class's images in the source


def load_part(found: Found, split: str, size: int, cap: int | None) -> Part:
    """One source's split as arrays, decoded and cached on first use."""
    spec = found.spec
    files = list(found.spec_files)
    if found.form == "records":
        files += [p for c in spec.classes[split] for p in _class_files(found.folder, spec, c)]
    else:
        files += found.shards
    settings = f"v{_CACHE_VERSION} {found.source} {found.form} {split} {size}px max={cap or 0}"
    key = _fingerprint(files, settings)
    path = default_cache_dir("meta_dataset") / f"{found.source}-{split}-{size}px-{key}.npz"
    totals = np.array([spec.totals[c] for c in spec.classes[split]], np.int32)
    where = f"the {found.form} of {found.source} in {found.folder}"
    cached = read_cache_file(
        path, Part._fields, lambda a: _cache_problem(a, totals, size, cap), where
    )
    if cached is not None:
        return Part(**cached)
    started = time.perf_counter()
    log.info("reading Meta-Dataset %s %s from %s once into %s", found.source, split, where, path)
    part = _read_part(found, split, size, cap, totals)
    log.info(
        "Meta-Dataset %s %s: %d classes, %d images in %.1f s", found.source, split,
        len(totals), len(part.images), time.perf_counter() - started,
    )  # fmt: skip
    write_cache_file(path, part._asdict(), f"Meta-Dataset {found.source} {split}")
    return part


def _fingerprint(files: list[Path], settings: str) -> str:
    h = hashlib.sha256(settings.encode())
    for path in files:
        try:
            st = path.stat()
        except OSError as e:
            raise DataError(f"{path} cannot be read ({e.strerror or e}).") from None
        h.update(f"\n{path.name} {st.st_size} {st.st_mtime_ns}".encode(errors="replace"))
    return h.hexdigest()[:16]


def _cache_problem(a: dict, totals: np.ndarray, size: int, cap: int | None) -> str | None:
    images, counts, cached_totals = a["images"], a["counts"], a["totals"]
    if counts.dtype != np.int32 or counts.shape != totals.shape:
        return f"its counts are not {len(totals)} int32 numbers"
    if not np.array_equal(cached_totals, totals):
        return "its class sizes differ from the dataset's specification"
    limit = np.minimum(totals, cap) if cap else totals
    if counts.min(initial=2) < 2 or np.any(counts > limit):
        return "its counts do not fit the class sizes"
    shape = (int(counts.sum()), size, size, 3)
    if images.dtype != np.uint8 or images.shape != shape:
        return f"its images are {images.dtype} {list(images.shape)}, not uint8 {list(shape)}"
    return None


def _read_part(found: Found, split: str, size: int, cap: int | None, totals: np.ndarray) -> Part:
    want = np.minimum(totals, cap) if cap else totals.copy()
    images = np.zeros((int(want.sum()), size, size, 3), np.uint8)
    starts = np.concatenate([[0], np.cumsum(want)[:-1]]).astype(np.int64)
    got = np.zeros(len(want), np.int64)
    last = time.perf_counter()
    tfds = found.form == "md_tfds"
    items = (_tfds_items if tfds else _records_items)(found, split, want)
    for r, record, where in items:
        label = found.spec.classes[split][r] if tfds else None  # md_tfds: checked
        images[starts[r] + got[r]] = _decode(record, size, where, label)
        got[r] += 1
        if time.perf_counter() - last > 10:  # ILSVRC's train split takes minutes
            last = time.perf_counter()
            log.info("Meta-Dataset %s %s: %d of %d images read", found.source, split,
                     got.sum(), want.sum())  # fmt: skip
    short = np.flatnonzero(got < want)
    if len(short):
        r = short[0]
        if tfds or got[r] < 2:
            raise DataError(
                f"{found.folder}: class {found.spec.classes[split][r]} of {found.source} has "
                f"{got[r]} records, but {want[r]} are expected (its spec counts {totals[r]}): "
                "the files are truncated or belong to another conversion."
            )
        log.warning(
            "%d classes of %s %s hold fewer records than dataset_spec.json counts (class %d: "
            "%d of %d); using those there are.", len(short), found.source, split,
            found.spec.classes[split][r], got[r], want[r],
        )  # fmt: skip
        keep = np.concatenate([np.arange(s, s + g) for s, g in zip(starts, got)])
        images = images[keep]
    return Part(images, got.astype(np.int32), totals)


def _records_items(found: Found, split: str, want: np.ndarray) -> Iterator[tuple[int, bytes, str]]:
    """(class position, record, where) from each class's files, its first want[r] records."""
    for r, c in enumerate(found.spec.classes[split]):
        left = int(want[r])
        for path in _class_files(found.folder, found.spec, c):
            for i, record in read_tfrecords(path) if left else ():
                yield r, record, f"record {i} of {path}"
                left -= 1
                if not left:
                    break


def _tfds_items(found: Found, split: str, want: np.ndarray) -> Iterator[tuple[int, bytes, str]]:
    """(class position, record, where) of the records metadata.json places in the split's
    classes (the first want[r] of each); the others are skipped unread."""
    begins = np.array([s for s, _ in found.slices[split]], np.int64)
    order = np.argsort(begins)
    firsts, ends = begins[order], begins[order] + want[order]

    def owner(pos: int) -> int:  # the class position whose kept records hold pos, or -1
        k = int(np.searchsorted(firsts, pos, side="right")) - 1
        return int(order[k]) if k >= 0 and pos < ends[k] else -1

    offset = 0  # the position of a shard's first record among all the build's records
    for path in found.shards if len(begins) else ():
        n = 0
        for i, record in read_tfrecords(path, lambda i, base=offset: owner(base + i) >= 0):
            n = i + 1
            if record is not None:
                yield owner(offset + i), record, f"record {i} of {path}"
        offset += n


def _decode(record: bytes, size: int, where: str, label: int | None) -> np.ndarray:
    try:
        features = parse_example(record)
    except (ValueError, IndexError) as e:
        raise DataError(f"{where} is no tf.train.Example ({e}): the file is damaged.") from None
    image = features.get("image")
    if not image or not isinstance(image[0], bytes):
        raise DataError(
            f"{where} has no 'image' bytes feature (its features: {sorted(features)}): it is not "
            "a Meta-Dataset record."
        )
    if label is not None and features.get("label", [label])[:1] != [label]:
        raise DataError(
            f"{where} is labelled {features.get('label')}, but metadata.json places it in class "
            f"{label}: the shards and metadata.json are of different builds."
        )
    try:
        picture = Image.open(io.BytesIO(image[0]))
        picture.load()  # PIL decodes lazily: a damaged image fails here
    except Exception as e:  # whatever PIL raises for bad bytes
        raise DataError(f"The image of {where} does not decode ({e}): it is damaged.") from None
    return decode_image(picture, size)


# ---------------------------------------------------------------------------------------------
# Episodes on the device


class EpisodeArrays(NamedTuple):
    """A split as device arrays (a pytree: the sampler's argument, not a constant)."""

    images: jax.Array  # uint8 [n, S, S, 3], class by class
    offsets: jax.Array  # int32 [C]: a class's first image in `images`
    counts: jax.Array  # int32 [C]: its images there
    totals: jax.Array  # float32 [C]: its images in the source (the shares' weights)
    members: jax.Array  # bool [G, C]: the classes of each group an episode is drawn from
    group_p: jax.Array  # float32 [G]: the probability of each group
    group_all: jax.Array  # bool [G]: DAG nodes (take all classes up to max_way; no way drawn)


class Shape(NamedTuple):
    """The episodes' static sizes."""

    min_way: int
    max_way: int
    max_query: int
    max_support: int
    max_support_per_class: int
    draws: int  # the most images of any class (the width of the per-class draw)


class Plan(NamedTuple):
    """An episode's composition: which images go to which slot."""

    classes: jax.Array  # int32 [max_way]: the split's class in each slot (0 past n_way)
    n_way: jax.Array  # int32
    n_query: jax.Array  # int32: queries per class
    shots: jax.Array  # int32 [max_way]: support images per class (0 past n_way)
    support: jax.Array  # int32 [max_support]: image indices (0 for padding)
    support_slot: jax.Array  # int32 [max_support]: the class slot, -1 for padding
    query: jax.Array  # int32 [max_way * max_query]
    query_slot: jax.Array  # int32 [max_way * max_query]


def plan_episode(key: jax.Array, a: EpisodeArrays, shape: Shape) -> Plan:
    """Algorithm 1 (module docstring), with vectorised ops only."""
    W, Q, S = shape.max_way, shape.max_query, shape.max_support
    k_group, k_way, k_class, k_beta, k_weight, k_draw = jax.random.split(key, 6)
    g = jax.random.choice(k_group, a.group_p.shape[0], p=a.group_p)
    member = a.members[g]
    top = jnp.minimum(W, member.sum())
    drawn = jax.random.randint(k_way, (), shape.min_way, top + 1)
    n_way = jnp.where(a.group_all[g], top, drawn).astype(jnp.int32)
    # N of the group's classes, uniformly and in a uniformly random order (the slots' labels)
    scores = jnp.where(member, jax.random.uniform(k_class, member.shape), 2.0)
    scores = jnp.concatenate([scores, jnp.full((max(0, W - member.shape[0]),), 3.0)])
    real = jnp.arange(W) < n_way
    classes = jnp.where(real, jax.lax.top_k(-scores, W)[1], 0).astype(jnp.int32)
    count = jnp.where(real, a.counts[classes], 0)
    n_query = jnp.minimum(Q, jnp.min(jnp.where(real, count // 2, Q))).astype(jnp.int32)
    left = count - n_query  # >= 1 for every real class (count >= 2)
    beta = jax.random.uniform(k_beta)
    contrib = jnp.floor(beta * jnp.minimum(shape.max_support_per_class, left) + 1)
    size = jnp.minimum(jnp.where(real, contrib, 0).sum(), S).astype(jnp.int32)
    log_w = jax.random.uniform(k_weight, (W,), minval=_LOG_WEIGHTS[0], maxval=_LOG_WEIGHTS[1])
    weight = jnp.where(real, a.totals[classes] * jnp.exp(log_w), 0.0)
    want = jnp.floor(weight / weight.sum() * (size - n_way)).astype(jnp.int32) + 1
    shots = jnp.where(real, jnp.minimum(want, left), 0).astype(jnp.int32)
    # Each class's images in a random order: queries first, then its support images.
    width = max(shape.draws, Q)
    d = min(width, Q + S)
    valid = jnp.arange(width)[None, :] < count[:, None]
    order = jax.lax.top_k(-jnp.where(valid, jax.random.uniform(k_draw, (W, width)), 2.0), d)[1]
    first = a.offsets[classes]
    q_ok = real[:, None] & (jnp.arange(Q)[None, :] < n_query)
    query = jnp.where(q_ok, first[:, None] + order[:, :Q], 0).reshape(-1)
    query_slot = jnp.where(q_ok, jnp.arange(W)[:, None], -1).reshape(-1)
    ends = jnp.cumsum(shots)
    j = jnp.arange(S)
    owner = jnp.minimum(jnp.sum(j[:, None] >= ends[None, :], axis=1), W - 1)
    s_ok = j < ends[-1]
    rank = j - (ends - shots)[owner]
    within = order[owner, jnp.clip(n_query + rank, 0, d - 1)]
    support = jnp.where(s_ok, first[owner] + within, 0)
    support_slot = jnp.where(s_ok, owner, -1)
    return Plan(classes, n_way, n_query, shots, support, support_slot, query, query_slot)


def sample_episode(key: jax.Array, a: EpisodeArrays, shape: Shape, global_labels=False) -> Task:
    """One padded episode: labels are the slots (a random order of the classes), or with
    global_labels the classes' indices in the split; padded slots have label -1."""
    plan = plan_episode(key, a, shape)

    def split(index: jax.Array, slot: jax.Array) -> Split:
        ok = slot >= 0
        x = a.images[index].astype(jnp.float32) / 255.0
        x = jnp.where(ok[:, None, None, None], x, 0.0)
        label = jnp.where(global_labels, plan.classes[jnp.maximum(slot, 0)], slot)
        return Split(x, jnp.where(ok, label, -1).astype(jnp.int32), ok)

    return Task(
        support=split(plan.support, plan.support_slot),
        query=split(plan.query, plan.query_slot),
        task_id=jnp.zeros((), jnp.int32),
    )


def episode_arrays(parts: list[tuple[Part, list[tuple[int, ...]], bool]]) -> EpisodeArrays:
    """One split's arrays from its sources' parts, each with its groups (none: one group of
    all its classes) and whether they are DAG nodes; each source is drawn with equal odds."""
    n_classes = [len(p.counts) for p, _, _ in parts]
    total = sum(n_classes)
    members, probs, dag = [], [], []
    start = 0
    for (_, groups, all_ways), n in zip(parts, n_classes):
        groups = groups or [tuple(range(n))]
        for group in groups:
            row = np.zeros(total, bool)
            row[start + np.asarray(group, np.int64)] = True
            members.append(row)
            probs.append(1.0 / (len(parts) * len(groups)))
            dag.append(all_ways)
        start += n
    counts = np.concatenate([p.counts for p, _, _ in parts])
    images = [p.images for p, _, _ in parts]
    return EpisodeArrays(
        images=jnp.asarray(images[0] if len(images) == 1 else np.concatenate(images)),
        offsets=jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)),
        counts=jnp.asarray(counts),
        totals=jnp.asarray(np.concatenate([p.totals for p, _, _ in parts]).astype(np.float32)),
        members=jnp.asarray(np.stack(members)),
        group_p=jnp.asarray(np.array(probs, np.float32)),
        group_all=jnp.asarray(np.array(dag, bool)),
    )


# ---------------------------------------------------------------------------------------------
# The option's schema and task source


@dataclass
class MetaDatasetConfig(DataConfig):
    """Meta-Dataset's variable-way, variable-shot episodes (the module docstring says more)."""

    padded: ClassVar[bool] = True  # episodes are padded (Split.mask)
    size_settings: ClassVar[tuple[str, ...]] = ("max_way", "max_query", "max_support")
    locations: ClassVar[tuple[str, ...]] = ("root",)

    name: str = "meta_dataset"
    # the folder holding the source folders (records root or TFDS data folder), or its
    # subfolder meta_dataset/; None: $METALEARN_DATA
    root: str | None = None
    # the sources (folder names) episodes are drawn from, one per episode, uniformly; a source
    # serves the splits it has classes in (traffic_sign and mscoco have no training classes)
    sources: list[str] = field(default_factory=lambda: ["ilsvrc_2012"])
    md_version: str = "v1"  # md_tfds builds: v1 (the paper's splits) | v2 (VTAB+MD's)
    hierarchy: bool = True  # Omniglot's alphabets and ILSVRC's WordNet DAG, as Meta-Dataset
    image_size: int = 84  # images are resized to image_size x image_size (RGB)
    # the first this many images of each class are kept (null: all). 200 keeps ILSVRC at
    # ~4 GB and Quick Draw at ~1.5 GB (84 px); at 110 or more (max_support_per_class +
    # max_query) episodes have the composition they would have with every image
    max_per_class: int | None = 200
    min_way: int = 5
    max_way: int = 50  # the head's outputs
    max_query: int = 10  # queries per class, at most
    max_support: int = 500  # support images per episode, at most (its padded size)
    max_support_per_class: int = 100  # a class's most contribution to the support budget

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            (self.k_shot, self.k_query) == (1, 15),
            f"data.k_shot={self.k_shot} / data.k_query={self.k_query} do not apply to "
            "data=meta_dataset, whose episodes have variable shots: set data.max_query, "
            "data.max_support and data.max_support_per_class instead.",
        )
        choice("data.name", self.name, ("meta_dataset",))
        require(
            self.root is None or str(self.root).strip() != "",
            f"data.root={self.root!r} is not allowed: give the folder holding Meta-Dataset's "
            "source folders, or null to look in $METALEARN_DATA.",
        )
        sources = list(self.sources)
        names_ok = all(re.fullmatch(r"[\w.-]+", s) and s.strip(".") for s in sources)
        require(
            bool(sources) and len(set(sources)) == len(sources) and names_ok,
            f"data.sources={sources} is not allowed: give one or more distinct source folder "
            "names, e.g. [ilsvrc_2012] or [aircraft, cu_birds, dtd, fungi, ilsvrc_2012, "
            "omniglot, quickdraw, vgg_flower].",
        )
        choice("data.md_version", self.md_version, ("v1", "v2"))
        require(
            8 <= self.image_size <= 512,
            f"data.image_size={self.image_size} is not allowed: images are resized to "
            "image_size x image_size pixels, from 8 to 512 (Meta-Dataset uses 84).",
        )
        if self.max_per_class is not None:  # a class needs a query and a support image
            _at_least("max_per_class", self.max_per_class, 2, " (or null: every image)")
        _at_least("min_way", self.min_way, 2)
        _at_least("max_way", self.max_way, self.min_way, " (data.min_way)")
        _at_least("max_query", self.max_query, 1)
        _at_least("max_support", self.max_support, self.max_way, " (data.max_way): every class "
                  "of an episode has a support image")  # fmt: skip
        _at_least("max_support_per_class", self.max_support_per_class, 1)
        for key in ("max_per_class", "max_way", "max_query", "max_support"):
            at_most(f"data.{key}", getattr(self, key) or 0, MAX_EXAMPLES)

    def preprocess(self, images) -> np.ndarray:
        """Images as training reads them: float32 [N, S, S, 3], decode_image / 255."""
        pixels = np.stack([decode_image(im, self.image_size) for im in open_images(images)])
        return scale_pixels(pixels)


def _at_least(key: str, value: int, low: int, why: str = "") -> None:
    require(value >= low, f"data.{key}={value} is not allowed: it must be >= {low}{why}.")


def check_split(cfg: MetaDatasetConfig, found: list[Found], split: str) -> list[tuple]:
    """The (source, groups, dag) a split's episodes draw from; a DataError (before any image
    is read) when it cannot make episodes."""
    used, name = [], {"train": "meta-train", "val": "meta-validation", "test": "meta-test"}[split]
    for f in found:
        classes = f.spec.classes[split]
        if not classes:
            continue
        if len(classes) < cfg.min_way:
            raise DataError(
                f"{f.source} has {len(classes)} {name} classes, fewer than data.min_way="
                f"{cfg.min_way}: lower data.min_way, or leave {f.source} out of data.sources."
            )
        small = [c for c in classes if f.spec.totals[c] < 2]
        if small:
            raise DataError(
                f"class {small[0]} ({f.spec.names.get(small[0], '?')}) of {f.source} has "
                f"{f.spec.totals[small[0]]} image(s), as {len(small)} of its {name} classes: "
                f"every class needs 2 (a query, a support image). Leave {f.source} out."
            )
        groups = f.spec.groups.get(split, []) if cfg.hierarchy else []
        if f.spec.dag and groups:
            groups = [g for g in groups if cfg.min_way <= len(g) <= _MAX_SPANNING_LEAVES]
            if not groups:
                raise DataError(
                    f"No WordNet node of {f.source}'s {name} classes spans {cfg.min_way} to "
                    f"{_MAX_SPANNING_LEAVES} of them: lower data.min_way, or set "
                    "data.hierarchy=false (uniform classes)."
                )
        small_groups = [g for g in groups if len(g) < cfg.min_way]
        if small_groups:
            raise DataError(
                f"A superclass of {f.source}'s {name} classes has {len(small_groups[0])} classes, "
                f"fewer than data.min_way={cfg.min_way}: lower data.min_way, or set "
                "data.hierarchy=false (uniform classes)."
            )
        used.append((f, groups, f.spec.dag and bool(groups)))
    if not used:
        counts = ", ".join(f"{f.source} has {len(f.spec.classes[split])}" for f in found)
        raise DataError(
            f"data.sources={[f.source for f in found]} has no {name} classes ({counts}): "
            "Meta-Dataset holds traffic_sign and mscoco out for testing. Add a source with "
            f"{name} classes (e.g. ilsvrc_2012 or aircraft)."
        )
    return used


def make_source(cfg: MetaDatasetConfig) -> TaskSource:
    found = [find_source(s, cfg.root, cfg.md_version) for s in cfg.sources]
    plans = {split: check_split(cfg, found, split) for split in SPLITS}  # before reading
    parts = {
        split: [
            (load_part(f, split, cfg.image_size, cfg.max_per_class), groups, dag)
            for f, groups, dag in plans[split]
        ]
        for split in SPLITS
    }
    draws = max(int(p.counts.max()) for split in SPLITS for p, _, _ in parts[split])
    shape = Shape(
        cfg.min_way, cfg.max_way, cfg.max_query, cfg.max_support, cfg.max_support_per_class, draws
    )
    arrays = {split: episode_arrays(parts[split]) for split in SPLITS}
    for split in SPLITS:
        log.info(
            "Meta-Dataset %s: %d classes of %s, %d images", split, arrays[split].counts.shape[0],
            ", ".join(f.source for f, _, _ in plans[split]), arrays[split].images.shape[0],
        )  # fmt: skip

    def sample(key, split_arrays, global_labels=False):
        return sample_episode(key, split_arrays, shape, global_labels)

    return TaskSource(
        kind="classification",
        n_out=cfg.max_way,
        n_train_classes=int(arrays["train"].counts.shape[0]),
        input_shape=(cfg.image_size, cfg.image_size, 3),
        splits=arrays,
        sample=sample,
        episodes=None,  # variable-way episodes: train.n_way / k_shot / k_query do not apply
    )


registry.register("data", "meta_dataset", MetaDatasetConfig, make_source)
