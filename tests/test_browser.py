"""The reports in a real browser: headless Chromium opens a run, a comparison (sweep) and a plan report from disk;
every figure must decode, the console must stay silent, the page must fit a 1280-px laptop screen without
sideways scrolling, and the screenshot must not be blank.

    pytest tests/test_browser.py

CI (.ci/run) installs Debian's chromium and sets MOESIM_REQUIRE_CHROMIUM=1, so that there these tests fail
rather than skip; elsewhere, without chromium, they skip and say so.
"""
import itertools
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from moesim.report import build_comparison_report, build_run_report

from test_report import do_run, tiny_trace

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
REQUIRED = os.environ.get("MOESIM_REQUIRE_CHROMIUM") == "1"
pytestmark = pytest.mark.skipif(CHROMIUM is None and not REQUIRED,
                                reason="no chromium on PATH (CI installs it: apt-get install -y chromium)")

# what headless Chromium needs as root in a container, and nothing that reaches the network
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
         "--hide-scrollbars", "--window-size=1280,2000", "--enable-logging=stderr", "--v=0"]
# appended to a copy of the report (the report itself has no script): facts about the loaded page, in the DOM
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images], b = document.body.dataset;
  b.images = imgs.length;
  b.imagesOk = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  b.scrollWidth = document.documentElement.scrollWidth;
  b.innerScroll = Math.max(0, ...[...document.querySelectorAll(".scroll")].map(e => e.scrollWidth - e.clientWidth));
});</script>"""
_profiles = itertools.count()


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.fail("MOESIM_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install -y chromium)")
    profile = tmp_path / f"chromium-profile-{next(_profiles)}"  # a fresh profile every time
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=180)


def console_messages(stderr: str) -> list[str]:
    """Lines Chromium logs for the page's console (errors, uncaught exceptions, failed loads)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    trace = tiny_trace(tmp / "tiny.moetrace.safetensors", source={"licence": "CC0-1.0"})
    a = do_run(trace, tmp / "lru", "strategy=lru").out_dir
    b = do_run(trace, tmp / "belady", "strategy=belady", "budget=12.5%").out_dir
    # a sweep of many strategies at one budget (as a user's first sweep): 12 series, one budget, a wide table
    many = [do_run(trace, tmp / f"budget=25%,strategy={name}", f"strategy={name}").out_dir
            for name in ("lru", "lfu", "fifo", "lfru", "class_lru", "static", "activation_aware", "visit_count",
                         "belady", "llama_cpp_moe_cache", "vllm_lfru", "mixtral_offloading")]
    import moesim
    from moesim.plan import write as write_plan
    from moesim.synthetic import preset_trace
    from moesim.trace import save_trace

    small = save_trace(preset_trace("gpt-oss-like").slice_tokens(0, 300), tmp / "plan.moetrace.safetensors")
    planned = moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, sizes=3, strategies=["lru", "fiddler"])
    return {"run": build_run_report(a), "comparison": build_comparison_report([a, b], tmp / "comparison.html"),
            "sweep": build_comparison_report(many, tmp / "sweep.html", root=tmp),
            "plan": write_plan(planned, tmp / "plan")}


@pytest.mark.parametrize("kind, figures, ink_share", [("run", 3, 0.05), ("comparison", 3, 0.05), ("sweep", 3, 0.05),
                                                      ("plan", 1, 0.015)])  # plan: one figure, a shorter page
def test_report_renders_in_chromium(reports, tmp_path, kind, figures, ink_share):
    """The run, sweep (comparison) and plan reports: their figures decode, no console errors, no sideways
    scrolling, a screenshot with content."""
    report = reports[kind]
    html = report.read_text()
    n_images = html.count("<img ")
    assert n_images >= figures
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "\n</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    facts = dict(re.findall(r'data-([a-z-]+)="(\d+)"', re.search(r"<body[^>]*>", dom.stdout).group(0)))
    assert facts["images"] == str(n_images) and facts["images-ok"] == str(n_images), facts
    assert int(facts["scroll-width"]) <= 1280, facts  # no sideways scrolling on a laptop screen
    assert int(facts["inner-scroll"]) == 0, facts  # nor inside a table's box
    assert console_messages(dom.stderr) == []

    shot = tmp_path / "shot.png"
    run = chromium(tmp_path, f"--screenshot={shot}", report.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert console_messages(run.stderr) == []
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]  # [height, width, RGB] in 0..1
    assert pixels.shape[:2] == (2000, 1280)
    ink = (pixels < 0.9).any(axis=2).mean()  # share of pixels that are not (near) white
    rgb = (pixels * 255).astype(np.uint32).reshape(-1, 3)
    colours = len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))
    assert ink > ink_share and colours > 100, (ink, colours)


def test_console_errors_and_broken_images_are_caught(tmp_path):
    """The checks above can fail: a page with a script error and a broken image trips both."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,iVBORw0KGgo=">'
                   "<script>nosuchfunction();</script>" + PROBE + "</body></html>")
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", bad.as_uri())
    assert 'data-images="1"' in dom.stdout and 'data-images-ok="0"' in dom.stdout
    assert any("nosuchfunction" in m for m in console_messages(dom.stderr))
