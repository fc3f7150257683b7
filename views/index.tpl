<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
  <meta name="color-scheme" content="light dark">
  <title>Chat</title>
  <link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
  <link rel="stylesheet" href="/static/chat.css">
  <link rel="modulepreload" href="/static/client.js">
  <script type="module" src="/static/chat.js"></script>
</head>
<body>
  <a class="skip-link" href="#composer-text">Skip to the message box</a>
  <div class="app" id="app" data-panel="none">
    <header class="topbar">
      <button type="button" class="toggle rooms-toggle" id="rooms-toggle"
              aria-controls="sidebar" aria-expanded="false">
        <span aria-hidden="true" class="burger"></span>Rooms
      </button>
      <h1 class="brand"><span class="brand-mark" aria-hidden="true"></span>Chat</h1>
      <div class="status" id="status" data-state="connecting">
        <span class="status-dot" aria-hidden="true"></span>
        <span id="status-text" role="status" data-testid="status">Connecting…</span>
        <span id="status-countdown" aria-hidden="true"></span>
        <button type="button" class="link-button" id="retry" hidden>Retry now</button>
      </div>
      <button type="button" class="toggle members-toggle" id="members-toggle"
              aria-controls="members-panel" aria-expanded="false">
        Members <span id="members-toggle-count" class="count" data-testid="members-toggle-count"></span>
      </button>
    </header>

    <nav class="sidebar panel" id="sidebar" aria-label="Rooms and direct messages">
      <button type="button" class="panel-close" aria-label="Close the rooms panel" data-testid="close-rooms">×</button>
      <form class="nick-form" id="nick-form" autocomplete="off">
        <label for="nick" class="field-label">Your name</label>
        <div class="field-row">
          <input id="nick" name="nick" dir="auto" maxlength="64" autocomplete="nickname" spellcheck="false"
                 data-testid="nick" aria-describedby="nick-note">
          <button type="submit" class="button subtle">Save</button>
        </div>
        <p id="nick-note" class="field-note" aria-live="polite"></p>
      </form>

      <h2 class="section-title" id="rooms-title">Rooms</h2>
      <ul class="nav-list" id="rooms" aria-labelledby="rooms-title" data-testid="rooms"></ul>
      <form class="join-form" id="join-form" autocomplete="off">
        <label for="join-room" class="field-label">Join or create a room</label>
        <div class="field-row">
          <input id="join-room" name="room" maxlength="65" pattern="#?[A-Za-z0-9_.\-]{1,64}"
                 placeholder="room-name" spellcheck="false" aria-describedby="join-note"
                 data-testid="join-room">
          <button type="submit" class="button subtle">Join</button>
        </div>
        <p id="join-note" class="field-note" aria-live="polite">Letters, digits, dash, dot or underscore</p>
      </form>

      <h2 class="section-title" id="directs-title">Direct messages</h2>
      <ul class="nav-list" id="directs" aria-labelledby="directs-title" data-testid="directs"></ul>
      <p class="empty-note" id="directs-empty">Pick someone in the member list to talk privately.</p>
    </nav>

    <main class="chat" id="chat" aria-labelledby="room-title">
      <div class="room-bar">
        <div class="room-heading">
          <h2 id="room-title" dir="auto" data-testid="room-title"># lobby</h2>
          <p id="room-meta" class="room-meta"></p>
        </div>
        <button type="button" class="button subtle" id="leave" data-testid="leave">Leave room</button>
      </div>
      <div class="logs" id="logs"></div>
      <div class="composer-area">
        <p class="typing" id="typing" data-testid="typing"></p>
        <form class="composer" id="composer" autocomplete="off">
          <label for="composer-text" class="visually-hidden" id="composer-label">Message #lobby</label>
          <textarea id="composer-text" name="text" dir="auto" rows="1" maxlength="4000" required
                    placeholder="Message #lobby" aria-describedby="composer-help"
                    data-testid="composer"></textarea>
          <button type="submit" class="button primary" id="send">Send</button>
        </form>
        <p class="composer-help" id="composer-help"><kbd>Enter</kbd> to send, <kbd>Shift</kbd> + <kbd>Enter</kbd> for a new line</p>
      </div>
    </main>

    <aside class="members panel" id="members-panel" aria-labelledby="members-title">
      <button type="button" class="panel-close" aria-label="Close the member list" data-testid="close-members">×</button>
      <h2 class="section-title" id="members-title">Members</h2>
      <ul class="member-list" id="members" aria-labelledby="members-title" data-testid="members"></ul>
      <p class="empty-note" id="members-more"></p>
    </aside>
    <div class="scrim" id="scrim" hidden></div>
  </div>
  <p class="toast" id="toast" role="alert" data-testid="toast" hidden></p>
</body>
</html>
