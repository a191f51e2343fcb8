"""The built-in web playground at `GET /ui`: describe images from a browser.

Plain HTML, CSS and JavaScript shipped inside the package (no build step, no CDN: it works on
an air-gapped cluster). The page talks to the server only through the public OpenAI routes
(`/v1/chat/completions` with streaming, `/v1/models`), so it exercises what clients use; the
server's defaults and limits, which no public route reports, are written into the page.

It may import the contract only (`predictor.params`, `predictor.settings`).
"""
