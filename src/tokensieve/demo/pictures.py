"""The demo's pictures, drawn with matplotlib (Agg) at fixed sizes: a grid of panels
`PANEL_PX` pixels square under a `TITLE_PX` title band."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tokensieve.demo.keep_maps import KeptTokens

DPI = 100
PANEL_PX = 160
TITLE_PX = 50
TEXT_WIDTH_PX = 1000  # the text tokens' picture
TEXT_LINE_PX = 22
SHADE = 0.78  # opacity of the dark veil over tokens not kept


@dataclass(frozen=True)
class Picture:
    path: Path
    width: int
    height: int
    caption: str


def grid_size(rows: int, columns: int) -> tuple[int, int]:
    """Pixels (width, height) of a picture of `rows` × `columns` panels."""
    return columns * PANEL_PX, rows * PANEL_PX + TITLE_PX


def text_size(samples: int, lines: int) -> tuple[int, int]:
    """Pixels of the text tokens' picture: per sample a heading and `lines` lines."""
    return TEXT_WIDTH_PX, samples * (lines + 1) * TEXT_LINE_PX + TITLE_PX


def keep_maps(path: Path, title: str, images: torch.Tensor, rows: list[tuple[str, KeptTokens]],
              blocks: tuple[int, ...], caption: str) -> Picture:
    """Per method a row; per image a group of columns: the image, then the tokens kept in each of
    `blocks` (the others veiled)."""
    columns = len(images) * (1 + len(blocks))
    figure, axes = _figure(len(rows), columns, title)
    for r, (label, kept) in enumerate(rows):
        for i, image in enumerate(images):
            first = i * (1 + len(blocks))
            _show(axes[r][first], image)
            axes[r][first].set_title(label if i == 0 else "", fontsize=7, loc="left")
            for j, block in enumerate(blocks):
                cells = kept.image[block][i]
                _show(axes[r][first + 1 + j], image, _veil(cells, kept.grid))
                axes[r][first + 1 + j].set_title(f"block {block}: {len(cells)} of {kept.grid ** 2}",
                                                 fontsize=7)
    return save(figure, path, grid_size(len(rows), columns), caption)


def sentences(path: Path, title: str, image: torch.Tensor, texts: list[str], masks: torch.Tensor,
              kept: KeptTokens, block: int, caption: str) -> Picture:
    """One image under several sentences: each sentence's target (top) and the cells kept in
    `block` under it (bottom)."""
    figure, axes = _figure(2, len(texts), title)
    for c, text in enumerate(texts):
        target = torch.zeros(*masks[c].shape, 4)
        target[masks[c]] = torch.tensor([0.0, 1.0, 1.0, 0.65])
        _show(axes[0][c], image, target)
        axes[0][c].set_title(f"“{text}”", fontsize=7)
        cells = kept.image[block][c]
        _show(axes[1][c], image, _veil(cells, kept.grid))
        axes[1][c].set_title(f"block {block}: {len(cells)} of {kept.grid ** 2} cells", fontsize=7)
    return save(figure, path, grid_size(2, len(texts)), caption)


def text_tokens(path: Path, title: str, texts: list[str], kept: KeptTokens, caption: str) -> Picture:
    """Each sample's text, then per text block shown its words: kept ones dark, the others
    (merged away) pale."""
    blocks = sorted(kept.text)
    width, height = text_size(len(texts), len(blocks))
    figure = new_figure(width, height)
    figure.suptitle(title, fontsize=10, y=1 - 0.5 * TITLE_PX / height)
    line = 0
    for s, text in enumerate(texts):
        words = text.split()
        _text_line(figure, height, line, f"sample {s + 1}: {text}", [], bold=True)
        line += 1
        for block in blocks:
            positions = kept.text[block][s]
            spans = [(word, i + 1 in positions) for i, word in enumerate(words)]
            _text_line(figure, height, line, f"block {block}:", spans)
            line += 1
    return save(figure, path, (width, height), caption)


def _text_line(figure, height: int, line: int, lead: str, spans: list[tuple[str, bool]],
               bold: bool = False) -> None:
    y = 1 - (TITLE_PX + (line + 0.7) * TEXT_LINE_PX) / height
    x = 0.01
    figure.text(x, y, lead, fontsize=8, family="monospace", weight="bold" if bold else "normal")
    x += (len(lead) + 1) * _char_width(8)
    size = 8 if not spans else min(8.0, 8.0 * 110 / max(1, sum(len(w) + 1 for w, _ in spans)))
    for word, kept in spans:
        figure.text(x, y, word, fontsize=size, family="monospace", color="black" if kept else "#bbbbbb",
                    weight="bold" if kept else "normal")
        x += (len(word) + 1) * _char_width(size)


def _char_width(size: float) -> float:
    """A monospace character's width at `size` points, as a share of the picture's width."""
    return 0.6 * size / 72 * DPI / TEXT_WIDTH_PX


def new_figure(width: int, height: int):
    """A matplotlib Figure of `width` × `height` pixels, off any GUI backend (no pyplot state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _figure(rows: int, columns: int, title: str):
    width, height = grid_size(rows, columns)
    figure = new_figure(width, height)
    figure.suptitle(title, fontsize=10, y=1 - 0.5 * TITLE_PX / height)
    top = 1 - TITLE_PX / height
    axes = [[figure.add_axes((c / columns + 0.004, top * (1 - (r + 1) / rows) + 0.004,
                              1 / columns - 0.008, top / rows - 0.004 - 18 / height))
             for c in range(columns)] for r in range(rows)]
    return figure, axes


def _show(axis, image: torch.Tensor, overlay: torch.Tensor | None = None) -> None:
    picture = image.permute(1, 2, 0).clamp(0, 1).numpy()
    axis.imshow(picture)
    if overlay is not None:
        axis.imshow(overlay.numpy(), extent=(0, picture.shape[1], picture.shape[0], 0))
    axis.axis("off")


def _veil(cells: set[int], grid: int) -> torch.Tensor:
    """An RGBA [grid, grid, 4] overlay: dark over the cells not in `cells`."""
    veil = torch.zeros(grid * grid, 4)
    veil[:, 3] = SHADE
    veil[list(cells), 3] = 0.0
    return veil.view(grid, grid, 4)


def save(figure, path: Path, size: tuple[int, int], caption: str) -> Picture:
    """Write `figure` as a PNG of `size` pixels at `path`."""
    figure.savefig(path, dpi=DPI)
    return Picture(path, *size, caption)
