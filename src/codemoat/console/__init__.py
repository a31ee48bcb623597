"""The admin console at /admin: server-rendered pages (Jinja2, escaped by default), SVG charts drawn
on the server, no script and no external resource, so it works on an air-gapped network."""
