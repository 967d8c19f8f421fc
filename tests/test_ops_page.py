"""The live operations page end to end in headless Chromium: numbers change during a spike
and settle on the right values; an admin pauses the release from the page."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import orjson
import pytest
from playwright.async_api import async_playwright
from processes import ServiceProcess, stop_all
from support import Resident, release_definition

from release_service.devtools.seed import seed_users

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def pipeline(stack_settings, tmp_path):
    processes = [
        ServiceProcess(stack_settings, tmp_path, "relay", name="relay",
                       sms_sink_path=str(tmp_path / "sink.jsonl")),
        ServiceProcess(stack_settings, tmp_path, "consume", "bookings", name="bookings"),
        ServiceProcess(stack_settings, tmp_path, "consume", "sms", name="sms",
                       sms_sink_path=str(tmp_path / "sink.jsonl")),
    ]
    for process in processes:
        process.start()
    yield
    stop_all(processes)


async def test_ops_page_follows_a_spike_and_pauses(api, gateway_url, stack_settings,
                                                   pipeline, tmp_path):
    users = tmp_path / "users.jsonl"
    await seed_users(stack_settings, 60, users, progress=False)
    people = [Resident(r["account_id"], r["person_ids"][0], r["token"])
              for r in map(orjson.loads, users.read_text().splitlines())]
    release = await api.create_release(release_definition([20, 10]))
    rid = release["release_id"]
    OUTPUT.mkdir(exist_ok=True)

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = await browser.new_page(viewport={"width": 1200, "height": 700})
        await page.goto(f"{gateway_url}/ops")
        await page.fill("#token", stack_settings.admin_token)
        await page.click("#connect")
        card = page.locator(f'[data-release-id="{rid}"]')
        await card.locator(".remaining").filter(has_text="30 / 30").wait_for(timeout=10_000)
        assert await page.text_content("#connection") == "live"

        results = await asyncio.gather(*(api.claim(rid, p) for p in people))
        assert sum(status == 201 for status, _, _ in results) == 30

        await card.locator(".remaining").filter(has_text="0 / 30").wait_for(timeout=10_000)
        await card.locator(".bookings").filter(has_text="30").wait_for(timeout=30_000)
        await card.locator(".sms").filter(has_text="30").wait_for(timeout=30_000)
        assert (await card.locator(".status").text_content()) == "sold out"
        await card.locator(".backlog").filter(has_text="0").wait_for(timeout=10_000)
        assert await card.locator(".slot-remaining").all_text_contents() == \
            ["0 left", "0 left"]
        await page.screenshot(path=str(OUTPUT / "ops-sold-out.png"), full_page=True)

        await card.locator('button[data-action="pause"]').click()
        await card.locator(".status").filter(has_text="paused").wait_for(timeout=10_000)
        assert (await api.admin_release(rid))["state"] == "paused"
        await page.screenshot(path=str(OUTPUT / "ops-paused.png"), full_page=True)
        await browser.close()


async def test_ops_stream_needs_the_admin_token(api):
    status, _, body = await api.call("GET", "/ops/stream")
    assert (status, body["code"]) == (401, "unauthorized")
