"""The web page in a real browser: headless Debian chromium driven by Playwright, against `Stack(gateway=True)`.

Skips when /usr/bin/chromium is absent (.ci/run installs it). Never downloads a browser.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import OUTPUT_DIR, make_settings

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
SCREENSHOTS = OUTPUT_DIR / "browser"


@pytest.fixture(scope="module")
def site(kafka_bootstrap, tmp_path_factory):
    """The embedded stack with its gateway on a free loopback port, the sample catalogue indexed."""
    from lookalike.calibration import write_calibration
    from lookalike.client import Client, read_catalog
    from lookalike.functions.query.handler import CALIBRATION_FORMAT, calibration_path
    from lookalike.sample_catalog import generate
    from lookalike.shared.messages import CATALOG_EVENTS
    from lookalike.stack import Stack

    catalog = generate(tmp_path_factory.mktemp("browser-sample"), n_products=6, photos_per_product=3, seed=2)
    settings = make_settings(tmp_path_factory.mktemp("browser-stack"), kafka_bootstrap_servers=kafka_bootstrap,
                             gateway_port=0)
    # Calibrated so that any lead is "same product" and anything listed "similar": the page shows both marks.
    write_calibration(calibration_path(settings.data_dir, "efficientnet_lite0"),
                      {"format": CALIBRATION_FORMAT, "model": "efficientnet_lite0", "distance": "cosine",
                       "thresholds": {"same_margin": 0.0, "similar_score": 0.0}})
    with Stack(settings, gateway=True) as stack:
        client = Client(stack.bootstrap_servers)
        try:
            client.publish(CATALOG_EVENTS, read_catalog(catalog.catalog_path))
            client.wait_indexed(300)
        finally:
            client.close()
        yield stack.gateway.url, catalog


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the [test] extra) is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _loopback_only(route):
    # The page must work offline: anything but the gateway itself is refused.
    host = urlsplit(route.request.url).hostname
    if host in ("127.0.0.1", "localhost", "::1"):
        route.continue_()
    else:
        route.abort()


def test_shopper_uploads_a_photo_clicks_a_box_and_compares_prices(browser, site):
    url, catalog = site
    photo, product_id = catalog.queries[0]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.route("**/*", _loopback_only)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        # GIVEN the web page served by `lookalike up`'s gateway
        page.goto(url)
        assert page.title().startswith("lookalike")
        # WHEN the shopper uploads a photo
        page.set_input_files("#photo", str(photo))
        # THEN the photo appears with its objects as boxes (detection is off here: the whole photo)
        box = page.locator("#boxes .box").first
        box.wait_for(state="visible", timeout=60_000)
        assert page.locator("#preview").evaluate("img => img.naturalWidth") > 0
        page.locator(".card").first.wait_for(timeout=60_000)
        # WHEN they click a box
        page.evaluate("document.getElementById('results').innerHTML = ''")
        box.click()
        # THEN result cards show, the photographed product first, with a price and the comparison table
        first = page.locator(".card").first
        first.wait_for(timeout=60_000)
        assert first.get_attribute("data-product-id") == product_id
        # AND the calibrated answer: the photographed product is "Same product", the rest "Similar", no hedge line
        assert first.locator(".badge").inner_text() == "Same product"
        assert first.get_attribute("data-match") == "same"
        assert page.locator(".card").nth(1).locator(".badge").inner_text() == "Similar"
        assert page.locator("#answer").is_hidden()
        assert "€" in first.locator(".price .best").inner_text() or "EUR" in first.locator(".price .best").inner_text()
        rows = first.locator(".compare tbody tr")
        assert rows.count() >= 3
        assert first.locator(".thumb img").evaluate("img => img.complete && img.naturalWidth") > 0
        assert "box" in page.locator("#boxes .box").first.get_attribute("class")
        assert "selected" in page.locator("#boxes .box").first.get_attribute("class")
        assert page.locator("#status").get_attribute("class") == "status ok"
        # AND each card shows what matched: the catalogue photo's object as a box over its thumbnail
        # (detection is off: the whole stored photo), beside the region of the shopper's photo searched
        match = first.locator(".thumb .match-box")
        assert match.is_visible()
        inside = match.evaluate("""m => { const f = m.parentElement.getBoundingClientRect(),
                                                  b = m.getBoundingClientRect();
                                            return b.width > 0.9 * f.width && b.height > 0.9 * f.height
                                                   && b.left >= f.left - 1 && b.right <= f.right + 1; }""")
        assert inside, "the whole-photo match covers the thumbnail it is drawn on"
        assert first.locator(".query-side").is_visible()
        assert first.locator(".query-crop").evaluate(
            "c => c.getContext('2d').getImageData(32, 32, 1, 1).data[3]") == 255  # the photo was drawn there
        # AND the results say how fresh the catalogue is
        assert page.locator("#results-title .as-of").inner_text().startswith("catalogue as of ")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "search.png"), full_page=True)
        # WHEN they ask for more like the first result THEN recommendations replace the cards
        first.locator(".more").click()
        page.wait_for_function("document.getElementById('results-title').textContent.startsWith('More like')",
                               timeout=60_000)
        page.locator(".card").first.wait_for(timeout=60_000)
        assert product_id not in page.locator(".card").evaluate_all("cs => cs.map(c => c.dataset.productId)")
        # WHEN a filter leaves nothing THEN the page says so
        page.fill("#f-max", "0.01")
        page.click("#filters button[type=submit]")
        page.wait_for_function("document.getElementById('status').className.includes('empty')", timeout=60_000)
        assert "No matching products" in page.locator("#status").inner_text()
        page.screenshot(path=str(SCREENSHOTS / "no-results.png"), full_page=True)
        assert not errors, errors
    finally:
        page.close()
