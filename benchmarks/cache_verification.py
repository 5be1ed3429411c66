"""What the caches' checksums cost: the hash itself, the check when a run opens a store, each read.

    PYTHONPATH=src python benchmarks/cache_verification.py ../shared/datasets/hymenoptera

Builds the prepared-image cache (256 px) of a folder of photos in a temporary folder, plus a
feature store of 1280-float vectors for the same photos, then times, in this one process (so
the ratios hold however loaded the machine is; alternating passes, best of each; freed memory
kept, as in the loader workers that do the reads):

* hashing one prepared image's bytes with each candidate (``zlib.crc32``, xxHash's XXH3-64 and
  XXH64, blake2b): why ``caching.checksum`` is XXH3-64;
* the open-time audit (``ArrayStore.audit``: every entry's size and checksum) against the
  source fingerprints alone (what opening a store cost before checksums);
* a read through ``StoredArrays`` (checked) against the same bytes copied out of a plain memory
  map (unchecked), alone and followed by the evaluation transform; the same for a feature vector.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import hashlib
import math
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

from inat_finetune.data.datamodule import build_eval_transform
from inat_finetune.data.folders import make_split
from inat_finetune.models.backbones import IMAGENET_PREPROCESSING
from inat_finetune.runtime.allocator import keep_freed_memory
from inat_finetune.speed.caching import OFFSET, SHAPE, ArrayStore, source_fingerprint
from inat_finetune.speed.prepared import build, image_store, split_paths

HASHES: dict[str, Callable[[bytes], object]] = {
    "zlib.crc32": zlib.crc32,
    "xxh3_64": xxhash.xxh3_64_intdigest,
    "xxh64": xxhash.xxh64_intdigest,
    "blake2b-64": lambda data: hashlib.blake2b(data, digest_size=8).digest(),
}


def best_of(passes: int, *work: Callable[[], object]) -> list[float]:
    """The fastest of ``passes`` timings of each of ``work``, taken in alternation."""
    best = [math.inf] * len(work)
    for _ in range(passes):
        for i, run in enumerate(work):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def unchecked_reader(store: ArrayStore) -> Callable[[Path], np.ndarray]:
    """Reads an entry's bytes out of a plain memory map, as the store did before checksums."""
    data = np.memmap(store.data_path, dtype=np.uint8, mode="r")

    def read(path: Path) -> np.ndarray:
        entry = store.entries[str(path)]
        nbytes = math.prod(entry[SHAPE]) * store.dtype.itemsize
        raw = np.array(data[entry[OFFSET] : entry[OFFSET] + nbytes])
        return raw.view(store.dtype).reshape(entry[SHAPE])

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="a folder of class folders of photos")
    parser.add_argument("--size", type=int, default=256, help="prepared short side")
    parser.add_argument("--passes", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()  # as in the loader workers that do these reads (no page faults per copy)

    cache = Path(tempfile.mkdtemp(prefix="cache-verification-"))
    split = make_split(args.data, seed=0)
    paths = split_paths(split)
    build(image_store(split.root, args.size, cache_dir=cache), paths)
    store = image_store(split.root, args.size, cache_dir=cache)
    n = len(paths)
    megabytes = sum(math.prod(e[SHAPE]) for e in store.entries.values()) / 1e6
    print(f"{n} photos from {args.data}, prepared at {args.size} px: {megabytes:.0f} MB")

    sample = unchecked_reader(store)(paths[0]).tobytes()
    times = best_of(200, *[lambda f=f: f(sample) for f in HASHES.values()])
    print(f"\nhash of one prepared image ({len(sample) / 1e3:.0f} kB):")
    for name, seconds in zip(HASHES, times, strict=True):
        print(f"  {name:<11} {seconds * 1e6:7.1f} us  ({len(sample) / seconds / 1e9:.1f} GB/s)")

    def fingerprints() -> list[bool]:
        return [store.entries[str(p)][:3] == source_fingerprint(p) for p in paths]

    audit, plain = best_of(args.passes, lambda: store.audit(paths), fingerprints)
    print(
        f"\nopen-time check of {n} prepared images: {audit * 1e3:.1f} ms "
        f"(fingerprints alone {plain * 1e3:.1f} ms; {(audit - plain) / n * 1e6:.0f} us per image)"
    )

    checked, unchecked = store.arrays(paths), unchecked_reader(store)
    transform = build_eval_transform(IMAGENET_PREPROCESSING, normalise=False)

    def reads(read: Callable[[Path], np.ndarray], then: Callable = lambda a: a) -> Callable:
        return lambda: [then(read(p)) for p in paths]

    def to_image(array: np.ndarray) -> object:
        from torch import from_numpy

        return transform(from_numpy(array))

    c, u = best_of(args.passes, reads(checked.__getitem__), reads(unchecked))
    print(f"read per image: {u / n * 1e6:.0f} us unchecked, {c / n * 1e6:.0f} us checked")
    c, u = best_of(args.passes, reads(checked.__getitem__, to_image), reads(unchecked, to_image))
    print(
        f"read + evaluation transform per image: {u / n * 1e6:.0f} us unchecked, "
        f"{c / n * 1e6:.0f} us checked ({c / u:.2f}x)"
    )

    features = ArrayStore(cache / "features", "float32", {"kind": "benchmark"})
    rng = np.random.default_rng(0)
    vectors = {str(p): rng.standard_normal(1280).astype(np.float32) for p in paths}
    features.update(paths, lambda todo: ((p, vectors[str(p)]) for p in todo))
    c, u = best_of(
        args.passes, reads(features.arrays(paths).__getitem__), reads(unchecked_reader(features))
    )
    (audit,) = best_of(args.passes, lambda: features.audit(paths))
    print(
        f"feature vector (1280 float32) read: {u / n * 1e6:.1f} us unchecked, "
        f"{c / n * 1e6:.1f} us checked; open-time check of {n}: {audit * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
