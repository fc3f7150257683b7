<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Chat</title>
  <link rel="stylesheet" href="/static/chat.css">
  <script type="module" src="/static/chat.js"></script>
</head>
<body>
  <header>
    <h1>Chat</h1>
    <p id="status" role="status" aria-live="polite">Connecting…</p>
  </header>
  <main>
    <ol id="messages" aria-live="polite" aria-label="Messages in lobby"></ol>
    <form id="composer">
      <label for="text">Message</label>
      <input id="text" name="text" autocomplete="off" required maxlength="4000">
      <button type="submit">Send</button>
    </form>
  </main>
</body>
</html>
