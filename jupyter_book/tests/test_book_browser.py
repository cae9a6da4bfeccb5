"""Open every built page in headless Chromium and check that it rendered.

The site is served by Python's http.server on the loopback interface (a thread, for this
module only). Chromium is Debian's (``/usr/bin/chromium``; ``.ci/run`` installs it), driven by
the ``playwright`` package; nothing is downloaded. Every request that is not to the loopback
server is aborted and counted as a failure, so the test also proves the site works offline.

For each page: MathJax typeset the math (``mjx-container`` elements exist when the page has
math), every ``<img>`` loaded (``complete`` and ``naturalWidth > 0``), embedded widget views were
drawn by the widget manager, each lecture's explorer (drawn in advance: viz.core.Explorer.static_html)
changes its figure when a control moves, no request failed or answered >= 400. A screenshot of each page
goes to ``jupyter_book/_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.book

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGE_TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def server(built_site):
    """http://127.0.0.1:PORT serving the built site; stopped after the module."""
    handler = functools.partial(_QuietHandler, directory=str(built_site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("headless Chromium not found (/usr/bin/chromium): apt-get install chromium "
                    "(.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _pages(build_module, lectures: list[Path]) -> list[str]:
    return ["intro.html"] + [build_module.page_path(nb.stem) for nb in lectures]


def _move_every_explorer(page, screenshot: Path) -> list[dict]:
    """On the static site an explorer's controls switch figures drawn in advance: move the first
    live control of each to its last value and see the figure change (screenshots before and
    after, beside the page's). Returns one dict per explorer."""
    found = []
    explorers = page.locator(".tl-static-explorer")
    for e in range(explorers.count()):
        ex = explorers.nth(e)
        img = ex.locator(".tlx-figure")
        live = ex.locator("[data-i]:not([disabled])")
        seen = {"controls": ex.locator("[data-i]").count(), "live": live.count(), "changed": False}
        if live.count():
            ex.scroll_into_view_if_needed()
            before = img.get_attribute("src")
            ex.screenshot(path=str(screenshot.with_name(f"{screenshot.stem}_explorer{e}_before.png")))
            field = live.first
            if field.get_attribute("type") == "checkbox":
                field.click()
            elif field.evaluate("f => f.tagName") == "SELECT":
                n = field.locator("option").count()
                current = int(field.input_value())
                field.select_option(str((current + 1) % n))
            else:
                field.focus()
                key = "Home" if field.input_value() == field.get_attribute("max") else "End"
                page.keyboard.press(key)
            seen["changed"] = img.get_attribute("src") != before
            ex.screenshot(path=str(screenshot.with_name(f"{screenshot.stem}_explorer{e}_after.png")))
        found.append(seen)
    return found


def check_page(browser, base_url: str, path: str, screenshot: Path) -> dict:
    """Load one page; return what was seen (and the problems found)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    host = urlsplit(base_url).netloc
    problems: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith("data:") or urlsplit(url).netloc == host:
            r.continue_()
        else:  # offline means offline: nothing leaves the machine
            problems.append(f"external request blocked: {url}")
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url} ({req.failure})"))
    page.on("response", lambda res: problems.append(f"HTTP {res.status}: {res.url}") if res.status >= 400 else None)
    page.on("pageerror", lambda err: problems.append(f"JavaScript error: {err}"))
    try:
        page.goto(f"{base_url}/{path}", wait_until="load")
        n_math = page.locator(".math").count()
        if n_math:
            page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
            page.evaluate("() => MathJax.startup.promise")
            page.wait_for_function("() => document.querySelectorAll('mjx-container').length > 0")
        # a widget view drawn by the widget manager (a page may hold widget state and no view:
        # the explorers are shown as static pages, viz.core.Explorer.static_html)
        has_widgets = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count() > 0
        if has_widgets:
            page.wait_for_function("() => document.querySelectorAll('.jupyter-widgets').length > 0")
        page.wait_for_load_state("networkidle")
        # images: wait until each has finished (loaded or failed), then look at the result
        page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
        images = page.evaluate(
            "() => Array.from(document.images).map(i => ({src: i.currentSrc.slice(0, 120),"
            " ok: i.complete && i.naturalWidth > 0}))"
        )
        seen = {
            "math": n_math,
            "mjx": page.locator("mjx-container").count(),
            "unrendered_math_errors": page.locator("mjx-merror").count(),
            "images": images,
            "widgets": page.locator(".jupyter-widgets").count() if has_widgets else 0,
            "has_widgets": has_widgets,
            "explorers": _move_every_explorer(page, screenshot),
        }
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        context.close()
    seen["problems"] = problems
    return seen


@pytest.fixture(scope="module")
def rendered(built_site, lectures, server, browser, build_module) -> dict[str, dict]:
    """Every page opened once: {path: what was seen}; screenshots written on the way."""
    shots = built_site.parent / "screenshots"
    if shots.exists():  # no stale pictures of pages that are gone
        shutil.rmtree(shots)
    results = {}
    for path in _pages(build_module, lectures):
        shot = shots / f"{Path(path).stem}.png"  # intro.png, 01_attention.png, ...
        results[path] = check_page(browser, server, path, shot)
        results[path]["screenshot"] = shot
    return results


def test_math_is_typeset(rendered):
    bad = [f"{p}: {s['math']} math elements, {s['mjx']} typeset, {s['unrendered_math_errors']} errors"
           for p, s in rendered.items() if (s["math"] and not s["mjx"]) or s["unrendered_math_errors"]]
    assert not bad, "MathJax did not typeset:\n" + "\n".join(bad)
    lectures = {p: s["mjx"] for p, s in rendered.items() if p.startswith("lectures/")}
    assert any(lectures.values()), f"no typeset math on any lecture page: {lectures}"


def test_every_image_loaded(rendered):
    bad = [f"{p}: {i['src']}" for p, s in rendered.items() for i in s["images"] if not i["ok"]]
    assert not bad, "images that did not load:\n" + "\n".join(bad)
    assert any(s["images"] for p, s in rendered.items() if p.startswith("lectures/")), (
        "no image on any lecture page: were the notebooks executed?"
    )


def test_embedded_widgets_are_drawn(rendered):
    bad = [p for p, s in rendered.items() if s["has_widgets"] and not s["widgets"]]
    assert not bad, f"widget views embedded but no widget drawn on: {bad}"


def test_every_lecture_explorer_answers_its_controls_without_a_kernel(rendered):
    """Each lecture has an explorer, and on the static site moving a control changes its figure."""
    lectures = {p: s["explorers"] for p, s in rendered.items() if p.startswith("lectures/")}
    none = [p for p, ex in lectures.items() if not ex]
    assert not none, f"lecture pages without an explorer: {none}"
    dead = [f"{p} (explorer {i})" for p, ex in lectures.items() for i, e in enumerate(ex)
            if not e["live"] or not e["changed"]]
    assert not dead, f"explorers whose figure did not change when a control moved: {dead}"


def test_no_failed_or_external_request(rendered):
    bad = [f"{p}: {problem}" for p, s in rendered.items() for problem in s["problems"]]
    assert not bad, "\n".join(bad)


def test_screenshots_were_taken(rendered):
    for path, seen in rendered.items():
        assert seen["screenshot"].stat().st_size > 10_000, f"{path}: screenshot is (nearly) empty"


def _narrow_page(browser, url: str, width: int):
    context = browser.new_context(viewport={"width": width, "height": 800})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(url, wait_until="load")
    page.wait_for_timeout(300)
    return context, page


def test_navigation_works_on_a_phone_and_the_sidebar_collapses_on_a_desktop(server, lectures, browser,
                                                                            build_module, built_site):
    """At 390 px the sidebar's button opens the navigation with every lecture (it did nothing:
    two buttons of one class, nav-fix.js); at 1280 px it collapses the sidebar; no page scrolls
    sideways at 390 px (the landing page's table did)."""
    page_path = build_module.page_path(lectures[0].stem)
    shots = built_site.parent / "screenshots"
    context, page = _narrow_page(browser, f"{server}/{page_path}", 390)
    try:
        toggle = page.locator(".primary-toggle:visible").first
        toggle.click()
        page.wait_for_timeout(500)
        assert page.locator("#pst-primary-sidebar-modal").evaluate("d => d.open"), "the phone's menu button opened nothing"
        links = page.locator("#pst-primary-sidebar-modal a.reference.internal").all_inner_texts()
        page.screenshot(path=str(shots / "phone_navigation.png"))
        missing = [nb.stem[:2] for nb in lectures if not any(t.startswith(f"{nb.stem[:2]} ·") for t in links)]
        assert not missing, f"the phone's navigation lacks lectures {missing}: {links}"
        for path in _pages(build_module, lectures):
            page.goto(f"{server}/{path}", wait_until="load")
            wide = page.evaluate("document.documentElement.scrollWidth")
            assert wide <= 392, f"{path} scrolls sideways at 390 px (content {wide} px wide)"
    finally:
        context.close()
    context, page = _narrow_page(browser, f"{server}/{page_path}", 1280)
    try:
        sidebar = page.locator("#pst-primary-sidebar")
        assert sidebar.is_visible()
        page.locator(".primary-toggle:visible").first.click()
        page.wait_for_timeout(500)
        assert not sidebar.is_visible(), "the desktop's sidebar button did not collapse the sidebar"
    finally:
        context.close()


def test_search_results_show_no_raw_tex(server, browser, built_site, build_module, lectures):
    """Sphinx builds a result's snippet from the page's text, where math is still TeX: search-fix.js
    turns "\\(W^Q\\)" into "W^Q" in snippets and titles."""
    first = (built_site / build_module.page_path(lectures[0].stem)).read_text(encoding="utf-8")
    assert "\\(" in first, "no inline math on the first lecture page: pick another page for this test"
    context, page = _narrow_page(browser, f"{server}/search.html?q=queries", 1280)
    try:
        assert page.evaluate("window.transformerLabTexToPlain('\\\\(W^Q\\\\) and $\\\\text{d}_\\\\alpha$')") == "W^Q and d_α"
        page.wait_for_function("document.querySelectorAll('#search-results li p.context').length > 0")
        page.wait_for_timeout(1500)  # the remaining snippets are fetched page by page
        texts = page.locator("#search-results li").all_inner_texts()
        (built_site.parent / "screenshots").mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(built_site.parent / "screenshots" / "search.png"))
    finally:
        context.close()
    assert texts, "the search for 'queries' found nothing"
    tex = [t for t in texts if re.search(r"\\[(\[)\]]|\\[A-Za-z]+\{|\$", t)]
    assert not tex, f"search results with raw TeX: {tex[:3]}"


def test_static_explorer_controls_switch_figures_in_the_browser(browser):
    """Every kind of control of a static explorer (slider, menu, checkbox) switches the figure in a
    real browser, and moving one control puts the others back at their starting values."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from transformer_lab import viz

    controls = {"n": widgets.IntSlider(value=1, min=1, max=3, description="n"),
                "kind": widgets.Dropdown(options=["a", "b"], value="a", description="kind"),
                "flip": widgets.Checkbox(value=False, description="flip")}

    def draw(state):
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.set_title(f"{state['n']}{state['kind']}{state['flip']}")
        return fig

    ex = viz.Explorer(controls, lambda v: dict(v), draw, title="t")
    context = browser.new_context()
    page = context.new_page()
    try:
        page.set_content(f"<html><body>{ex.static_html(steps=3, dpi=20)}</body></html>")
        img = page.locator(".tlx-figure")
        seen = [img.get_attribute("src")]
        page.locator('input[type="checkbox"]').click()
        seen.append(img.get_attribute("src"))
        page.locator("select").select_option("1")
        seen.append(img.get_attribute("src"))
        assert not page.locator('input[type="checkbox"]').is_checked()  # back at its start
        page.locator('input[type="range"]').focus()
        page.keyboard.press("End")
        seen.append(img.get_attribute("src"))
    finally:
        context.close()
    assert len(set(seen)) == 4, "a control did not switch the figure"
