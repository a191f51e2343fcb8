"""OpenAI-compatible chat completions, served by the same engine as the v2 protocol.

Layout after vLLM's: `protocol` holds the request and response schemas, `serving` the logic
(no web framework), and `router` turns results into JSON or Server-Sent Events. An
`image_url` becomes bytes in `predictor.inputs.image_urls`, under the server's rules.

It may import the contract, `predictor.inputs`, `predictor.engine` (its admission) and
`predictor.model`; never the server, which mounts its routes.
"""
