"""The chat page in headless Chromium: tabs talking, rooms, presence, recovery and safety.

Each tab is its own browser context (its own localStorage, like two people). Every page's
console is watched: an error or warning fails the test, except the browser's own
"WebSocket connection ... failed" lines in tests that take the network or server away.
"""
import os
import re
import socket
import time

import pytest
from playwright import sync_api as playwright_api

expect = playwright_api.expect

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RECONNECT = 15_000  # ms: backoff is capped at 5 s, so two retries fit with room to spare
SOCKET_FAILED = re.compile(r"WebSocket connection to '.*' failed")

expect.set_options(timeout=5_000)


@pytest.fixture(scope="module")
def browser():
    # A missing browser fails the run (tests/run installs it): a skipped page test would pass
    # a CI that never looked at the page.
    assert os.path.exists(CHROMIUM), "no Chromium at %s (Debian: apt-get install chromium)" % CHROMIUM
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Tabs:
    """Opens pages, each in a fresh context, and collects what their consoles complain about."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts = []
        self.problems = []
        self.allowed = []

    def open(self, server, path="/", viewport=None, init_script=None, wait=True, touch=False):
        context = self.browser.new_context(viewport=viewport or {"width": 1200, "height": 800},
                                           has_touch=touch, is_mobile=touch)
        self.contexts.append(context)
        if init_script:
            context.add_init_script(init_script)
        page = context.new_page()
        page.on("console", lambda msg: self._console(page, msg))
        page.on("pageerror", lambda exc: self.problems.append("uncaught: %s" % exc))
        page.goto(server.url + path)
        if wait:
            expect(status(page)).to_have_text("Connected")
        return page

    def allow_socket_failures(self):
        """This test takes the server or network away: the browser will log failed sockets."""
        self.allowed.append(SOCKET_FAILED)

    def _console(self, page, msg):
        if msg.type in ("error", "warning") and not any(p.search(msg.text) for p in self.allowed):
            self.problems.append("%s %s: %s" % (page.url, msg.type, msg.text))

    def close(self):
        for context in self.contexts:
            context.close()


@pytest.fixture
def tabs(browser):
    tabs = Tabs(browser)
    yield tabs
    tabs.close()
    assert not tabs.problems, "the browser console reported:\n" + "\n".join(tabs.problems)


# -- helpers ------------------------------------------------------------------------------------

def status(page):
    return page.get_by_test_id("status")


def log(page, key="lobby"):
    return page.locator('[data-testid="messages"][data-key="%s"]' % key)


def texts(page, key="lobby"):
    """The message texts shown in conversation ``key``, in order."""
    return log(page, key).locator(".msg-text").all_inner_texts()


def message(page, text, key="lobby"):
    return log(page, key).get_by_test_id("message").filter(has_text=text)


def say(page, text):
    box = page.get_by_test_id("composer")
    box.fill(text)
    box.press("Enter")


def go_offline(page):
    """Take the tab's network away; it says so."""
    page.context.set_offline(True)
    expect(status(page)).to_have_text("Reconnecting…")


def come_back(page):
    """Give the tab its network back; it reconnects by itself."""
    page.context.set_offline(False)
    expect(status(page)).to_have_text("Connected", timeout=RECONNECT)


def members(page):
    return page.get_by_test_id("members")


def set_nick(page, nick):
    page.get_by_label("Your name").fill(nick)
    page.get_by_label("Your name").press("Enter")


def open_direct(a, b, nick):
    """B takes ``nick``; A opens a direct conversation with B."""
    set_nick(b, nick)
    members(a).get_by_role("button", name=re.compile(nick)).click()
    expect(a.get_by_test_id("room-title")).to_have_text(nick)


def wait_until(page, predicate, timeout=5.0, what="condition"):
    """Poll ``predicate`` while letting ``page`` deliver its events (console lines, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        page.wait_for_timeout(50)
    raise AssertionError("timed out waiting for " + what)


# -- the scenarios -------------------------------------------------------------------------------

def test_two_tabs_chat_both_ways(server, tabs):
    """What one tab sends the other shows, both ways, with local times and acks; the message
    box has the focus from the start."""
    a = tabs.open(server)
    b = tabs.open(server)
    expect(a.get_by_test_id("composer")).to_be_focused()
    a.keyboard.type("Hello from A")
    a.keyboard.press("Enter")
    expect(message(b, "Hello from A")).to_be_visible()
    expect(message(a, "Hello from A")).to_have_attribute("data-status", "sent")
    say(b, "Hi A, B here")
    expect(message(a, "Hi A, B here")).to_be_visible()
    assert texts(a) == texts(b) == ["Hello from A", "Hi A, B here"]

    # Shift+Enter is a new line, Enter sends.
    box = a.get_by_test_id("composer")
    box.type("line one")
    box.press("Shift+Enter")
    box.type("line two")
    box.press("Enter")
    expect(log(b).locator(".msg-text").last).to_have_text("line one\nline two")
    expect(box).to_have_value("")

    # Times are the reader's local clock, with the full date on hover.
    stamp = message(b, "Hello from A").locator("time")
    assert re.match(r"\d{4}-\d\d-\d\dT", stamp.get_attribute("datetime"))
    assert stamp.get_attribute("title")
    local = b.evaluate("(iso) => new Date(iso).toLocaleTimeString(undefined, "
                       "{hour: 'numeric', minute: '2-digit'})", stamp.get_attribute("datetime"))
    expect(stamp).to_have_text(local)
    expect(members(a).locator("li")).to_have_count(2)


def test_nickname_change_is_seen_by_the_other_tab_and_kept(server, tabs):
    """A new nick shows in the other tab's member list and messages, and survives a reload."""
    a = tabs.open(server)
    b = tabs.open(server)
    set_nick(a, "Ada Lovelace")
    expect(members(b)).to_contain_text("Ada Lovelace")
    expect(log(b).get_by_test_id("notice").filter(has_text="is now Ada Lovelace")).to_be_visible()
    say(a, "my name is Ada")
    expect(message(b, "my name is Ada").locator(".author")).to_have_text("Ada Lovelace")

    a.reload()
    expect(status(a)).to_have_text("Connected")
    expect(a.get_by_label("Your name")).to_have_value("Ada Lovelace")
    expect(members(a)).to_contain_text("Ada Lovelace")
    expect(members(b).locator("li", has_text="Ada Lovelace")).to_have_count(1)


def test_a_rename_right_after_arriving_is_told_as_the_arrival_unless_they_spoke(server, tabs):
    """Someone who names themselves right after arriving just "joined" under that name; once
    they have said something under the old one, the rename is told, so their words are not
    left under a name that no notice explains."""
    a = tabs.open(server)
    b = tabs.open(server)
    notices = log(a).get_by_test_id("notice")
    expect(notices).to_have_count(1)
    old = notices.first.inner_text().removesuffix(" joined")
    say(b, "first words")
    expect(message(a, "first words").locator(".author")).to_have_text(old)
    set_nick(b, "Dora")
    expect(notices.filter(has_text="is now Dora")).to_have_text("%s is now Dora" % old)
    expect(notices.first).to_have_text("%s joined" % old)

    c = tabs.open(server)
    set_nick(c, "Cy")
    expect(notices.filter(has_text="Cy")).to_have_text("Cy joined")


def test_a_name_chosen_offline_is_confirmed_and_labels_what_was_typed_meanwhile(server, tabs):
    """The name field says when the server took a new name, including one chosen offline,
    and messages typed offline show the name the others will see them under."""
    tabs.allow_socket_failures()
    a = tabs.open(server)
    b = tabs.open(server)
    note = a.locator("#nick-note")
    set_nick(a, "Ada")
    expect(note).to_have_text("Saved: you are “Ada”.")
    go_offline(a)
    set_nick(a, "Ada Offline")
    expect(note).to_have_text("Saved: it will be used once connected.")
    say(a, "typed while offline")
    come_back(a)
    expect(note).to_have_text("Saved: you are “Ada Offline”.")
    expect(message(b, "typed while offline").locator(".author")).to_have_text("Ada Offline")
    expect(message(a, "typed while offline").locator(".author")).to_have_text("Ada Offline")


def test_the_newest_message_stays_in_view_when_the_phone_turns(server, tabs):
    """A log showing its end goes on showing it when the screen gets shorter."""
    a = tabs.open(server, viewport={"width": 375, "height": 667}, touch=True)
    for n in range(15):
        say(a, "line %d of a conversation that fills the screen" % n)
    last = message(a, "line 14 of")
    expect(last).to_have_attribute("data-status", "sent")
    a.set_viewport_size({"width": 667, "height": 375})

    def last_in_view():
        box, view = last.bounding_box(), log(a).bounding_box()
        return box and view and box["y"] + box["height"] <= view["y"] + view["height"] + 1
    wait_until(a, last_in_view, what="the newest message in view after turning")


def test_a_drawer_open_when_the_screen_widens_leaves_the_page_usable(server, tabs):
    """The member drawer open at tablet width, then the window widened: the list is a side
    panel again and the rest of the page works (nothing left inert)."""
    a = tabs.open(server, viewport={"width": 900, "height": 700})
    a.locator("#members-toggle").click()
    expect(a.locator("#members-panel")).to_be_visible()
    a.set_viewport_size({"width": 1300, "height": 700})
    wait_until(a, lambda: not a.evaluate("document.getElementById('chat').inert"),
               what="the page usable again")
    say(a, "typed after widening")
    expect(message(a, "typed after widening")).to_have_attribute("data-status", "sent")


def test_a_small_phone_shows_the_whole_status_during_an_outage(server, tabs):
    """At 320 px, "Reconnecting…" and "Retry now" are readable and tappable, clear of the
    buttons beside them."""
    tabs.allow_socket_failures()
    a = tabs.open(server, viewport={"width": 320, "height": 568}, touch=True)
    go_offline(a)
    retry = a.locator("#retry")
    expect(retry).to_be_visible()
    text, button, members = (a.locator(s).bounding_box() for s in (
        "#status-text", "#retry", "#members-toggle"))
    assert text["width"] >= a.evaluate("document.getElementById('status-text').scrollWidth") - 1
    for box in (text, button):
        assert box["x"] >= 0 and box["x"] + box["width"] <= 320, box
        overlaps = not (box["x"] + box["width"] <= members["x"] or members["x"] + members["width"] <= box["x"]
                        or box["y"] + box["height"] <= members["y"] or members["y"] + members["height"] <= box["y"])
        assert not overlaps, (box, members)
    retry.click()  # tappable: nothing lies over it
    come_back(a)


def test_drawers_on_a_phone_close_from_their_own_button(server, tabs):
    """On a phone the rooms and members drawers each have a close button, which gives the
    focus back to the button that opened them."""
    a = tabs.open(server, viewport={"width": 375, "height": 667}, touch=True)
    for toggle_id, panel, close in (("#rooms-toggle", "#sidebar", "close-rooms"),
                                    ("#members-toggle", "#members-panel", "close-members")):
        a.locator(toggle_id).click()
        expect(a.locator(panel)).to_be_visible()
        for _ in range(12):  # Tab stays in the drawer (or leaves the page), never behind it
            a.keyboard.press("Tab")
            assert a.evaluate("""s => document.querySelector(s).contains(document.activeElement)
                                 || document.activeElement === document.body""", panel)
        a.get_by_test_id(close).click()
        expect(a.locator(panel)).not_to_be_visible()
        expect(a.locator(toggle_id)).to_be_focused()
        expect(a.locator(toggle_id)).to_have_attribute("aria-expanded", "false")


def test_what_the_page_cannot_take_is_said_not_dropped(server, tabs):
    """A room name too long or not a name in the address, and a paste longer than a message
    may be, each get a note saying so."""
    a = tabs.open(server, path="/#" + "r" * 70)
    toast = a.locator("#toast")
    expect(toast).to_contain_text("too long for a room name: at most 64 characters")
    expect(a.get_by_test_id("room-title")).to_have_text("#lobby")
    a.goto(server.url + "/#no%20spaces")
    expect(toast).to_contain_text("“no spaces” is not a room name")
    a.evaluate("""() => {
        const data = new DataTransfer();
        data.setData("text", "x".repeat(5000));
        document.getElementById("composer-text").dispatchEvent(
            new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
    }""")
    expect(toast).to_contain_text("at most 4,000 characters: the rest of what you pasted was left out")


def test_back_leaves_a_refused_room_link(server, tabs):
    """A link to a name that is no room shows the lobby in its place, so Back goes where the
    user was instead of to the refused link again (and on to the lobby, for ever). A stray
    "%" is refused by its own spelling, not silently."""
    a = tabs.open(server, path="/#kitchen")
    title, toast = a.get_by_test_id("room-title"), a.locator("#toast")
    expect(title).to_have_text("#kitchen")
    a.evaluate("location.hash = '#no%20spaces'")
    expect(toast).to_contain_text("“no spaces” is not a room name")
    expect(title).to_have_text("#lobby")
    assert a.evaluate("location.hash") == "#lobby"
    a.evaluate("history.back()")
    expect(title).to_have_text("#kitchen")
    assert a.evaluate("location.hash") == "#kitchen"
    a.evaluate("location.hash = '#100%'")
    expect(toast).to_contain_text("“100%” is not a room name")


def test_leaving_a_room_whose_message_is_unanswered_lets_the_next_go(server, tabs):
    """Messages go one at a time; leaving the room of the one still waiting for its ack
    sends the next at once, not at the next heartbeat."""
    a = tabs.open(server, init_script=DROP_ACKS)
    a.get_by_label("Join or create a room").fill("quiet")
    a.get_by_label("Join or create a room").press("Enter")
    expect(a.get_by_test_id("room-title")).to_have_text("#quiet")
    a.evaluate("window.dropAcks = true")
    say(a, "never acked")
    expect(message(a, "never acked", key="quiet")).to_have_attribute("data-status", "pending")
    a.evaluate("window.dropAcks = false")
    a.evaluate("location.hash = '#lobby'")
    expect(a.get_by_test_id("room-title")).to_have_text("#lobby")
    say(a, "queued behind it")
    a.wait_for_timeout(300)
    expect(message(a, "queued behind it")).to_have_attribute("data-status", "pending")
    a.evaluate("location.hash = '#quiet'")
    a.once("dialog", lambda dialog: dialog.accept())  # yes, drop "never acked"
    a.get_by_test_id("leave").click()
    expect(message(a, "queued behind it")).to_have_attribute("data-status", "sent", timeout=2500)


def test_a_message_too_big_for_the_server_fails_instead_of_blocking(start_server, tabs):
    """With a small MAX_MESSAGE_SIZE (the welcome says it), a message too big for it is
    marked as not sent, without costing the connection, and the ones after it go through."""
    server = start_server(env={"MAX_MESSAGE_SIZE": "300"})
    a = tabs.open(server)
    say(a, "é" * 150)  # 150 characters, 300 bytes of UTF-8, more with the JSON around them
    say(a, "short and fine")
    expect(message(a, "é" * 150)).to_have_attribute("data-status", "failed")
    expect(message(a, "é" * 150)).to_contain_text("too long for this server (at most 300 bytes)")
    expect(message(a, "short and fine")).to_have_attribute("data-status", "sent")
    expect(status(a)).to_have_text("Connected")
    assert "1009" not in server.log()


def test_leaving_a_room_with_unsent_messages_asks_first(server, tabs):
    """Leaving drops what is not sent yet to the room: the page asks, and staying keeps it."""
    tabs.allow_socket_failures()
    a = tabs.open(server, path="/#drafts")
    expect(a.get_by_test_id("room-title")).to_have_text("#drafts")
    go_offline(a)
    say(a, "not sent 1")
    say(a, "not sent 2")
    asked = []

    def answer(dialog, accept):
        asked.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()
    a.once("dialog", lambda d: answer(d, False))
    a.get_by_test_id("leave").click()
    expect(a.get_by_test_id("room-title")).to_have_text("#drafts")
    assert asked == ["2 messages to #drafts not sent yet will be dropped. Leave anyway?"]
    a.context.set_offline(False)
    expect(message(a, "not sent 2", key="drafts")).to_have_attribute("data-status", "sent",
                                                                      timeout=RECONNECT)
    a.get_by_test_id("leave").click()  # nothing unsent: no question
    expect(a.get_by_test_id("room-title")).to_have_text("#lobby")
    assert len(asked) == 1


def test_closing_the_tab_with_unsent_messages_asks_first(server, tabs):
    """Closing the tab loses what is not confirmed yet: the browser asks first, and staying
    keeps it; once everything is confirmed the tab closes without a question."""
    tabs.allow_socket_failures()
    a = tabs.open(server)
    go_offline(a)
    say(a, "typed on the train")
    with a.expect_event("dialog", timeout=5_000) as asked:
        a.close(run_before_unload=True)
    assert asked.value.type == "beforeunload"
    asked.value.dismiss()  # stay
    come_back(a)
    expect(message(a, "typed on the train")).to_have_attribute("data-status", "sent")
    dialogs = []
    a.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.accept()))
    with a.expect_event("close"):
        a.close(run_before_unload=True)
    assert dialogs == []


def test_long_and_emoji_names_fit(server, tabs):
    """A 32-character name stays inside the side panels with its unread badge in view; an
    emoji name is counted as the server counts it and its avatar takes whole characters."""
    a = tabs.open(server, viewport={"width": 1024, "height": 700})
    b = tabs.open(server, viewport={"width": 1024, "height": 700})
    long = "W" * 32
    set_nick(b, long)
    expect(members(a)).to_contain_text(long)
    members(b).get_by_role("button").first.click()  # a direct conversation with A
    say(b, "psst")
    entry = a.get_by_test_id("directs").get_by_role("button", name=re.compile(long))
    expect(entry).to_contain_text("1")
    panel = a.locator("#sidebar").bounding_box()
    badge = entry.locator(".badge").bounding_box()
    assert badge["x"] + badge["width"] <= panel["x"] + panel["width"], (badge, panel)
    for side in ("#sidebar", "#members-panel"):
        assert a.evaluate("s => { const e = document.querySelector(s); return e.scrollWidth <= e.clientWidth; }", side)
    flags = "Anna " + "\U0001F1FA\U0001F1E6" * 8  # 21 code points, 37 UTF-16 units
    set_nick(a, flags)
    expect(a.locator("#nick-note")).to_have_text("Saved: you are “%s”." % flags)
    expect(members(b)).to_contain_text(flags)
    set_nick(a, "\U0001F1EF\U0001F1F5 Jo")
    expect(members(b).locator(".avatar").filter(has_text="\U0001F1EF\U0001F1F5J")).to_have_count(1)
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466"  # one symbol, 7 code points
    set_nick(a, family * 5)
    expect(a.locator("#nick-note")).to_have_text(
        "A name is 1 to 32 characters, and this one counts as 35: some emoji count as several.")
    set_nick(a, "x" * 33)
    expect(a.locator("#nick-note")).to_have_text("A name is 1 to 32 characters.")


@pytest.mark.parametrize("width", [360, 700, 1280])
def test_a_long_room_name_is_cut_short_beside_the_leave_button(server, tabs, width):
    """A 64-character room name ends in an ellipsis before the Leave button, on a phone too."""
    a = tabs.open(server, path="/#" + "r" * 64, viewport={"width": width, "height": 700})
    title = a.get_by_test_id("room-title")
    expect(title).to_have_text("#" + "r" * 64)
    assert title.evaluate("e => e.scrollWidth > e.clientWidth"), "cut short"
    room = title.bounding_box()
    leave = a.get_by_test_id("leave").bounding_box()
    assert room["x"] + room["width"] <= leave["x"], (room, leave)


def test_names_the_page_keeps_are_ones_the_server_takes(server, tabs):
    """Saving the default name unchanged keeps nothing for the next visit (that id will be
    someone else's), and a message typed offline before choosing a name is labelled, once
    stored, with the name the others see."""
    tabs.allow_socket_failures()
    a = tabs.open(server)
    b = tabs.open(server)
    a.get_by_label("Your name").press("Enter")  # "Client <id>", as it stands
    expect(a.locator("#nick-note")).to_contain_text("Saved")
    assert a.evaluate("localStorage.getItem('chat.nick')") == ""
    a.reload()
    expect(status(a)).to_have_text("Connected")
    a.wait_for_timeout(300)
    expect(a.locator("#nick-note")).not_to_contain_text("Not changed")

    go_offline(a)
    say(a, "typed by someone unnamed")
    come_back(a)
    seen_by_b = message(b, "typed by someone unnamed").locator(".author")
    expect(seen_by_b).to_have_text(re.compile(r"Client \d+"))
    expect(message(a, "typed by someone unnamed")).to_have_attribute("data-status", "sent")
    expect(message(a, "typed by someone unnamed").locator(".author")).to_have_text(
        seen_by_b.inner_text())


def test_rooms_are_separate_and_links_work(server, tabs):
    """Rooms keep their own messages; "#name" or "name" joins; the hash names the room; unread
    counts; leaving."""
    a = tabs.open(server)
    a.get_by_label("Join or create a room").fill("#kitchen")  # as rooms are written
    a.get_by_label("Join or create a room").press("Enter")
    expect(a.get_by_test_id("room-title")).to_have_text("#kitchen")
    assert a.evaluate("location.hash") == "#kitchen"

    b = tabs.open(server, "/#kitchen")  # a link to the room
    expect(b.get_by_test_id("room-title")).to_have_text("#kitchen")
    expect(members(a).locator("li")).to_have_count(2)
    say(a, "soup is ready")
    expect(message(b, "soup is ready", "kitchen")).to_be_visible()

    # b goes to the lobby; a kitchen message there becomes an unread count.
    b.get_by_test_id("rooms").get_by_role("link", name="lobby").click()
    expect(b.get_by_test_id("room-title")).to_have_text("#lobby")
    say(b, "lobby only")
    expect(message(a, "lobby only", "lobby")).to_have_count(1)
    assert "lobby only" not in texts(a, "kitchen")
    assert "soup is ready" not in texts(b, "lobby")
    say(a, "more soup")
    kitchen_link = b.get_by_test_id("rooms").get_by_role("link", name=re.compile("kitchen"))
    expect(kitchen_link.get_by_test_id("unread")).to_contain_text("1")
    kitchen_link.click()
    expect(message(b, "more soup", "kitchen")).to_be_visible()
    expect(kitchen_link.get_by_test_id("unread")).to_have_count(0)

    b.get_by_test_id("leave").click()
    expect(b.get_by_test_id("room-title")).to_have_text("#lobby")
    expect(b.get_by_test_id("rooms").get_by_role("link")).to_have_count(1)
    expect(members(a).locator("li")).to_have_count(1)  # a still looks at the kitchen


def test_presence_and_typing(server, tabs):
    """The member list follows tabs opening and closing; typing shows in the other tab."""
    a = tabs.open(server)
    b = tabs.open(server)
    set_nick(b, "Bea")
    expect(members(a).locator("li")).to_have_count(2)
    expect(members(a)).to_contain_text("Bea")

    b.get_by_test_id("composer").type("I am wri")
    expect(a.get_by_test_id("typing")).to_have_text("Bea is typing…")

    c = tabs.open(server)
    expect(members(a).locator("li")).to_have_count(3)
    c.context.close()
    expect(members(a).locator("li")).to_have_count(2)
    b.context.close()
    expect(members(a).locator("li")).to_have_count(1)
    expect(members(a)).not_to_contain_text("Bea")
    expect(log(a).get_by_test_id("notice").filter(has_text="Bea left")).to_be_visible()


def test_direct_messages(server, tabs):
    """Clicking a member opens a private conversation; the other side sees it, with a count;
    once the other side is gone, the conversation says it has ended (the focus going from the
    message box, now disabled, to the conversation's log)."""
    a = tabs.open(server)
    b = tabs.open(server)
    set_nick(a, "Ada")
    set_nick(b, "Bea")
    expect(members(a)).to_contain_text("Bea")
    members(a).get_by_role("button", name=re.compile("Bea")).click()
    expect(a.get_by_test_id("room-title")).to_have_text("Bea")
    say(a, "psst, just you")
    dm_a = a.locator('[data-testid="messages"][data-key^="@"]')
    expect(dm_a.get_by_test_id("message").filter(has_text="psst")).to_have_attribute("data-status", "sent")

    directs = b.get_by_test_id("directs")
    expect(directs.get_by_role("button", name=re.compile("Ada"))).to_contain_text("1")
    assert "psst, just you" not in texts(b, "lobby")
    directs.get_by_role("button", name=re.compile("Ada")).click()
    say(b, "got it")
    expect(dm_a.get_by_test_id("message").filter(has_text="got it")).to_be_visible()

    # Bea leaves: the next direct finds no one, and the conversation says it has ended.
    b.context.close()
    # Her socket's end and A's next direct reach the server on two connections: the direct
    # goes once the server has let her go (and told the lobby), or it could still reach her.
    expect(log(a).get_by_test_id("notice").filter(has_text="Bea left")).to_have_count(1)
    say(a, "still there?")
    expect(dm_a.get_by_test_id("message").filter(has_text="still there?")).to_have_attribute(
        "data-status", "failed")
    expect(a.locator("#room-meta")).to_have_text("Ended: Bea is no longer connected")
    expect(a.get_by_test_id("composer")).to_be_disabled()
    expect(dm_a).to_be_focused()  # not lost to the page's start, nor on Close
    a.keyboard.type(" hello")  # the rest of what was being typed: harmless here
    expect(a.get_by_test_id("room-title")).to_have_text("Bea")
    expect(members(a).get_by_role("button")).to_have_count(0)


def test_a_direct_conversation_takes_a_rename_made_while_offline(server, tabs):
    """A rename made while this tab was offline, which no notice brings back, reaches the
    direct conversation's title and entry with the member list after reconnecting."""
    tabs.allow_socket_failures()
    a = tabs.open(server)
    b = tabs.open(server)
    open_direct(a, b, "Ben")
    go_offline(a)
    set_nick(b, "Benjamin")
    expect(b.locator("#nick-note")).to_have_text("Saved: you are “Benjamin”.")
    come_back(a)
    expect(a.get_by_test_id("room-title")).to_have_text("Benjamin")
    expect(a.get_by_test_id("directs")).to_contain_text("Benjamin")
    expect(members(a)).to_contain_text("Benjamin")


def test_direct_messages_typed_offline_go_in_order_without_a_flood(server, tabs):
    """Directs typed while the network was away go out one at a time once it is back: all
    arrive, in the order typed, and more than the rate limit's burst is no flood."""
    tabs.allow_socket_failures()
    a = tabs.open(server)
    b = tabs.open(server)
    open_direct(a, b, "Bea")
    go_offline(a)
    typed = ["dm %02d" % n for n in range(25)]  # 50 requests with their pings; RATE_BURST is 20
    for text in typed:
        say(a, text)
    come_back(a)
    dm_a = a.locator('[data-testid="messages"][data-key^="@"]')
    for text in typed:
        expect(dm_a.get_by_test_id("message").filter(has_text=text)).to_have_attribute(
            "data-status", "sent", timeout=20000)
    dm_b = b.locator('[data-testid="messages"][data-key^="@"]')
    expect(dm_b.locator(".msg-text")).to_have_text(typed)
    assert "flooding" not in server.log()


def test_a_room_the_server_no_longer_takes_goes_with_its_unread_count(start_server, tabs):
    """Restarted with a lower MAX_ROOMS, the server refuses one room's rejoin: that room's
    link, log and unread count go with it, and the page says why."""
    tabs.allow_socket_failures()
    first = start_server(env={"MAX_ROOMS": "3"})  # the lobby and two more
    a = tabs.open(first, "/#one")
    a.get_by_label("Join or create a room").fill("two")
    a.get_by_label("Join or create a room").press("Enter")
    expect(a.get_by_test_id("room-title")).to_have_text("#two")
    b = tabs.open(first, "/#two")
    expect(members(a).locator("li")).to_have_count(2)
    a.get_by_test_id("rooms").get_by_role("link", name="lobby").click()
    say(b, "for the unread count")
    two = a.get_by_test_id("rooms").get_by_role("link", name=re.compile("two"))
    expect(two.get_by_test_id("unread")).to_contain_text("1")
    expect(a).to_have_title(re.compile(r"^\(1\) "))

    first.stop()
    start_server(env={"MAX_ROOMS": "2", "PORT": str(first.port)})
    expect(status(a)).to_have_text("Connected", timeout=RECONNECT)
    expect(a.locator("#toast")).to_contain_text("at most 2 rooms")
    expect(a.get_by_test_id("rooms").get_by_role("link")).to_have_count(2)  # the lobby, #one
    expect(a).to_have_title("#lobby · Chat")
    expect(log(a, "two")).to_have_count(0)


def test_html_in_messages_and_nicks_is_shown_as_text(server, tabs):
    """Markup from the network is text: nothing is parsed and no script runs; CSP is sent."""
    a = tabs.open(server)
    b = tabs.open(server)
    evil = ('<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
            '<b>bold</b> & <a href="javascript:window.pwned=3">link</a>')
    set_nick(a, "<i>Eve</i>")
    say(a, evil)
    expect(message(b, "<script>")).to_be_visible()
    assert texts(b) == [evil]
    expect(members(b)).to_contain_text("<i>Eve</i>")
    expect(message(b, "<script>").locator(".author")).to_have_text("<i>Eve</i>")
    for page in (a, b):
        assert page.locator("#app img, #app script, #app b, #app i, .log a").count() == 0
        assert page.evaluate("window.pwned") is None

    response = a.request.get(server.url + "/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self' ws://127.0.0.1:%d wss://127.0.0.1:%d" % (server.port, server.port) in csp
    assert "<script>" not in response.text() and "<script type=\"module\" src=" in response.text()


def test_right_to_left_text_reads_from_its_own_start(server, tabs):
    """Hebrew or Arabic text and names take their own direction (punctuation at the end a
    reader of them expects), Latin ones stay left to right, in the log, the member list and
    while typing."""
    a = tabs.open(server)
    b = tabs.open(server)
    set_nick(b, "דנה")
    expect(members(a)).to_contain_text("דנה")
    say(b, "שלום!")
    say(b, "hello!")
    direction = "el => getComputedStyle(el).direction"
    hebrew = message(a, "שלום!")
    expect(hebrew).to_be_visible()
    assert hebrew.locator(".msg-text").evaluate(direction) == "rtl"
    assert hebrew.locator(".author").evaluate(direction) == "rtl"
    assert message(a, "hello!").locator(".msg-text").evaluate(direction) == "ltr"
    assert members(a).locator(".member-name", has_text="דנה").evaluate(direction) == "rtl"
    box = a.get_by_test_id("composer")
    box.fill("مرحبا بالعالم؟")
    assert box.evaluate(direction) == "rtl"
    box.fill("hi?")
    assert box.evaluate(direction) == "ltr"


def b_misses_some(server, tabs, first, n):
    """Tabs A and B: both see A's line ``first``, then B goes offline and A says "while B was
    away 0" to n - 1, all stored (so the order of what B says next is the server's)."""
    tabs.allow_socket_failures()
    a = tabs.open(server)
    b = tabs.open(server)
    say(a, first)
    expect(message(b, first)).to_be_visible()
    go_offline(b)
    for i in range(n):
        say(a, "while B was away %d" % i)
    expect(message(a, "while B was away %d" % (n - 1))).to_have_attribute("data-status", "sent")
    return a, b


def test_missed_messages_are_recovered_after_going_offline(server, tabs):
    """A tab that loses its network catches up on reconnect with since/epoch, without
    duplicates, and sends what was typed meanwhile exactly once."""
    a, b = b_misses_some(server, tabs, "before the outage", 3)
    say(b, "typed while offline")
    expect(message(b, "typed while offline")).to_have_attribute("data-status", "pending")
    expect(message(b, "typed while offline")).to_contain_text("waiting for the connection")

    come_back(b)
    expect(message(b, "typed while offline")).to_have_attribute("data-status", "sent")
    expect(message(a, "typed while offline")).to_have_count(1)
    expected = ["before the outage"] + ["while B was away %d" % n for n in range(3)] + ["typed while offline"]
    expect(log(b).locator(".msg-text")).to_have_text(expected)
    say(a, "after B is back")  # a marker: anything duplicated would have arrived before it
    expect(message(b, "after B is back")).to_be_visible()
    assert texts(a) == texts(b) == expected + ["after B is back"]
    assert log(b).get_by_test_id("notice").filter(has_text="starts again").count() == 0


def test_a_gap_the_server_could_not_fill_is_marked(start_server, tabs):
    """A tab away for longer than the server's history reaches back gets the latest
    messages with a notice where the ones it missed would have been, not a seamless log."""
    server = start_server(env={"HISTORY_SIZE": "3"})
    a, b = b_misses_some(server, tabs, "seen by both", 6)
    come_back(b)

    expect(message(b, "while B was away 5")).to_be_visible()
    shown = log(b).locator(".msg-text, [data-testid=notice]")
    expect(shown).to_have_text(["seen by both", re.compile("missed here"), "while B was away 3",
                                "while B was away 4", "while B was away 5"])
    # One that was away for less than the history holds gets no such notice.
    go_offline(a)
    say(b, "while A was away")
    expect(message(b, "while A was away")).to_have_attribute("data-status", "sent")
    come_back(a)
    expect(message(a, "while A was away")).to_be_visible()
    expect(log(a).get_by_test_id("notice").filter(has_text="missed")).to_have_count(0)


def test_messages_typed_faster_than_the_rate_limit_keep_their_order(start_server, clients, tabs):
    """Messages sent faster than RATE_LIMIT all arrive, in the order they were typed, for
    the sender and for everyone else: one refused as rate_limited is not overtaken."""
    server = start_server(env={"RATE_LIMIT": "5", "RATE_BURST": "8"})
    watcher = clients.json(server)
    a = tabs.open(server)
    typed = ["f%02d" % n for n in range(24)]
    box = a.get_by_test_id("composer")
    for text in typed:  # 16 a second: some refused, and tokens come back between them
        box.fill(text)
        box.press("Enter")
        a.wait_for_timeout(60)
    expect(log(a).locator(".msg-text")).to_have_text(typed)
    for text in typed:
        expect(message(a, text)).to_have_attribute("data-status", "sent", timeout=20000)
    received = []
    deadline = time.monotonic() + 10
    while len(received) < len(typed) and time.monotonic() < deadline:
        frame = watcher.quiet(1.0)
        if frame is not None and frame["type"] == "message":
            received.append(frame["text"])
    assert received == typed
    assert texts(a) == typed
    assert "flooding" not in server.log()


def test_a_leave_refused_by_the_rate_limit_is_asked_again(start_server, clients, tabs):
    """A tab that leaves a room right after a burst has its leave refused as rate_limited:
    it asks again once the limit lets it, so the others see it go."""
    server = start_server(env={"RATE_LIMIT": "0.5", "RATE_BURST": "8"})
    watcher = clients.json(server)
    watcher.send(type="join", room="dev")
    watcher.wait("joined")
    a = tabs.open(server, "/#dev")
    arrival = watcher.wait("presence", room="dev", event="join")["member"]
    for n in range(12):  # more than RATE_BURST: the last ones wait, and so does a leave now
        say(a, "burst %d" % n)
    expect(message(a, "burst 11", "dev")).to_have_attribute("data-status", "pending")
    a.once("dialog", lambda dialog: dialog.accept())  # "... not sent yet will be dropped"
    a.get_by_test_id("leave").click()
    expect(a.get_by_test_id("room-title")).to_have_text("#lobby")
    watcher.wait("presence", room="dev", event="leave", member=arrival, timeout=10)
    assert "flooding" not in server.log()


def test_a_server_that_cannot_take_connections_says_why(start_server, tabs):
    """While its Redis is unreachable the server refuses WebSockets with 1013 and a reason;
    the page says so once, not only "Reconnecting…", and keeps trying."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens there once the socket is closed
    server = start_server(env={"REDIS_URL": "redis://127.0.0.1:%d/0" % closed_port})
    tabs.allow_socket_failures()
    a = tabs.open(server, wait=False)
    toast = a.locator("#toast")
    expect(toast).to_contain_text("cannot take connections now", timeout=10000)
    expect(toast).to_contain_text("unreachable")
    expect(status(a)).to_have_text(re.compile("Connecting…|Reconnecting…"))


# Replaces WebSocket so a test can drop the server's acks: as if the connection died between
# the server storing a message and the ack reaching the page.
DROP_ACKS = """
(() => {
  const Native = window.WebSocket;
  window.dropAcks = false;
  window.WebSocket = class extends Native {
    set onmessage(fn) {
      super.onmessage = fn && ((event) => {
        if (window.dropAcks && JSON.parse(event.data).type === "ack") return;
        fn.call(this, event);
      });
    }
    get onmessage() { return super.onmessage; }
  };
})();
"""


def test_message_whose_ack_was_lost_is_resent_with_its_ref_and_not_duplicated(server, tabs):
    """Resending an unacknowledged message after a reconnect reuses its ref; the server keeps
    one copy and both tabs show one."""
    tabs.allow_socket_failures()
    a = tabs.open(server, init_script=DROP_ACKS)
    b = tabs.open(server)
    a.evaluate("window.dropAcks = true")
    say(a, "exactly once please")
    expect(message(b, "exactly once please")).to_be_visible()
    expect(message(a, "exactly once please")).to_have_attribute("data-status", "pending")
    ref = message(a, "exactly once please").get_attribute("data-ref")
    assert re.fullmatch(r"[0-9a-f]{32}", ref)

    go_offline(a)
    a.evaluate("window.dropAcks = false")
    come_back(a)
    expect(message(a, "exactly once please")).to_have_attribute("data-status", "sent")
    say(a, "marker after the resend")
    expect(message(b, "marker after the resend")).to_be_visible()
    assert texts(b) == texts(a) == ["exactly once please", "marker after the resend"]
    assert message(a, "exactly once please").get_attribute("data-ref") == ref


def test_server_restart_both_tabs_reconnect_and_nothing_is_lost(start_server, tabs):
    """The server goes away and comes back on the same port: both tabs reconnect by themselves,
    keep what they showed, deliver what was typed meanwhile once, and chat on; a direct
    conversation from before is shown as ended (ids start again), and a new one works."""
    tabs.allow_socket_failures()
    first = start_server()
    a = tabs.open(first)
    b = tabs.open(first)
    set_nick(b, "Bea")
    members(a).get_by_role("button", name=re.compile("Bea")).click()
    say(a, "private before restart")
    dm = a.locator('[data-testid="messages"][data-key^="@"]')
    expect(dm.get_by_test_id("message").filter(has_text="private")).to_have_attribute("data-status", "sent")
    a.get_by_test_id("rooms").get_by_role("link", name=re.compile("lobby")).click()
    say(a, "before restart from A")
    # Two tabs that send at once are stored in whichever order their frames reach the
    # server: B speaks once A's message is stored, so that the order below is the server's.
    expect(message(a, "before restart from A")).to_have_attribute("data-status", "sent")
    say(b, "before restart from B")
    expect(message(a, "before restart from B")).to_be_visible()
    expect(message(b, "before restart from A")).to_be_visible()

    first.stop()
    expect(status(a)).to_have_text("Reconnecting…")
    expect(status(b)).to_have_text("Reconnecting…")
    say(a, "typed while the server was down")
    expect(message(a, "typed while the server was down")).to_have_attribute("data-status", "pending")

    second = start_server(env={"PORT": str(first.port)})
    expect(status(a)).to_have_text("Connected", timeout=RECONNECT)
    expect(status(b)).to_have_text("Connected", timeout=RECONNECT)
    expect(message(b, "typed while the server was down")).to_be_visible()
    expect(message(a, "typed while the server was down")).to_have_attribute("data-status", "sent")
    # The new server's history starts afresh; the pages keep the old messages above a seam.
    expect(log(b).get_by_test_id("notice").filter(has_text="starts again")).to_have_count(1)

    say(b, "after restart from B")
    expect(message(a, "after restart from B")).to_be_visible()
    say(a, "after restart from A")
    expect(message(b, "after restart from A")).to_be_visible()
    expected = ["before restart from A", "before restart from B", "typed while the server was down",
                "after restart from B", "after restart from A"]
    assert texts(a) == texts(b) == expected
    assert second.port == first.port

    # Ids start again at 1 on the new server, so the old conversation's id may name someone
    # else now: it has ended, and says so; Bea, found again in the lobby, is a new one.
    old_dm = a.get_by_test_id("directs").get_by_role("button", name=re.compile("Bea"))
    expect(old_dm).to_contain_text("ended")
    old_dm.click()
    expect(a.locator("#room-meta")).to_have_text(
        "Ended: the server restarted, and ids now name other people")
    expect(a.get_by_test_id("composer")).to_be_disabled()
    expect(members(a).get_by_role("button")).to_have_count(0)  # no way back to that id
    a.get_by_test_id("rooms").get_by_role("link", name=re.compile("lobby")).click()
    members(a).get_by_role("button", name=re.compile("Bea")).click()
    expect(a.get_by_test_id("composer")).to_be_enabled()
    expect(a.locator("#room-meta")).to_have_text("Direct message, online")
    say(a, "private after restart")
    # Bea sees both: the old one ended, the new one with the new message.
    expect(b.locator('[data-testid="directs"] .nav-item.ended')).to_have_count(1)
    b.locator('[data-testid="directs"] .nav-item:not(.ended)').click()
    expect(b.locator('[data-testid="messages"][data-key^="@"]:visible').get_by_test_id("message")
           ).to_have_text([re.compile("private after restart")])


def test_recipe_pages_say_hello_world_to_each_other(server, tabs):
    """Two /websocket pages (the recipe's demo, plain text) log each other's Hello World!."""
    logs = {1: [], 2: []}
    pages = {}
    for n in (1, 2):
        pages[n] = tabs.open(server, "/websocket", wait=False)
        pages[n].on("console", lambda msg, n=n: logs[n].append(msg.text))
        server.wait_for_log(r"New connection! \(%d\)" % n)
    wait_until(pages[1], lambda: 'Client 2 says "Hello World!"' in logs[1], 5, "page 1 to hear client 2")
    wait_until(pages[2], lambda: 'Client 1 says "Hello World!"' in logs[2], 5, "page 2 to hear client 1")
    assert "Client 2 connected." in logs[1]
    assert not any("Client 1 says" in line for line in logs[1])  # the sender hears nothing back


def test_phone_width_keyboard_and_screen_reader_basics(server, tabs):
    """At phone width nothing overflows and the panels are drawers; the page works by
    keyboard alone and names its regions for screen readers."""
    a = tabs.open(server, viewport={"width": 375, "height": 740}, touch=True)
    assert a.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert a.evaluate("document.activeElement === document.body")  # no keyboard popping up
    expect(a.locator("#sidebar")).not_to_be_visible()
    expect(a.get_by_role("textbox", name="Message #lobby")).to_be_visible()
    expect(a.get_by_role("log", name="Messages in #lobby")).to_have_attribute("aria-live", "polite")
    expect(a.get_by_role("status")).to_have_text("Connected")

    # Keyboard only: the skip link leads to the message box; Enter sends.
    a.keyboard.press("Tab")
    expect(a.get_by_role("link", name="Skip to the message box")).to_be_focused()
    a.keyboard.press("Enter")
    expect(a.get_by_test_id("composer")).to_be_focused()
    a.keyboard.type("typed with the keyboard")
    a.keyboard.press("Enter")
    expect(message(a, "typed with the keyboard")).to_have_attribute("data-status", "sent")

    # The rooms drawer opens from its button, takes focus, and Escape gives it back.
    toggle = a.get_by_role("button", name="Rooms", exact=True)
    toggle.focus()
    a.keyboard.press("Enter")
    expect(a.locator("#sidebar")).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(a.get_by_label("Your name")).to_be_focused()
    a.keyboard.press("Escape")
    expect(a.locator("#sidebar")).not_to_be_visible()
    expect(toggle).to_be_focused()

    # Join a room by keyboard through the drawer.
    a.keyboard.press("Enter")
    a.get_by_label("Join or create a room").focus()
    a.keyboard.type("phones")
    a.keyboard.press("Enter")
    expect(a.get_by_test_id("room-title")).to_have_text("#phones")
    expect(a.get_by_test_id("composer")).to_be_focused()
    assert a.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_unread_messages_show_on_the_rooms_button_of_a_phone(server, tabs):
    """On a phone the room and direct lists are behind the Rooms button, so it carries the
    unread count (as the tab title does) until they are read."""
    a = tabs.open(server, viewport={"width": 360, "height": 740}, touch=True)
    b = tabs.open(server)
    expect(members(b).get_by_role("button")).to_have_count(1)  # A (B itself is no button)
    members(b).get_by_role("button").click()
    say(b, "psst")
    toggle = a.locator("#rooms-toggle")
    expect(toggle.get_by_test_id("rooms-unread")).to_be_visible()
    expect(toggle).to_have_accessible_name("Rooms 1 unread message")
    say(b, "and again")
    expect(toggle.get_by_test_id("rooms-unread")).to_have_text("2 unread messages")
    toggle.click()
    a.get_by_test_id("directs").get_by_role("button", name=re.compile("Client")).click()
    expect(a.locator('[data-testid="messages"][data-key^="@"]')).to_contain_text("and again")
    expect(toggle.get_by_test_id("rooms-unread")).to_have_count(0)
    expect(toggle).to_have_accessible_name("Rooms")


CLIENT_UNIT = open(os.path.join(os.path.dirname(__file__), "page_helpers", "client_unit.js")).read()


def test_protocol_client_on_its_own(server, browser):
    """client.js without the page: backoff with jitter, the URL, resend with the same ref,
    recovery with since/epoch, dedupe across a server restart, dead-socket detection, a
    message refused as over the rate limit sent again after a pause, and direct messages:
    held while offline, never sent twice, ended when the peer is gone or the server restarts,
    one at a time; a gap a catch-up could not fill is marked; an ack does not move `since`;
    while rate limited, no typing notices, a refused leave or catch-up asked again, and
    messages held for their room's join; a rejoin refused as unavailable asked again."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(server.url + "/healthz")  # same origin, no page script
        out = page.evaluate(CLIENT_UNIT)
    finally:
        context.close()
    assert out["backoffLow"] == [250, 500, 1000, 2000, 2500, 2500, 2500]
    assert all(lo <= hi < 2 * lo + 1 for lo, hi in zip(out["backoffLow"], out["backoffHigh"]))
    assert out["urls"] == ["wss://chat.example:8443/ws", "ws://127.0.0.1:8080/ws"]
    assert out["protocol"] == "chat.v1"
    assert out["firstSend"]["type"] == "message" and re.fullmatch(r"[0-9a-f]{32}", out["firstSend"]["ref"])
    assert out["stateAfterDrop"] == "waiting"
    ref = out["firstSend"]["ref"]
    assert out["reconnectFrames"] == [["join", "lobby", 1, "e1"], ["message", ref]]
    assert out["afterRecovery"] == ["one:sent", "mine:sent", "three:sent"]
    assert out["lastId"] == 3
    assert out["restartJoin"] == {"type": "join", "room": "lobby", "since": 3, "epoch": "e1",
                                  "ref": "join:lobby"}
    assert out["afterRestart"] == ["one:sent", "mine:sent", "three:sent", "--", "new one:sent",
                                   "new three:sent"]
    assert out["reconnects"] == 3 and out["pendingLeft"] == 0
    assert out["heartbeat"] == {"pinged": True, "closed": True, "sockets": 2}
    assert out["rateLimited"] == {"status": "pending", "sendsBeforePause": 1, "sends": 2,
                                  "joinKept": True, "joins": 2}
    d = out["directs"]
    assert d["unconfirmed"] == ["failed", "the connection dropped before it was confirmed; "
                                          "it may not have arrived"]
    assert d["offline"] == "pending"
    assert d["resent"] == [[5, "typed offline"]] and d["offlineAfter"] == "sent"
    assert d["gone"] == ["failed", "Bob is no longer connected", "Bob is no longer connected",
                         "failed"]
    assert d["newBob"] is True
    assert d["restart"] == ["the server restarted, and ids now name other people", "failed",
                            "the server restarted, and ids now name other people", 0]
    assert d["incomingAfterRestart"] == [True, "Dee", 2]
    assert d["rateLimited"] == ["pending", 1, 2, "sent", 0]
    assert out["tooBig"] == ["failed", "too long for this server", ["after it"]]
    assert out["gap"] == {"joins": [[2, "g1"], [2, "g1"]],
                          "shown": ["one", "two", "--Some messages", "seven", "eight", "nine"],
                          "afterRestart": ["--The server's", "twenty"]}
    assert out["acked"] == [1, ["one", "two", "mine"]]
    assert out["unavailable"] == [[4, 4], True, False, "pending", 0, ["typed while away"]]
    assert out["limited"] == {"typing": [1, 1, 2], "messageBeforeJoined": 0,
                              "messageAfterJoined": ["typed while joining"], "leaves": [2, 1],
                              "heartbeat": [[], 0]}
    assert out["lane"] == [["d one"], ["d one", "d two"], "sent", "failed", 0]
