// A minimal chat.v1 client for the lobby: connect, show messages, send.
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const list = document.getElementById("messages");
const status = document.getElementById("status");
const form = document.getElementById("composer");
const input = document.getElementById("text");
let ws;

function show(who, text) {
  const item = document.createElement("li");
  const name = document.createElement("strong");
  name.textContent = who;
  item.append(name, ": ", text);
  list.append(item);
  item.scrollIntoView({ block: "end" });
}

function connect(delay = 500) {
  ws = new WebSocket(`${scheme}//${location.host}/ws`, "chat.v1");
  ws.addEventListener("open", () => { delay = 500; });
  ws.addEventListener("message", (e) => {
    const msg = JSON.parse(e.data);
    switch (msg.type) {
      case "welcome":
        status.textContent = `Connected as ${msg.nick}`;
        list.replaceChildren();
        msg.history.forEach((m) => show(m.from.nick, m.text));
        break;
      case "message":
        show(msg.from.nick, msg.text);
        break;
      case "presence":
        if (msg.event !== "nick") show("•", `${msg.member.nick} ${msg.event === "join" ? "joined" : "left"}`);
        break;
      case "error":
        show("error", msg.message);
        break;
      default:
        break;
    }
  });
  ws.addEventListener("close", () => {
    const wait = Math.min(delay * 2, 5000) * (0.5 + Math.random() / 2);
    status.textContent = "Disconnected, reconnecting…";
    setTimeout(() => connect(Math.min(delay * 2, 5000)), wait);
  });
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (ws.readyState !== WebSocket.OPEN || !input.value.trim()) return;
  ws.send(JSON.stringify({ type: "message", room: "lobby", text: input.value }));
  show("you", input.value);
  input.value = "";
});

connect();
