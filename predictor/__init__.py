"""qwen-vl-predictor: a KServe model server that describes images with Qwen-VL models.

The root of the package is the contract every part shares, and the `kserve.Model`:
  - `errors` (what can go wrong, mapped to HTTP and gRPC codes), `settings` (every flag),
    `params` (generation parameters and request limits), `protocol` (the OIP v2 contract),
    `rows` (the unit of work between the front and the engine), `metrics` (the collectors),
    `cancellation` (stopping an HTTP request's work when its client leaves);
  - `model`: `QwenVLModel`, the `kserve.Model` that turns requests into rows for the engine.

The packages, lowest first; each may import the contract and the packages before it, never
one after it (tests/test_layout.py reads every import and enforces this):
  - `inputs`: untrusted bytes to model inputs (images, the processor's work, remote images);
  - `engine`: the model, its vision encoder and the decode loop, in this process or its own;
  - `model` (the module above), then `openai` and `ui`: the routes beside the v2 ones;
  - `server`: the front process that assembles all of it behind KServe's ModelServer.
`describe` and `canary` are clients that import nothing else of the predictor.
"""

__version__ = "0.1.0"
