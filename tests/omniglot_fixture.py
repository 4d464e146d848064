"""Build tiny Omniglot-format zips (random 105x105 mode-"1" PNGs) for tests."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(pixels: np.ndarray) -> bytes:
    """A mode-"1" PNG of a bool array (True = white background, False = stroke)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def make_omniglot_zips(
    dir: str | Path,
    n_background_alphabets: int = 2,
    n_eval_alphabets: int = 1,
    chars_per_alphabet: int = 3,
    *,
    drawings: int = 20,
    seed: int = 0,
) -> Path:
    """Write images_background.zip and images_evaluation.zip into `dir`; return `dir`.

    Same layout as the release (`<set>/<Alphabet>/characterNN/XXXX_YY.png`, XXXX counting
    characters across both sets); alphabets are named Background_A.. and Evaluation_A...
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    char_id = 0
    for name, prefix, n_alphabets in (
        ("images_background", "Background", n_background_alphabets),
        ("images_evaluation", "Evaluation", n_eval_alphabets),
    ):
        with zipfile.ZipFile(dir / f"{name}.zip", "w") as zf:
            for a in range(n_alphabets):
                alphabet = f"{prefix}_{chr(ord('A') + a)}"
                for c in range(1, chars_per_alphabet + 1):
                    char_id += 1
                    for d in range(1, drawings + 1):
                        pixels = rng.random((105, 105)) > 0.1
                        path = f"{name}/{alphabet}/character{c:02d}/{char_id:04d}_{d:02d}.png"
                        zf.writestr(path, png_bytes(pixels))
    return dir
