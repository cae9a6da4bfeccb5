"""A learner's JupyterLab, in headless Chromium: started as ``make lab`` starts it
(``jupyter/lab.py``), on a copy of the released lecture 01.

Checked, in the order a learner meets them: the notebook opens and, once its kernel is up, is not
marked as changed; the menus hold no nbgrader instructor tool (no Formgrader, no Create
Assignment, no Nbgrader menu) and the server serves none of their pages; Run All runs to the last
cell although every exercise is unsolved (each exercise's test cell shows its own
``NotImplementedError``); and the attention explorer answers a control (its figure changes).
Screenshots go to ``jupyter_book/_build/screenshots/lab_*.png``. Nothing leaves the loopback
interface (every other request is aborted and fails the test). About 40 s on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from test_book_browser import browser  # noqa: F401, F811  (the same headless Chromium fixture)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "jupyter_book" / "_build" / "screenshots"
LECTURE = "01_attention"
sys.path.insert(0, str(REPO / "jupyter"))
import lab  # noqa: E402  (jupyter/lab.py: what `make lab` runs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """JupyterLab as `make lab` starts it, on a copy of course/01_attention; (url, token, log, folder)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(REPO / "course" / LECTURE, root / LECTURE)
    port, token = _free_port(), "transformer-lab-test"
    log = root / "lab.log"
    env = lab.environment(base={k: v for k, v in os.environ.items() if k != "TRANSFORMER_LAB_GRADING"})
    env["JUPYTER_RUNTIME_DIR"] = str(root / "runtime")  # no clash with a learner's running lab
    proc = subprocess.Popen(
        lab.command(root, ["--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                           f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False"]),
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        else:
            pytest.fail(f"JupyterLab did not answer in 60 s:\n{log.read_text()[-3000:]}")
        yield url, token, log, root
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"lab_{name}.png"))


def _notebook_tab(page):
    return page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current").first


def _wait_for_run_all(page, status, path: Path, timeout: float):
    """Run All is done when the kernel has stayed idle for 3 s and the saved notebook (Ctrl+S,
    read from disk: JupyterLab keeps only the visible cells' outputs in the page) has every code
    cell executed. Returns that notebook."""
    deadline = time.monotonic() + timeout
    nb = None
    while time.monotonic() < deadline:
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 3.0 and time.monotonic() < deadline:
            time.sleep(0.25)
            if status.get_attribute("data-status") != "idle":
                idle_since = time.monotonic()
        page.keyboard.press("Control+s")
        for _ in range(40):
            if "jp-mod-dirty" not in (_notebook_tab(page).get_attribute("class") or ""):
                break
            time.sleep(0.25)
        nb = nbformat.read(str(path), as_version=4)
        if all(c.get("execution_count") is not None for c in nb.cells if c.cell_type == "code"):
            return nb
    return nb


def test_learner_lab_runs_the_whole_lecture_and_the_widget_answers(jupyterlab, browser):  # noqa: F811
    url, token, log, root = jupyterlab
    outside: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})

    def route(r):
        if r.request.url.startswith(url):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(f"{url}/lab/tree/{LECTURE}/{LECTURE}.ipynb?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    status = page.locator(".jp-Notebook-ExecutionIndicator").first
    deadline = time.monotonic() + 60
    while status.get_attribute("data-status") != "idle" and time.monotonic() < deadline:
        time.sleep(0.25)
    assert status.get_attribute("data-status") == "idle", "the kernel did not start in 60 s"
    time.sleep(2.0)  # JupyterLab writes the kernel's language_info into the notebook once connected
    _shot(page, "opened")
    assert "jp-mod-dirty" not in (_notebook_tab(page).get_attribute("class") or ""), (
        "the notebook is marked as changed although the learner touched nothing")

    menus = page.locator(".lm-MenuBar-itemLabel").all_inner_texts()
    assert "Nbgrader" not in menus and menus[:3] == ["File", "Edit", "View"], menus
    page.locator(".lm-MenuBar-item", has_text="View").first.click()
    page.locator(".lm-Menu-content").first.wait_for(state="visible", timeout=10_000)
    view = page.locator(".lm-Menu-content").first.inner_text()
    page.keyboard.press("Escape")
    everywhere = page.evaluate("document.body.textContent") + " ".join(
        page.locator("[title]").evaluate_all("els => els.map(e => e.title)"))
    for tool in ("Formgrader", "Create Assignment", "Course List", "Assignment List"):
        assert tool not in view, f"the learner's View menu shows nbgrader's {tool}"
        assert tool not in everywhere, f"the learner's JupyterLab shows nbgrader's {tool}"
    assert "Validate" not in page.locator(".jp-NotebookPanel-toolbar").first.inner_text()
    for path in ("formgrader", "assignments", "courses"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/{path}?token={token}", timeout=10)
        assert err.value.code == 404, (path, err.value.code)

    # Run All, as a learner would, from the Run menu
    page.keyboard.press("Escape")
    page.locator(".jp-Notebook .jp-Cell").first.click()
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    item = page.locator(".lm-Menu-item:not(.lm-mod-hidden)", has_text="Run All Cells").first
    item.wait_for(state="visible", timeout=10_000)
    item.click()
    nb = _wait_for_run_all(page, status, root / LECTURE / f"{LECTURE}.ipynb", timeout=300)
    _shot(page, "after_run_all")
    code = [c for c in nb.cells if c.cell_type == "code"]
    unrun = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unrun, f"code cells Run All did not run (of {len(code)}): {unrun}"
    tests = {c.metadata["nbgrader"]["grade_id"] for c in code
             if c.metadata.get("nbgrader", {}).get("grade") and not c.metadata["nbgrader"].get("solution")}
    errors = {c.metadata.get("nbgrader", {}).get("grade_id", f"cell {i}"): o["ename"]
              for i, c in enumerate(code) for o in c.outputs if o.output_type == "error"}
    assert errors == dict.fromkeys(tests, "NotImplementedError"), (
        f"after Run All every exercise test (and nothing else) must show NotImplementedError: {errors}")

    # the attention explorer: choose the causal mask, the figure must change
    explorer = page.locator(".widget-vbox").filter(has=page.locator("select")).last
    explorer.scroll_into_view_if_needed()
    image = explorer.locator("img").first
    image.wait_for(timeout=30_000)
    before = image.get_attribute("src")
    mask = explorer.locator(".widget-dropdown", has_text="mask").locator("select")
    mask.select_option("causal")
    deadline = time.monotonic() + 30
    while image.get_attribute("src") == before and time.monotonic() < deadline:
        time.sleep(0.25)
    explorer.scroll_into_view_if_needed()
    _shot(page, "widget_after_move")
    assert image.get_attribute("src") != before, "moving the explorer's mask control did not change its figure"
    assert not outside, f"requests left the machine: {outside[:5]}"
    text = log.read_text()
    for bad in ("Traceback", "[C ", "Unwritable"):
        assert bad not in text, f"JupyterLab's log has {bad!r}:\n{text[-3000:]}"
    page.close()
