"""The household privacy page in a real headless Chromium, against the real appliance processes.

What the page claims is checked on the appliance itself: the GStreamer capture child of the vision
process appears when consent is switched on and is gone when it is switched off; "delete my data"
empties the profile in the store.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest

from appliance.config.schema import PrivacyPageConfig
from appliance.privacy.server import PrivacyPage
from appliance.v1 import events_pb2
from tests.e2e.conftest import gst_children, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
LABEL = "Let the camera read the room's mood to improve recommendations"
GST_TEST_CAMERA = {"kind": "gstreamer", "pipeline": "test", "width": 320, "height": 240, "fps": 15}

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")


def test_consent_toggle_closes_the_camera_and_delete_empties_the_profile(make_appliance):
    sync_api = pytest.importorskip("playwright.sync_api")
    sup, client = make_appliance(capture=GST_TEST_CAMERA)
    sid = client.start_session("amira")
    items = client.rank(sid, k=3).items
    client.send_events(sid, [(events_pb2.EVENT_TYPE_PLAY, items[0].item_id),
                             (events_pb2.EVENT_TYPE_LIKE, items[1].item_id)])
    page_server = PrivacyPage(PrivacyPageConfig(port=0), f"unix:{sup.cfg.path(sup.cfg.serving.unix_socket)}").start()
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"])
            page = browser.new_page(viewport={"width": 900, "height": 1100})
            page.goto(page_server.url + "?profile=amira")
            sync_api.expect(page.get_by_role("status")).to_have_text("Camera is off")
            sync_api.expect(page.locator("#events")).to_have_text("2")
            sync_api.expect(page.locator("#why li")).to_have_count(5)
            page.screenshot(path=str(SHOTS / "privacy-page-camera-off.png"), full_page=True)
            assert gst_children(sup.pid("vision")) == []

            # Keyboard only: focus the switch by its label and press Space.
            page.get_by_label(LABEL).focus()
            page.keyboard.press("Space")
            wait_for(lambda: gst_children(sup.pid("vision")), 10)  # the camera really opened
            sync_api.expect(page.get_by_role("status")).to_have_text("Camera is on", timeout=10_000)
            page.screenshot(path=str(SHOTS / "privacy-page-camera-on.png"), full_page=True)

            page.get_by_label(LABEL).uncheck()
            wait_for(lambda: not gst_children(sup.pid("vision")), 2, period_s=0.01)  # closed on the box
            sync_api.expect(page.get_by_role("status")).to_have_text("Camera is off", timeout=5_000)

            page.get_by_role("button", name="Delete my data").click()
            page.get_by_role("button", name="Yes, delete everything for this profile").click()
            sync_api.expect(page.locator("#delete-state")).to_contain_text("Deleted 2 events and 1 sessions")
            page.screenshot(path=str(SHOTS / "privacy-page-deleted.png"), full_page=True)
            browser.close()
    finally:
        page_server.stop()
    with pytest.raises(grpc.RpcError) as err:
        client.explain("amira")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
