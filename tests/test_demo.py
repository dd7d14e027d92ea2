"""`tokensieve demo` end to end on a tiny slice (every picture a PNG of its layout's size, each
referenced by the page; numbers as the committed results' scoring gives them) and `tokensieve
show` on a PNG and a JPEG written here."""

import html
import json
import re
import struct

import pytest
import torch
from PIL import Image

from tokensieve.cli import main
from tokensieve.demo import run_demo
from tokensieve.demo.cases import CASES
from tokensieve.demo.pictures import PANEL_PX, TEXT_LINE_PX, TEXT_WIDTH_PX, TITLE_PX
from tokensieve.loading import parse_method
from tokensieve.reference.compare import compare

SLICE = 4
USAGE_ERROR = 2


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's header; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()  # the whole file decodes
    return struct.unpack(">II", data[16:24])


def grid(rows: int, columns: int) -> tuple[int, int]:
    return columns * PANEL_PX, rows * PANEL_PX + TITLE_PX


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, samples=SLICE, timing_batch=2, timing_rounds=1, progress=False)


def test_every_picture_is_a_png_of_its_layout(report):
    folder = report.page.parent
    expected = {}
    for task, case in CASES.items():
        pruned = [row for row in report.rows if row.task == task and row.kind != "dense"]
        expected[f"{task}_keep_maps.png"] = grid(len(pruned), 2 * (1 + len(case.blocks)))
        if any(row.method.startswith("MADTP") for row in pruned):
            lines = 2 * (len(case.text_blocks) + 1)  # per sample shown: its text, then each block
            expected[f"{task}_madtp_text_tokens.png"] = (TEXT_WIDTH_PX, lines * TEXT_LINE_PX + TITLE_PX)
    expected["tos_sentences.png"] = None  # its width: the sentences of the slice's first image
    written = {path.name for path in folder.glob("*.png")}
    assert set(expected) <= written, set(expected) - written
    for picture in report.pictures:
        size = png_size(picture.path)
        assert size == (picture.width, picture.height), picture.path.name
        if expected.get(picture.path.name) is not None:
            assert size == expected[picture.path.name], picture.path.name
    sentences = next(p for p in report.pictures if p.path.name == "tos_sentences.png")
    assert png_size(sentences.path)[1] == grid(2, 1)[1] and png_size(sentences.path)[0] % PANEL_PX == 0


def test_the_page_references_every_picture(report):
    page = report.page.read_text()
    sources = set(re.findall(r'<img src="([^"]+)"', page))
    assert sources == {picture.path.name for picture in report.pictures}
    assert sources == {path.name for path in report.page.parent.glob("*.png")}
    assert "http" not in page.lower()  # readable offline: nothing fetched
    for row in report.rows:
        assert html.escape(row.method) in page
    saved = json.loads((report.page.parent / "demo.json").read_text())
    assert [row["method"] for row in saved["rows"]] == [row.method for row in report.rows]


def test_rows_are_the_committed_scoring_of_the_same_slice(report):
    for task in CASES:
        rows = [row for row in report.rows if row.task == task]
        assert rows[0].method == "dense" and rows[0].kind == "dense" and rows[0].macs_share == 1.0
        assert all(0 < row.macs_share < 1 for row in rows[1:]), task
    cls = [row for row in report.rows if row.task == "cls"]
    baseline = next(row for row in cls if row.kind == "training-free")
    expected = compare("cls", [parse_method(CASES["cls"].baselines[0])], samples=SLICE, progress=False)
    demo = [(row.method, row.score, row.gmacs) for row in (cls[0], baseline)]
    assert [(row.method, row.score, row.gmacs) for row in expected] == demo
    for row in report.rows[1:]:
        if row.kind != "dense":
            assert row.pruning_speedup > 0 and row.host_speedup > 0


def write_image(path) -> None:
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(300, 240, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize(("suffix", "task", "extra"), [
    (".png", "seg", ["--method", "svit"]),
    (".jpg", "nlvr", ["--method", "madtp", "--text", "there is exactly one purple square"]),
    (".jpg", "cls", ["--method", "tome:r=11"]),
])
def test_show_draws_a_users_image(tmp_path, capsys, suffix, task, extra):
    image = tmp_path / f"mine{suffix}"
    write_image(image)
    out = tmp_path / "keep.png"
    with pytest.raises(SystemExit) as exit_:
        main(["show", str(image), "--task", task, *extra, "--out", str(out)])
    assert exit_.value.code == 0, capsys.readouterr().err
    assert png_size(out) == grid(1, 1 + len(CASES[task].blocks))
    text = tmp_path / "keep_text.png"  # MADTP prunes nlvr's text tower too
    assert text.exists() == (task == "nlvr")
    if task == "nlvr":
        assert png_size(text) == (TEXT_WIDTH_PX, (len(CASES[task].text_blocks) + 1) * TEXT_LINE_PX + TITLE_PX)


@pytest.mark.parametrize(("args", "phrase"), [
    (["--task", "tos"], "reads a text"),
    (["--task", "seg", "--text", "the red star"], "reads no text"),
    (["--task", "nlvr", "--text", "a zebra"], "unknown: zebra"),
])
def test_show_refuses_bad_input(tmp_path, capsys, args, phrase):
    image = tmp_path / "mine.png"
    write_image(image)
    with pytest.raises(SystemExit) as exit_:
        main(["show", str(image), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == USAGE_ERROR and phrase in err and "Traceback" not in err


def test_show_refuses_a_file_that_is_no_image(tmp_path, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(SystemExit) as exit_:
        main(["show", str(not_image), "--task", "seg"])
    assert exit_.value.code == USAGE_ERROR and "cannot read" in capsys.readouterr().err


def test_demo_command_prints_its_report(tmp_path, capsys):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--tasks", "cls", "--samples", "2", "--timing-rounds", "1", "--timing-batch", "1",
              "--threads", "1", "--out", str(out), "--json"])
    assert exit_.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert {row["task"] for row in printed["rows"]} == {"cls"} and printed["samples"] == 2
    assert (out / "index.html").is_file() and (out / "cls_keep_maps.png").is_file()
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--samples", "1", "--out", str(out)])
    assert exit_.value.code == USAGE_ERROR
