"""report.html: self-contained, one panel per granularity with the best methods labelled, sortable tables,
per-layer widths; rendered in headless Chromium where it is installed (Debian's `chromium`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prunekit.bench.html import BEST, render_html, write_html


def _rows() -> list[dict]:
    rows = []
    grans = {"channel": ["flops=1.5", "flops=2", "flops=3"], "lowrank": ["flops=1.5", "flops=2"],
             "weight": ["params=2", "params=4", "params=8"]}
    for gran, targets in grans.items():
        for m in range(12):  # more methods than a legend could hold
            for t in targets:
                v = float(t.split("=")[1])
                top1 = 0.9 - 0.02 * m * (v - 1) - 0.01 * v
                rows.append({"status": "ok", "method": f"{gran}_m{m}", "label": f"{gran}_m{m}", "target": t,
                             "granularity": gran, "top1_base": 0.92, "top1_final": top1, "top1_pruned": top1 - 0.1,
                             "agreement_final": top1 + 0.02, "flops_speedup": v if gran != "weight" else 1.0,
                             "compression": v if gran == "weight" else 1.2, "latency_speedup": 0.8 * v,
                             "seed": 0, "seed_group": f"{gran}{m}", "experiment": "t", "model": "lenet5",
                             "dataset": "synthetic", "finetune_epochs": 0.2,
                             "layers": {"conv1": {"before": [6, 1], "after": [3, 1], "sparsity": 0.0},
                                        "conv2": {"before": [16, 6], "after": [8, 3], "sparsity": 0.0}}})
    rows.append({"status": "failed", "method": "broken", "target": "flops=2", "granularity": "channel"})
    return rows


def test_report_html_is_self_contained_and_has_every_panel(tmp_path) -> None:
    path = write_html(_rows(), tmp_path)
    text = path.read_text()
    assert path.name == "report.html" and text.startswith("<!doctype html>")
    assert not re.search(r'src="(?!data:)', text)  # every image inline, nothing fetched
    for title in ("Channel pruning", "Low-rank compression", "Unstructured (weight) pruning"):
        assert f"<h2>{title}</h2>" in text
    assert text.count("data:image/png;base64,") == 3 * 3 + 2  # 3 panels per granularity + 2 width charts
    assert text.count('class="sortable"') == 3 and "addEventListener('click'" in text
    assert "96 of 97 cells ok" in text
    # the best method of each granularity is the one with m0 (least damage) and is marked in its table
    assert 'class="best">90' in text


def test_best_methods_are_the_highest_mean_top1() -> None:
    from prunekit.bench.html import _best_labels
    from prunekit.bench.report import aggregate

    aggs = [a for a in aggregate(_rows()) if a["granularity"] == "channel"]
    assert _best_labels(aggs) == [f"channel_m{i}" for i in range(BEST)]


def test_report_html_renders_in_headless_chromium(tmp_path) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium); the page was not rendered")
    path = write_html(_rows(), tmp_path)
    shot = tmp_path / "report_html.png"
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1400,2200", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000, r.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1400, 2200)
    dark = sum(1 for px in img.getdata() if px < 128)
    assert dark > 0.01 * img.size[0] * img.size[1]  # plots and text drawn, not a blank page
    keep = os.environ.get("PRUNEKIT_TEST_ARTIFACTS")
    if keep:  # CI keeps the screenshot
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)


def test_render_html_with_no_successful_cells() -> None:
    text = render_html([{"status": "failed", "method": "x", "target": "flops=2", "granularity": "channel"}])
    assert "0 of 1 cells ok" in text and "<h2>" not in text
