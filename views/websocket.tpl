<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Websocket Chat Server</title>
  <script type="module" src="/static/recipe.js"></script>
</head>
<body>
  <h1>Websocket Chat Server</h1>
  <p>Open the browser console, then open this page in a second window: the two say
     <q>Hello World!</q> to each other every 3 seconds.</p>
</body>
</html>
