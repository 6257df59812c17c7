"""Take the README's screenshot of the app mid-run: open a running app in headless Chromium,
start a long generation, wait until the live memory graph has some denoising to show, save
the page, and cancel the run.

    python app.py &                               # the app to photograph
    python docs/make_screenshot.py --url http://127.0.0.1:7860/ --out docs/screenshot.png

Needs selenium (requirements-test.txt) and the system's chromium and chromedriver.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil

log = logging.getLogger("make_screenshot")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--out", default="docs/screenshot.png")
    parser.add_argument("--prompt", default="a large yellow star on a purple background, top right")
    parser.add_argument("--steps", type=int, default=400, help="enough for the run to be caught mid-way")
    parser.add_argument("--at-step", type=int, default=60, help="take the picture once denoising passes this step")
    parser.add_argument("--size", default="1440,1500", help="window width,height in pixels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={args.size}", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(args.url)
        wait = WebDriverWait(driver, 300, poll_frequency=0.2)
        wait.until(seen.element_to_be_clickable((By.CSS_SELECTOR, "#generate")))
        wait.until(lambda d: "chose" in d.find_element(By.CSS_SELECTOR, "#plan").text)
        for elem_id, value in (("prompt", args.prompt), ("steps", args.steps)):
            field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(str(value))
            field.send_keys(Keys.TAB)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def step(d) -> int:
            match = re.search(r"step (\d+)/", d.find_element(By.CSS_SELECTOR, "#status").text)
            return int(match.group(1)) if match else 0
        wait.until(lambda d: step(d) >= args.at_step)
        wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, "#ram-plot canvas")))
        driver.save_screenshot(args.out)
        log.info("saved %s at step %d", args.out, step(driver))
        driver.find_element(By.CSS_SELECTOR, "#cancel").click()
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
