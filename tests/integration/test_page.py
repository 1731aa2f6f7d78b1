"""The web page at ``/`` in a real headless Chromium (Debian's ``chromium``, driven by Playwright with
``executable_path``) against the integration stack: uvicorn, Celery workers, Redis. Each test opens the
page the way scripts/serve.sh tells a user to (``/#key=...``), acts as a person would, and checks what
the page shows; screenshots of every step go to ``var/test-artifacts/page/``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from playwright.sync_api import sync_playwright
from testkeys import TestKeys

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "var" / "test-artifacts" / "page"
#: The page's user: its own key, so its history holds only what these tests made.
KEY = TestKeys.bob
#: Generous: two workers on 2 CPU cores may be busy with other jobs of the session.
JOB_TIMEOUT_MS = 90_000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium on PATH: scripts/setup.sh installs Debian's chromium package")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        # --no-sandbox: the tests run as root in CI, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class PageRun:
    """One page, with what its console and network reported."""

    def __init__(self, page: Any, name: str) -> None:
        self.page = page
        self.name = name
        self.errors: list[str] = []
        self.failed: list[tuple[int, str]] = []
        self.shots = 0
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", self._console)
        page.on("response", lambda r: self.failed.append((r.status, r.url)) if r.status >= 400 else None)

    def _console(self, message: Any) -> None:
        # Chromium logs every 4xx/5xx answer as "Failed to load resource"; those are checked through
        # `failed` (each test says which it expects), everything else logged as an error is a defect.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def shot(self, step: str) -> Path:
        self.shots += 1
        path = ARTIFACTS / f"{self.name}-{self.shots:02d}-{step}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def run(browser: Any, stack: Stack, request: pytest.FixtureRequest) -> Iterator[PageRun]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # Reduced motion: the page then scrolls without animation, so an element's box read by the test is
    # where it stays while the mouse acts on it (app code honours prefers-reduced-motion).
    context = browser.new_context(viewport={"width": 1280, "height": 900}, reduced_motion="reduce")
    page = context.new_page()
    page.set_default_timeout(JOB_TIMEOUT_MS)
    r = PageRun(page, request.node.name.removeprefix("test_"))
    page.goto(f"{stack.api_url}/#key={KEY}")
    page.wait_for_selector("#key-status[data-ok='true']")
    page.wait_for_selector("#model option[value='shapes']", state="attached")
    page.select_option("#model", "shapes")
    yield r
    context.close()
    assert r.errors == [], r.errors


def _set_prompt(page: Any, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.fill("#seed", "3")


def test_the_page_is_served_with_its_own_files_only(stack: Stack) -> None:
    response = httpx.get(f"{stack.api_url}/", timeout=10)  # no key: the page is public
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    for asset in ("/static/js/main.js", "/static/app.css"):
        assert httpx.get(f"{stack.api_url}{asset}", timeout=10).status_code == 200
    # The API behind it is not.
    assert httpx.get(f"{stack.api_url}/jobs", timeout=10).status_code == 401


def test_key_from_the_address_is_kept_and_removed_from_it(run: PageRun) -> None:
    page = run.page
    assert "#key=" not in page.url
    assert page.evaluate("localStorage.getItem('ebca.apiKey')") == KEY
    assert "bob" in page.inner_text("#key-status")
    assert run.failed == []


def test_generate_shows_the_image_with_progress_and_settings(run: PageRun) -> None:
    page = run.page
    _set_prompt(page, "a red circle")
    run.shot("form")
    page.click("#generate-btn")
    card = page.locator("#results .job").first
    card.locator(".result img").wait_for()
    assert card.locator("h3").inner_text() == "a red circle · EBCA on"
    assert card.get_attribute("data-status") == "succeeded"
    assert "done (20 steps)" in card.locator(".status").inner_text()  # the model's default steps
    image = card.locator(".result img")
    assert image.evaluate("img => img.naturalWidth") == 32 and image.bounding_box()["width"] >= 200
    assert '"seed": 3' in card.locator(".result pre").text_content()
    run.shot("generated")
    assert run.failed == []


def test_compare_runs_the_same_seed_with_ebca_off_and_on(run: PageRun) -> None:
    page = run.page
    _set_prompt(page, "a red circle and a blue square")
    page.click("#compare-btn")
    pair = page.locator("#results .compare").first
    pair.locator(".job[data-status='succeeded'] .result img").nth(1).wait_for()
    titles = pair.locator(".job h3").all_inner_texts()
    assert titles == ["EBCA off · seed 3", "EBCA on · seed 3"]
    settings = pair.locator(".result pre").all_text_contents()  # inside closed <details>
    off, on = (json.loads(text) for text in settings)
    assert off["energy"] is None and on["energy"]["gamma_attn"] == 0.01 and off["seed"] == on["seed"] == 3
    run.shot("compare")
    assert run.failed == []


def _canvas_rgb(page: Any, x: int, y: int) -> list[int]:
    return page.evaluate(
        "([x, y]) => [...document.querySelector('#paint-canvas').getContext('2d')"
        ".getImageData(x, y, 1, 1).data.slice(0, 3)]",
        [x, y],
    )


def test_paint_a_mask_and_inpaint(run: PageRun, stack: Stack) -> None:
    page = run.page
    _set_prompt(page, "a red circle")
    page.click("#generate-btn")
    card = page.locator("#results .job").first
    card.locator(".result img").wait_for()
    card.locator(".edit-this").click()
    page.click("#tab-inpaint")
    assert page.get_attribute("#tab-inpaint", "aria-selected") == "true"
    page.wait_for_selector("#paint-canvas[data-ready='true']")
    # The drawing canvas is 256 px on screen; seed 3's circle lies in its lower right, so the upper
    # left is black background where the mask's pink tint is unambiguous.
    assert _canvas_rgb(page, 60, 60) == [0, 0, 0]
    canvas = page.locator("#paint-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 40, box["y"] + 40)
    page.mouse.down()
    page.mouse.move(box["x"] + 200, box["y"] + 200, steps=12)
    page.mouse.up()
    for x, y in ((60, 60), (100, 100)):  # on the stroke: tinted pink (red and blue up, green none)
        red, green, blue = _canvas_rgb(page, x, y)
        assert red > 100 and blue > 40 and green < 30, (x, y, red, green, blue)
    assert _canvas_rgb(page, 230, 20) == [0, 0, 0]  # off the stroke: untouched
    run.shot("mask")
    page.fill("#inpaint-prompt", "a blue square")
    page.click("#inpaint-btn")
    edited = page.locator("#results .job", has_text="inpaint: a blue square")
    # Either the card appears or the page says why not (a 422 in #edit-error): fail with the reason.
    page.wait_for_function(
        "() => !document.querySelector('#edit-error').hidden"
        " || [...document.querySelectorAll('#results .job h3')]"
        ".some(h => h.textContent.startsWith('inpaint:'))"
    )
    assert page.locator("#edit-error").is_hidden(), page.inner_text("#edit-error")
    edited.locator(".result img").wait_for()
    job = stack.job(edited.get_attribute("data-job-id"), key=KEY)
    assert job["mode"] == "inpaint" and job["status"] == "succeeded"
    run.shot("inpainted")
    assert run.failed == []


def test_cancel_a_running_job(run: PageRun, stack: Stack) -> None:
    page = run.page
    _set_prompt(page, "a green triangle")
    page.fill("#steps", "200")
    page.click("#generate-btn")
    card = page.locator("#results .job").first
    page.wait_for_function(
        "() => { const c = document.querySelector('#results .job');"
        " return c && c.dataset.status === 'running' && /denoising [1-9]/.test(c.innerText); }"
    )
    run.shot("running")
    card.locator("button.cancel").click()
    page.wait_for_function("() => document.querySelector('#results .job').dataset.status === 'canceled'")
    assert card.locator(".status").inner_text() == "canceled"
    assert stack.job(card.get_attribute("data-job-id"), key=KEY)["status"] == "canceled"
    run.shot("canceled")
    assert run.failed == []


def test_a_422_names_the_field_and_marks_it(run: PageRun, stack: Stack) -> None:
    page = run.page
    _set_prompt(page, "a red circle")
    page.fill("#steps", "500")
    before = len(stack.get("/jobs", key=KEY).json()["jobs"])
    page.click("#generate-btn")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "field steps" in page.inner_text("#form-error")
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "steps"
    run.shot("invalid")
    assert [status for status, _ in run.failed] == [422]
    assert len(stack.get("/jobs", key=KEY).json()["jobs"]) == before  # nothing was created


def test_history_lists_the_callers_jobs_newest_first(run: PageRun, stack: Stack) -> None:
    page = run.page
    page.click("#history-refresh")
    expected = [job["id"] for job in stack.get("/jobs?limit=20", key=KEY).json()["jobs"]]
    page.wait_for_function(
        "n => document.querySelectorAll('#history li[data-job-id]').length === n", arg=len(expected)
    )
    shown = page.eval_on_selector_all("#history li[data-job-id]", "items => items.map(i => i.dataset.jobId)")
    assert shown == expected and expected
    run.shot("history")
    assert run.failed == []


def test_phone_sized_screen(browser: Any, stack: Stack) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{stack.api_url}/#key={KEY}")
    page.wait_for_selector("#key-status[data-ok='true']")
    # Nothing wider than the screen: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone.png"), full_page=True)
    context.close()
    assert errors == []


def test_keyboard_only_generate(run: PageRun) -> None:
    page = run.page
    _set_prompt(page, "a blue circle")
    page.focus("#prompt")
    # Every control is reachable with Tab, and the form submits from the keyboard.
    page.focus("#generate-btn")
    page.keyboard.press("Enter")
    page.locator("#results .job[data-status='succeeded'] .result img").first.wait_for()
    word = page.locator("#words button").first
    word.focus()
    page.keyboard.press("Enter")
    assert page.locator("#weights input").count() == 1
    assert run.failed == []


def test_edit_this_runs_a_synthetic_edit_of_the_job(run: PageRun, stack: Stack) -> None:
    page = run.page
    _set_prompt(page, "a red circle")
    page.click("#generate-btn")
    card = page.locator("#results .job").first
    card.locator(".result img").wait_for()
    source = card.get_attribute("data-job-id")
    card.locator(".edit-this").click()
    assert page.inner_text("#synthetic-source") == source
    page.fill("#synthetic-edits .edit-prompt", "a blue circle")
    page.click("#synthetic-btn")
    edited = page.locator("#results .job", has_text="synthetic edit: a blue circle")
    edited.locator(".result img").wait_for()
    job = stack.job(edited.get_attribute("data-job-id"), key=KEY)
    assert job["mode"] == "synthetic" and job["request"]["source_job_id"] == source
    run.shot("synthetic")
    assert run.failed == []
