"""Class-prior images for prior preservation, content-addressed and cached.

The cache key is (base model hash, class prompt, count, resolution, seed, sampler, steps, guidance):
a second subject of the same class on the same base model reuses the set instead of regenerating it.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from atelier.kernel.errors import ConfigError
from atelier.kernel.hashing import file_hashes, value_hash
from atelier.kernel.storage import atomic_dir, write_json_atomic
from atelier.models.dreambooth.config import CLASS_IMAGES_MAX
from atelier.models.dreambooth.config import SAMPLER_NAMES as SAMPLERS  # names only: torch loads when images are made

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PriorSpec:
    base_model_hash: str
    class_prompt: str
    count: int
    resolution: int
    seed: int
    sampler: str
    steps: int
    guidance_scale: float

    @property
    def key(self) -> str:
        return value_hash(asdict(self))[:24]

    def check(self) -> PriorSpec:
        """Every value in the range the sampler can run, else ConfigError naming each one (exit 2): a count or
        a step count of 0 would make nothing (or hang), a NaN guidance would make NaN images."""
        problems = []
        if not 1 <= self.count <= CLASS_IMAGES_MAX:
            problems.append(f"count {self.count} (1 to {CLASS_IMAGES_MAX})")
        if not (32 <= self.resolution <= 2048 and self.resolution % 8 == 0):
            problems.append(f"resolution {self.resolution} (32 to 2048, a multiple of 8)")
        seeds = 2**63 // 1_000_003 - min(max(self.count, 0), CLASS_IMAGES_MAX)  # each image's seed is derived from seed+index
        if not 0 <= self.seed < seeds:
            problems.append(f"seed {self.seed} (0 to {seeds - 1})")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler {self.sampler!r} (one of {', '.join(SAMPLERS)})")
        if not 1 <= self.steps <= 1000:
            problems.append(f"steps {self.steps} (1 to 1000)")
        if not (math.isfinite(self.guidance_scale) and 0 <= self.guidance_scale <= 50):
            problems.append(f"guidance {self.guidance_scale} (0 to 50)")
        if not self.class_prompt.strip():
            problems.append("an empty class prompt")
        if problems:
            raise ConfigError("class-prior settings", "out of range: " + "; ".join(problems), "give values in the ranges named")
        return self


@dataclass(frozen=True)
class PriorSet:
    path: Path
    key: str
    reused: bool
    count: int
    sha256: str  # hash of the images, recorded when the set was written


def prior_seed(base_seed: int, index: int) -> int:
    return base_seed * 1_000_003 + index


def ensure_class_priors(
    cache_root: Path,
    spec: PriorSpec,
    base_model_dir: Path,
    batch_size: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
    compile_mode: str = "none",
) -> PriorSet:
    """Return the cached set for `spec`, generating it (atomically) when it is missing.

    `compile_mode` only changes speed (see sampling.speed_up), so it is not part of the cache key.
    """
    final = Path(cache_root) / spec.check().key
    reused = (final / MANIFEST).is_file()
    if not reused:
        write_class_priors(final, spec, base_model_dir, batch_size, on_progress, compile_mode=compile_mode)
    return PriorSet(final, spec.key, reused, spec.count, read_manifest(final)["images_sha256"])


def write_class_priors(
    out_dir: Path,
    spec: PriorSpec,
    base_model_dir: Path,
    batch_size: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
    replace: bool = False,
    compile_mode: str = "none",
) -> Path:
    from atelier.models.dreambooth.sampling import GenerationRequest, generate, load_pipeline

    pipe = load_pipeline(base_model_dir, spec.sampler, compile_mode=compile_mode)
    requests = [
        GenerationRequest(spec.class_prompt, prior_seed(spec.seed, i), spec.steps, spec.guidance_scale, spec.resolution, spec.resolution)
        for i in range(spec.count)
    ]
    with atomic_dir(Path(out_dir), replace=replace) as tmp, ThreadPoolExecutor(max_workers=4) as writers:
        done, writes = 0, []

        def save(i: int, img) -> None:
            # PNG encoding (~40 ms an image at 512 px, outside the GIL) overlaps the next batch on the GPU
            nonlocal done
            writes.append(writers.submit(img.save, tmp / f"class-{i:04d}.png"))
            done += 1
            if on_progress:
                on_progress(done, spec.count)

        generate(pipe, requests, batch_size=batch_size, on_image=save)
        for write in writes:
            write.result()  # a failed write (a full disk) fails the set before its manifest is written
        write_json_atomic(tmp / MANIFEST, {"key": spec.key, "spec": asdict(spec), "images_sha256": prior_images_hash(tmp)})
    return Path(out_dir)


def prior_images_hash(folder: Path) -> str:
    """Hash of a class-prior set's images (the manifest is metadata, not content)."""
    return value_hash({k: v for k, v in file_hashes(Path(folder)).items() if k.endswith(".png")})


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())
