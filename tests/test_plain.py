"""The Ratchet recipe's behaviour for plain-text clients, word for word, with its bugs fixed."""
import re

import pytest


def test_others_are_told_when_a_client_connects(server, clients):
    """`Client N connected.` reaches the others, naming the newcomer (the recipe named the receiver)."""
    a = clients.plain(server)
    b = clients.plain(server)
    told = a.recv()
    assert re.fullmatch(r"Client \d+ connected\.", told)
    c = clients.plain(server)
    third = a.recv()
    assert b.recv() == third
    assert third != told
    assert c.quiet() is None


def test_message_names_the_sender_and_is_not_nested(server, clients):
    """`Client N says "..."` names the sender, and repeated messages do not nest the text."""
    a, b, c = clients.plain(server), clients.plain(server), clients.plain(server)
    a.recv()  # b's arrival
    c_id = re.fullmatch(r"Client (\d+) connected\.", a.recv()).group(1)
    assert b.recv() == "Client %s connected." % c_id
    for _ in range(3):
        c.send("Hello World!")
        want = 'Client %s says "Hello World!"' % c_id
        assert a.recv() == want
        assert b.recv() == want
    assert c.quiet() is None, "the sender gets nothing back"


def test_disconnect_is_announced(server, clients):
    """`Client N disconnected.` reaches the others when N goes."""
    a = clients.plain(server)
    b = clients.plain(server)
    b_id = re.fullmatch(r"Client (\d+) connected\.", a.recv()).group(1)
    b.close()
    assert a.recv() == "Client %s disconnected." % b_id


def test_server_logs_new_connection(server, clients):
    """The server prints the recipe's `New connection! (N)` on standard output; the line for
    its end names its address too, which the access log has."""
    a = clients.plain(server)
    n = re.search(r"New connection! \((\d+)\)", server.wait_for_log(r"New connection! \(\d+\)")).group(1)
    port = a.ws.sock.getsockname()[1]
    a.close()
    server.wait_for_log(r"Connection %s from 127\.0\.0\.1:%d closed \(1000\)" % (n, port))


def test_unicode_and_quotes_pass_through_verbatim(server, clients):
    """Text is relayed exactly, quotes and non-ASCII included."""
    a, b = clients.plain(server), clients.plain(server)
    b_id = re.fullmatch(r"Client (\d+) connected\.", a.recv()).group(1)
    b.send('She said "héllo" 👋')
    assert a.recv() == 'Client %s says "She said "héllo" 👋"' % b_id


@pytest.mark.parametrize("blank", ["", "   ", "\t\n", "\u3000"])
def test_empty_frame_is_ignored(server, clients, blank):
    """An empty or blank text frame says nothing to anyone: a JSON client could not send it
    (its `text` must show something), and JSON clients in the lobby would get it as one."""
    a, b, j = clients.plain(server), clients.plain(server), clients.json(server)
    a.recv(), a.recv()  # b and j connected
    b.send(blank)
    b.send("after")
    assert a.recv().endswith('says "after"')
    assert j.wait("message")["text"] == "after"


def test_binary_frame_closes_with_1003(server, clients):
    """Plain text has no binary messages: the server closes with 1003 and a reason."""
    a = clients.plain(server)
    a.ws.send_binary(b"\x00\x01")
    closed = a.recv_until_closed()
    assert closed.code == 1003
    assert "binary" in closed.reason


@pytest.mark.parametrize("n", [1, 5])
def test_plain_and_json_clients_share_the_lobby(server, clients, n):
    """A JSON client's message reaches plain clients as `Client N says "..."`, and back."""
    p = clients.plain(server)
    j = clients.json(server)
    assert p.recv() == "Client %d connected." % j.id
    for i in range(n):
        j.send(type="message", room="lobby", text="hi %d" % i, ref="r%d" % i)
        assert p.recv() == 'Client %d says "hi %d"' % (j.id, i)
        assert j.wait("ack")["ref"] == "r%d" % i
    p.send("from plain")
    msg = j.wait("message")
    assert msg["text"] == "from plain"
    assert msg["room"] == "lobby"
    assert msg["from"]["id"] != j.id
