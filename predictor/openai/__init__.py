"""OpenAI-compatible chat completions, served by the same engine as the v2 protocol.

Layout after vLLM's: `protocol` holds the request and response schemas, `serving` the logic
(no web framework), `router` turns results into JSON or Server-Sent Events, and `image_urls`
turns an `image_url` into bytes under the server's rules.
"""
