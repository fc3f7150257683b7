"""Regenerate docs/screenshot.png: the chat page with a short conversation between three tabs.

    .venv/bin/python docs/screenshot.py [--out docs/screenshot.png] [--dark]

Starts ``python chat.py`` on a free port of 127.0.0.1, opens three browser tabs with
Playwright (Debian's Chromium, headless; set CHROMIUM to use another binary), has them chat a
little, and saves what the first tab shows.
"""
import argparse
import os
import re
import subprocess
import sys
import threading

from playwright.sync_api import expect, sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SIZE = {"width": 1280, "height": 760}


def start_server():
    """``python chat.py`` on a free port; returns (process, base URL)."""
    env = dict(os.environ, HOST="127.0.0.1", PORT="0", PYTHONUNBUFFERED="1", LOG_LEVEL="INFO")
    proc = subprocess.Popen([sys.executable, "chat.py"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        match = re.search(r"Listening on http://[^:]+:(\d+)/", line)
        if match:
            # Keep reading so the server never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, "http://127.0.0.1:%s" % match.group(1)
    raise SystemExit("chat.py did not start")


def tab(browser, url, nick, dark):
    context = browser.new_context(viewport=SIZE, device_scale_factor=1,
                                  color_scheme="dark" if dark else "light")
    page = context.new_page()
    page.goto(url)
    expect(page.get_by_test_id("status")).to_have_text("Connected")
    page.get_by_label("Your name").fill(nick)
    page.get_by_label("Your name").press("Enter")
    expect(page.get_by_test_id("members")).to_contain_text(nick)
    return page


def say(page, text):
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("composer").press("Enter")
    expect(page.locator(".msg-text", has_text=text).last).to_be_visible()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "screenshot.png"))
    ap.add_argument("--dark", action="store_true", help="the dark colour scheme")
    args = ap.parse_args()

    proc, url = start_server()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            ada = tab(browser, url + "/", "Ada", args.dark)
            grace = tab(browser, url + "/", "Grace Hopper", args.dark)
            alan = tab(browser, url + "/", "Alan", args.dark)
            for page in (ada, grace):
                page.get_by_label("Join or create a room").fill("design")
                page.get_by_label("Join or create a room").press("Enter")
                page.get_by_label("Join or create a room").fill("random")
                page.get_by_label("Join or create a room").press("Enter")
                page.get_by_test_id("rooms").get_by_role("link", name="lobby").click()

            say(grace, "Morning! Did the reconnect work land?")
            say(ada, "It did. Stop the server and watch both tabs come back by themselves.")
            say(grace, "Just tried it: the message I typed while it was down arrived exactly once.")
            say(grace, "And the earlier ones were still there, no duplicates.")
            say(alan, "Nice. Will it survive my phone on the train?")
            say(ada, "Backoff with jitter, capped at a few seconds, and anything not yet "
                     "acknowledged is resent with its original ref.\nSo yes, it should.")
            grace.get_by_test_id("rooms").get_by_role("link", name="random").click()
            say(grace, "Cake in the kitchen, second floor")
            grace.get_by_test_id("rooms").get_by_role("link", name="lobby").click()
            grace.get_by_test_id("members").get_by_role("button", name=re.compile("Ada")).click()
            say(grace, "Lunch at one?")
            alan.get_by_test_id("composer").type("Sounds good to me")  # leaves "is typing…"
            expect(ada.get_by_test_id("typing")).to_have_text("Alan is typing…")
            ada.get_by_test_id("composer").fill("")
            ada.mouse.move(0, SIZE["height"] - 1)  # no hover highlight in the picture
            ada.screenshot(path=args.out)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    print("wrote", os.path.relpath(args.out, ROOT))


if __name__ == "__main__":
    main()
