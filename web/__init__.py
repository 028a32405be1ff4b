"""Pages for labelers and operators: a small Starlette app over the gRPC API.

What lives here: the ASGI app (app.py), its sessions and CSRF tokens (sessions.py), the
gRPC calls it makes (backend.py), what it renders (render.py: sanitised markdown, the
dashboard's figures and chart), its config (config.py), Jinja templates and the JS/CSS it
serves (templates/, static/: written here, nothing from a CDN).

It may import instructloop.clients (the SDK's request builders), the generated stubs
(instructloop.v1) and Starlette. It must not import serve/, learner/ or Redis: everything
it shows or changes goes through the public and Admin gRPC services, with the signed-in
user's own credential, so the server's auth, roles, audit and rate limits apply as to any
other client.
"""
