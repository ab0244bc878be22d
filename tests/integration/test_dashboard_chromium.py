"""The dashboard in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
selenium): the page loads with no console error (a Content-Security-Policy violation is one), takes the
token, shows a message just sent by smtplib to a router whose delivery is paused, and a Retry clicked on the
page reaches the API (the API logs the retry by the token's name). Skipped when Chromium, its driver or
selenium is missing (``make test-peers`` installs the first two)."""

from __future__ import annotations

import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from tests.integration.test_delivery_twistd import message, send_all
from tests.test_api import ADMIN, ApiTestBase

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the test extras bring it
    webdriver = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
#: Seconds the browser waits for something to appear on the page.
PAGE_WAIT = 20


def open_browser() -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=DRIVER)
    return webdriver.Chrome(options=options, service=service)


class DashboardTests(ApiTestBase):
    timeout = 120

    def setUp(self) -> None:
        if webdriver is None:
            self.skipTest("selenium is not installed (pip install -e '.[test]')")
        if CHROMIUM is None or DRIVER is None:
            self.skipTest("chromium and chromium-driver are not installed (make test-peers installs them)")

    async def test_page_shows_a_message_and_retries_it(self) -> None:
        router = await self.start()
        lines: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        [smtp_port] = router.smtp_ports.values()
        [queue_id] = await deferToThread(send_all_to_example, smtp_port)

        browser = await deferToThread(open_browser)
        self.addCleanup(lambda: deferToThread(browser.quit))
        url = self.base + "/"

        def load_and_find() -> list[dict[str, Any]]:
            browser.get(url)
            wait = WebDriverWait(browser, PAGE_WAIT)
            field = wait.until(expected_conditions.visibility_of_element_located((By.ID, "token")))
            field.send_keys(ADMIN)
            browser.find_element(By.ID, "login-button").click()
            wait.until(
                expected_conditions.presence_of_element_located(
                    (By.CSS_SELECTOR, f'#messages tr[data-id="{queue_id}"]')
                )
            )
            # A token survives a reload of the page (sessionStorage), and the board comes back by itself.
            browser.refresh()
            wait.until(
                expected_conditions.element_to_be_clickable(
                    (By.CSS_SELECTOR, f'#messages button.retry[data-id="{queue_id}"]')
                )
            ).click()
            wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "notice"), "retry asked"))
            # The event stream reaches the page too (through fetch()): another message, its events listed.
            send_all_to_example(smtp_port)
            wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#events li"))
            return list(browser.get_log("browser"))

        console = await deferToThread(load_and_find)
        errors = [entry for entry in console if entry["level"] == "SEVERE"]
        self.assertEqual(errors, [])
        row_text = await deferToThread(
            lambda: browser.find_element(By.CSS_SELECTOR, f'#messages tr[data-id="{queue_id}"]').text
        )
        self.assertIn("sink@example.com", row_text)
        for _ in range(50):
            if any(f"{queue_id}: retry by API token ops" in line for line in lines):
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(
            any(f"{queue_id}: retry by API token ops" in line for line in lines), "\n".join(lines[-30:])
        )

    async def test_served_with_a_strict_policy(self) -> None:
        await self.start()
        code, body, headers = await self.call("GET", "/", token=None)
        self.assertEqual(code, 200)
        policy = headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("default-src 'none'", policy)
        self.assertIn("script-src 'self'", policy)
        self.assertNotIn("unsafe", policy)
        self.assertIn(b'<script src="/dashboard/dashboard.js"', body)
        code, _, _ = await self.call("POST", "/", token=None)
        self.assertEqual(code, 405)


def send_all_to_example(port: int) -> list[str]:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("sender@sender.test")
        smtp.rcpt("sink@example.com")
        code, text = smtp.data(message("dashboard", 1))
        assert code == 250, (code, text)
        return [text.split()[-1].decode("ascii")]


__all__ = ["DashboardTests", "send_all"]
