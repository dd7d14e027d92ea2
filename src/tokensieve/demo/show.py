"""`tokensieve show`: the keep maps of one image of the user's (PNG, JPEG, anything Pillow reads)
on a task's shipped reference model, resized to its input, with a shipped or training-free method."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from tokensieve.demo import pictures
from tokensieve.demo.cases import CASES
from tokensieve.demo.keep_maps import kept_tokens
from tokensieve.demo.pictures import Picture
from tokensieve.loading import parse_method
from tokensieve.methods import Method
from tokensieve.reference.compare import scored_model
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.reference.shipped_methods import shipped_by_name
from tokensieve.tasks.language import UNKNOWN_ID, split_words, tokenize

TEXT_TASKS = ("tos", "nlvr", "retrieval")


def show(image: str | Path, task: str, method: str | Method, text: str | None = None,
         out: str | Path | None = None) -> list[Picture]:
    """Draw which tokens `method` keeps of `image` on `task`'s reference model (tos, nlvr and
    retrieval read `text` too) into `out` (default: IMAGE's name with "_keep.png"); on nlvr and
    retrieval a method that prunes the text tower also gets `out`'s "_text.png". `method` is a bare
    name the package ships trained for `task` (e.g. "svit" on seg), or a spec such as "tome:r=11"."""
    if task not in CASES:
        raise ValueError(f"show draws the tasks {', '.join(CASES)}; not {task!r}")
    if task in TEXT_TASKS and text is None:
        raise ValueError(f"{task} reads a text (a sentence in the tasks' words): give one")
    if task not in TEXT_TASKS and text is not None:
        raise ValueError(f"{task} reads no text; leave it out")
    pixels = _pixels(Path(image), IMAGE_SIZES[task])
    batch: dict = {"image": pixels[None]}
    if text is not None:
        batch |= _text(text)
    chosen = _method(task, method)
    model = scored_model(task, chosen).eval()
    case = CASES[task]
    kept = kept_tokens(model, task, batch, case.blocks, case.text_blocks)
    out = Path(out) if out is not None else Path(image).with_name(f"{Path(image).stem}_keep.png")
    title = f"{Path(image).name} on the {task} model: tokens {chosen} kept"
    drawn = [pictures.keep_maps(out, title, batch["image"], [(type(chosen).__name__, kept)], case.blocks,
                                f"{Path(image).name}, then the image tokens that ran each block shown")]
    if kept.text:
        drawn.append(pictures.text_tokens(out.with_name(f"{out.stem}_text.png"),
                                          f"text tokens {chosen} kept", [text], kept,
                                          "the words that ran each block of the text tower"))
    return drawn


def _pixels(path: Path, size: int) -> torch.Tensor:
    """The image as the reference models take it: RGB in [0, 1], [3, size, size]."""
    try:
        with Image.open(path) as opened:
            picture = opened.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (FileNotFoundError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from error
    raw = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
    return raw.view(size, size, 3).permute(2, 0, 1) / 255


def _text(text: str) -> dict:
    """A text as the tasks' samples hold it; words outside the tasks' vocabulary are refused."""
    tokens = tokenize(text)
    words = split_words(text)
    unknown = [word for word, token in zip(words, tokens.tolist(), strict=True) if token == UNKNOWN_ID]
    if unknown or len(tokens) == 0:
        raise ValueError("the reference models read only the tasks' words (tokensieve.tasks.VOCABULARY); "
                         f"{'unknown: ' + ', '.join(unknown) if unknown else 'the text has no word'}")
    mask = torch.ones(1, len(tokens), dtype=torch.long)
    return {"text": [text], "tokens": tokens[None], "attention_mask": mask}


def _method(task: str, method: str | Method) -> Method:
    if isinstance(method, Method):
        return method
    shipped = shipped_by_name(task, method.strip().lower())
    return parse_method(method) if shipped is None else shipped
