"""Save example pictures of every task (validation split) for docs/tasks.md, and time generation.

    python -m tokensieve.tasks.preview --out docs/images/
    python -m tokensieve.tasks.preview --timing 200      # milliseconds per sample (median of 3)
"""

from __future__ import annotations

import argparse
import statistics
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tokensieve.tasks import CLS_CLASSES, DET_CLASSES, SEG_CLASSES, TASKS, make_dataset

PANELS = 4
TEXT_LINES = 6
LINE_HEIGHT = 14
WRAP = 34  # characters per caption line under a 224-pixel panel
# class colours for the seg overlay (background transparent); unlike any object colour on purpose
SEG_COLOURS = np.array([[0, 0, 0], [255, 255, 255], [255, 150, 190], [140, 90, 40], [255, 140, 0],
                        [120, 120, 120], [0, 90, 60]], np.uint8)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8."""
    return (np.clip(image.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)


def _panel(picture: np.ndarray, text: str, font: ImageFont.ImageFont) -> Image.Image:
    height, width = picture.shape[:2]
    panel = Image.new("RGB", (width, height + TEXT_LINES * LINE_HEIGHT + 4), "white")
    panel.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(panel)
    for row, line in enumerate(textwrap.wrap(text, WRAP)[:TEXT_LINES]):
        draw.text((3, height + 2 + row * LINE_HEIGHT), line, fill="black", font=font)
    return panel


def _sheet(panels: list[Image.Image]) -> Image.Image:
    width, height = panels[0].size
    sheet = Image.new("RGB", (len(panels) * (width + 6) - 6, height), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (width + 6), 0))
    return sheet


def _captioned(task: str, caption, font: ImageFont.ImageFont) -> list[Image.Image]:
    """The first validation samples of `task`, each under caption(sample)."""
    data = make_dataset(task, "val")
    return [_panel(_to_uint8(s["image"].numpy()), caption(s), font) for s in (data[i] for i in range(PANELS))]


def _cls(font: ImageFont.ImageFont) -> list[Image.Image]:
    return _captioned("cls", lambda s: f"label: {CLS_CLASSES[int(s['label'])]}", font)


def _seg(font: ImageFont.ImageFont) -> list[Image.Image]:
    data = make_dataset("seg", "val")
    panels = []
    for i in range(PANELS // 2):
        sample = data[i]
        picture = _to_uint8(sample["image"].numpy())
        labels = sample["mask"].numpy()
        overlay = np.where(labels[..., None] > 0, SEG_COLOURS[labels], picture)
        present = sorted({SEG_CLASSES[c] for c in np.unique(labels) if c > 0})
        panels += [_panel(picture, "image", font), _panel(overlay, "classes: " + ", ".join(present), font)]
    return panels


def _masked(sample: dict) -> np.ndarray:
    picture = _to_uint8(sample["image"].numpy()).astype(np.float32)
    target = sample["mask"].numpy()[..., None]
    return np.where(target, picture, picture * 0.3).astype(np.uint8)  # dim all but the target


def _tos(font: ImageFont.ImageFont) -> list[Image.Image]:
    data = make_dataset("tos", "val")
    samples = [data[i] for i in range(PANELS)]  # one image, four sentences
    return [_panel(_to_uint8(samples[0]["image"].numpy()), "image", font)] + [
        _panel(_masked(s), f"[{s['family']}] {s['text']}", font) for s in samples]


def _nlvr(font: ImageFont.ImageFont) -> list[Image.Image]:
    return _captioned("nlvr", lambda s: f"{s['text']} -> {bool(s['label'])}", font)


def _retrieval(font: ImageFont.ImageFont) -> list[Image.Image]:
    return _captioned("retrieval", lambda s: s["text"], font)


def _det_picture(sample: dict) -> np.ndarray:
    """The image with each instance's mask tinted by its class colour and its box outlined."""
    picture = _to_uint8(sample["image"].numpy())
    target = sample["target"]
    tinted = picture.astype(np.float32)
    for mask, label in zip(target["masks"].numpy().astype(bool), target["labels"].tolist(), strict=True):
        tinted[mask] = 0.45 * tinted[mask] + 0.55 * SEG_COLOURS[label]
    drawn = Image.fromarray(tinted.astype(np.uint8))
    draw = ImageDraw.Draw(drawn)
    for x0, y0, x1, y1 in target["boxes"].tolist():
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline="black")  # boxes are in pixel edges
    return np.asarray(drawn)


def _det(font: ImageFont.ImageFont) -> list[Image.Image]:
    data = make_dataset("det", "val")
    panels = []
    for sample in (data[i] for i in range(PANELS)):
        names = [DET_CLASSES[label] for label in sample["target"]["labels"].tolist()]
        panels.append(_panel(_det_picture(sample), f"{len(names)} instances: " + ", ".join(names), font))
    return panels


def save_previews(out: Path) -> list[Path]:
    """Write one PNG sheet per task into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=12)
    written = []
    for name, panels in [("cls", _cls), ("seg", _seg), ("tos", _tos), ("nlvr", _nlvr),
                         ("retrieval", _retrieval), ("det", _det)]:
        path = out / f"tasks_{name}.png"
        _sheet(panels(font)).save(path)
        written.append(path)
    return written


def time_generation(samples: int, image_size: int = 224, repeats: int = 3) -> dict[str, float]:
    """Milliseconds to generate one training sample of each task in this process: the median
    over `repeats` passes of the mean over `samples` samples."""
    result = {}
    for task in TASKS:
        data = make_dataset(task, "train", size=samples, image_size=image_size)
        data[0]  # warm-up: imports and first allocations
        passes = []
        for _ in range(repeats):
            start = time.perf_counter()
            for index in range(samples):
                data[index]
            passes.append((time.perf_counter() - start) / samples * 1000)
        result[task] = statistics.median(passes)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--timing", type=int, default=0, metavar="SAMPLES",
                        help="instead of pictures, time SAMPLES samples of each task")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    if args.timing:
        for task, milliseconds in time_generation(args.timing, args.image_size).items():
            print(f"{task:10s} {milliseconds:6.2f} ms/sample at {args.image_size}x{args.image_size}")
        return
    for path in save_previews(args.out):
        print(path)


if __name__ == "__main__":
    main()
