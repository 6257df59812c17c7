"""The page in a real browser: headless Chromium (the system's, through Selenium and the
system's chromedriver; nothing is downloaded) opens the app, fills in a job, clicks
Generate, waits for the image, the memory graph and the summary, and saves a screenshot."""

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver (Debian: chromium chromium-driver)")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def fill(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value))
    field.send_keys(Keys.TAB)


def test_the_page_generates_and_draws_the_memory_graph(app_server, browser, tmp_path):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(app_server.url)
    # The page re-renders what it updates: an element found a moment ago may be gone.
    wait = WebDriverWait(browser, 120, poll_frequency=0.2,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    wait.until(seen.element_to_be_clickable((By.CSS_SELECTOR, "#generate")))
    # The plan appears on load: the decision tree's choice for the model the server opened with.
    wait.until(lambda d: "decision tree chose" in d.find_element(By.CSS_SELECTOR, "#plan").text)
    fill(browser, "prompt", "a red circle on a blue background")
    for elem_id, value in (("width", 64), ("height", 64), ("steps", 4)):
        fill(browser, elem_id, value)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()

    image = wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, "#gallery img")))
    wait.until(lambda d: "peak RAM" in d.find_element(By.CSS_SELECTOR, "#summary").text)
    # Vega draws the graph on a canvas as wide as its panel.
    canvas = wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, "#ram-plot canvas")))
    assert canvas.size["width"] > 200 and canvas.size["height"] > 100
    assert image.get_attribute("src")
    assert "Done in" in browser.find_element(By.CSS_SELECTOR, "#status").text
    summary = browser.find_element(By.CSS_SELECTOR, "#summary").text
    assert "s/step" in summary and "moved host → device" in summary
    shot = Path(tmp_path) / "app.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # Bad input: the page says what is wrong, and the next good run is served.
    fill(browser, "width", 33)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda d: d.find_elements(By.XPATH, "//*[contains(text(), 'width: 33 is not a multiple of 8')]"))
    first_image = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    fill(browser, "width", 64)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src") != first_image
               and "Done in" in d.find_element(By.CSS_SELECTOR, "#status").text)
    assert "reused (already loaded)" in browser.find_element(By.CSS_SELECTOR, "#summary").text
