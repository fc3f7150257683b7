// The Ratchet recipe's page script, in plain text mode: no subprotocol, console only.
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const conn = new WebSocket(`${scheme}//${location.host}/ws`);

conn.addEventListener("open", () => {
  console.log("Connection established!");
  helloWorldPing();
});

function helloWorldPing() {
  if (conn.readyState === conn.OPEN) {
    conn.send("Hello World!");
    setTimeout(helloWorldPing, 3000);
  }
}

conn.addEventListener("message", (e) => {
  console.log(e.data);
});
