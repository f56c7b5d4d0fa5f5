"""The console in a real headless browser (Debian's chromium driven by Selenium through chromedriver),
against a real sidecar: two approvers sign in in two browser sessions, see a hold appear, approve it as
themselves while the notification receiver is down and then back; the agent's retry goes through and the
owner sees the spend move. With PAYSENTRY_SCREENSHOTS=DIR every page is saved there (make screenshots).
Also, over plain HTTP: owner isolation, CSRF, and sessions ending with their token."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests.e2e import test_approvals
from tests.e2e.conftest import Deployment, make_deployment, wait_until
from tests.e2e.test_approvals import SECRET, Receiver

pytestmark = pytest.mark.e2e
receiver = test_approvals.receiver  # the notification receiver fixture, shared
POLICY = """
    name: console
    limits:
      - {name: daily_budget, window: day, currency: usd, max_amount: 100000}
    rules:
      - name: large
        effect: hold
        when: payment.amount > 5000
        message: large payments need alice and bob
        hold_expiry: 5m
        approval: {approvers: [alice, bob], quorum: 2}
"""
SHOTS = os.environ.get("PAYSENTRY_SCREENSHOTS", "")


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "the browser test needs Debian's chromium and chromium-driver: make browser"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def console(tmp_path: Path, receiver: Receiver) -> Iterator[Deployment]:
    dep = make_deployment(
        tmp_path,
        POLICY,
        extra_config=(
            f"notify_webhooks: http://127.0.0.1:{receiver.port}/hook\nnotify_secret: {SECRET}\n"
            "notify_retry_max: 0.5s\n"
        ),
    )
    for name in ("alice", "bob"):
        dep.approvers[name] = json.loads(dep.cli("approver", "create", name).stdout)["token"]
    dep.start()
    stripe.api_base, stripe.api_key, stripe.max_network_retries = dep.agent_url, dep.agent_token, 0
    yield dep
    dep.stop()


def sign_in(driver: Any, dep: Deployment, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(dep.admin_url + "/console/")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    assert driver.current_url.endswith("/console/approvals"), driver.page_source[-1500:]


def shot(driver: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / f"{name}.png"))


def click(driver: Any, selector: str) -> None:
    """Click once the element is there; the pending pages reload themselves every 3 s, so an element
    found just before a reload is looked up again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def attempt() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return True
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    wait_until(attempt, timeout=15)


def approve_in_browser(driver: Any, approval_id: str) -> str:
    from selenium.webdriver.common.by import By

    wait_until(lambda: approval_id in driver.page_source, timeout=15)  # the page refreshes itself
    click(driver, f"a.hold[href$='{approval_id}']")
    click(driver, "#vote button.approve")
    wait_until(lambda: bool(driver.find_elements(By.ID, "flash")), timeout=15)
    return str(driver.find_element(By.ID, "flash").text)


def test_two_approvers_approve_in_two_browsers_and_the_retry_goes_through(
    console: Deployment, receiver: Receiver
) -> None:
    from selenium.webdriver.common.by import By

    receiver.down = True
    alice, bob = browser(), browser()
    try:
        sign_in(alice, console, console.approvers["alice"])
        assert "approver alice" in alice.find_element(By.ID, "who").text
        shot(alice, "login-done-holds-empty")
        with pytest.raises(stripe.error.CardError) as held:
            stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
        approval_id = held.value.json_body["error"]["paysentry"]["approval_id"]
        wait_until(lambda: approval_id in alice.page_source, timeout=15)
        assert "60.00 USD" in alice.page_source and "console.large" in alice.page_source
        shot(alice, "holds-pending")
        said = approve_in_browser(alice, approval_id)
        assert "is counted" in said and "pending" in said
        shot(alice, "hold-one-vote")
        alice.refresh()
        assert "you voted approve" in alice.page_source  # no second form: one person, one vote

        sign_in(bob, console, console.approvers["bob"])
        receiver.down = False  # the receiver comes back: the retried notification arrives
        said = approve_in_browser(bob, approval_id)
        assert "is counted" in said and "approved" in said
        shot(bob, "hold-approved")
        wait_until(lambda: any(n["approval_id"] == approval_id for n in receiver.notifications))
        assert len(receiver.attempts) >= 2  # refused while down, then delivered

        intent = stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
        assert intent.amount == 6000 and len(console.mock_payments()) == 1

        bob.get(console.admin_url + "/console/agents")
        assert "Owners only" in bob.page_source  # an approver sees the holds, nothing else
    finally:
        alice.quit()
        bob.quit()

    owner = browser()
    try:
        sign_in(owner, console, console.owner_token)
        owner.get(console.admin_url + "/console/agents")

        def agents_page_shows_bot() -> bool:  # under load the page may come slowly: ask again
            if owner.find_elements(By.CSS_SELECTOR, ".agent[data-agent='bot']"):
                return True
            owner.get(console.admin_url + "/console/agents")
            return False

        try:
            wait_until(agents_page_shows_bot, timeout=20, interval=1.0)
        except AssertionError:
            raise AssertionError(owner.page_source[-3000:]) from None
        card = owner.find_element(By.CSS_SELECTOR, ".agent[data-agent='bot']")
        assert "team=ads" in card.text and "active" in card.text
        assert re.search(r"daily_budget\s+day\s+day:\S+\s+60\.00 USD\s+1000\.00 USD\s+940\.00 USD", card.text)
        assert owner.find_elements(By.CSS_SELECTOR, "svg.chart rect")
        shot(owner, "agents")
        owner.get(console.admin_url + "/console/decisions?decision=hold")
        assert "console.large" in owner.page_source
        shot(owner, "decisions")
        owner.get(console.admin_url + "/console/audit?type=approval.")
        text = owner.find_element(By.TAG_NAME, "table").text
        assert "approval.vote alice" in text and "approval.vote bob" in text and '"kind": "approver"' in text
        shot(owner, "audit")
        owner.get(console.admin_url + "/console/policy")
        assert (
            owner.find_element(By.ID, "revision").text
            and "none" in owner.find_element(By.ID, "reload-error").text
        )
        shot(owner, "policy")
        owner.get(console.admin_url + "/console/connections")
        assert "mock" in owner.page_source and "sk_test" not in owner.page_source  # never credentials
        shot(owner, "connections")
        owner.get(console.admin_url + f"/console/approvals/{approval_id}")
        shot(owner, "hold-detail")
    finally:
        owner.quit()


class Session:
    """A console session over plain HTTP (cookies kept, redirects not followed)."""

    def __init__(self, dep: Deployment) -> None:
        self.dep, self.jar = dep, http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any) -> None:
                return None

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)

    def call(self, path: str, form: dict[str, str] | None = None) -> tuple[int, str, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(self.dep.admin_url + path, data=data, timeout=10) as resp:
                return resp.status, resp.read().decode(), resp.headers.get("Location", "")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), exc.headers.get("Location", "")

    def sign_in(self, token: str) -> None:
        status, _, location = self.call("/console/login", {"token": token})
        assert status == 303 and location == "/console/approvals"

    def csrf(self) -> str:
        match = re.search(r"name='csrf' value='([^']+)'", self.call("/console/approvals")[1])
        assert match
        return match.group(1)


def test_owner_isolation_csrf_and_sessions(console: Deployment) -> None:
    with pytest.raises(stripe.error.CardError) as held:
        stripe.PaymentIntent.create(amount=7000, currency="usd", idempotency_key="order-2")
    approval_id = held.value.json_body["error"]["paysentry"]["approval_id"]
    assert Session(console).call("/console/approvals")[0] == 303  # not signed in: to the sign-in page
    other_token = json.loads(console.cli("owner", "create", "globex").stdout)["token"]
    other = Session(console)
    other.sign_in(other_token)
    assert approval_id not in other.call("/console/approvals")[1]
    assert other.call(f"/console/approvals/{approval_id}")[0] == 404  # another owner's hold: not found
    assert (
        "data-agent='bot'" not in other.call("/console/agents")[1]
        and console.agent_id not in other.call("/console/decisions")[1]
    )
    for page in (  # every page, and filters naming acme's agent: nothing of acme's shows
        "/console/audit",
        f"/console/audit?agent={console.agent_id}",
        f"/console/decisions?agent={console.agent_id}&decision=hold",
        "/console/connections",
        "/console/policy",
    ):
        status, body, _ = other.call(page)
        assert status == 200, (page, status)
        needles = (approval_id, console.agent_id, console.connection_id, "authorization.held", "order-2")
        leaked = [v for v in needles if v in body]
        assert not leaked, (page, leaked)
    status, _, _ = other.call(
        f"/console/approvals/{approval_id}/vote", {"decision": "approve", "csrf": other.csrf()}
    )
    assert status == 404

    alice = Session(console)
    alice.sign_in(console.approvers["alice"])
    assert alice.call(f"/console/approvals/{approval_id}/vote", {"decision": "approve"})[0] == 403  # no CSRF
    assert (
        alice.call(f"/console/approvals/{approval_id}/vote", {"decision": "approve", "csrf": "x"})[0] == 403
    )
    owner = Session(console)
    owner.sign_in(console.owner_token)
    mine = owner.call(f"/console/audit?agent={console.agent_id}")[1]
    assert "authorization.held" in mine and console.connection_id in mine  # what globex's pages lack
    status, body, _ = owner.call(
        f"/console/approvals/{approval_id}/vote", {"decision": "approve", "csrf": owner.csrf()}
    )
    assert status == 403 and "not an approver" in body  # the owner never poses as an approver
    assert console.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["votes"] == []
    assert Session(console).call("/console/login", {"token": "psa_0000000000000000_nope"})[0] == 401
    evil = Session(console)
    assert (
        evil.call(
            "/console/login?next=//evil.example/", {"token": console.owner_token, "next": "//evil.example/"}
        )[2]
        == "/console/approvals"
    )

    alice_id = next(
        a["id"]
        for a in json.loads(console.cli("approver", "list", "--owner", "acme").stdout)
        if a["name"] == "alice"
    )
    console.cli("approver", "revoke", alice_id, "--owner", "acme")
    assert alice.call("/console/approvals")[0] == 303  # revoked: the session ends with the token
