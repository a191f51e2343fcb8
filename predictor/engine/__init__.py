"""The engine: everything that owns the model and its decode loop, and how the server talks to it.

The process boundary runs through this package:
  - `scheduler`: `Engine`, the bounded queue and the one worker thread that admits rows
    between decoding steps;
  - `running_batch`: `RunningBatch`, the rows being decoded, each in a cache slot of its own,
    and the per-row sampler;
  - `decode_step`: the slot cache and the decoding step over it, compiled with `--compile`;
  - `core`: the engine core process (`--engine_process`), which runs an `Engine` and the
    vision encoder and nothing else;
  - `client`: `RemoteEngine`, the server process's side of that process (admission, futures,
    text deltas, death);
  - `transfer`: the shared arena rows' pixel patches cross the boundary in;
  - `loading`: reading a checkpoint (dtype, device, quantization) into a `LoadedModel`;
  - `generation`: `Generator`, the model with its processor, stop rules and text;
  - `grammar`: guided decoding's matchers and the logit mask of constrained rows;
  - `vision` and `patch_embedding`: the vision encoder, eager, on a CUDA stream of its own.
In the in-process layout the server builds an `Engine` itself; with the engine process it
builds a `RemoteEngine`, and the core builds the `Engine`. The request path sees the same
`reserve` / `submit` either way.

It may import the contract (`predictor.errors`, `params`, `protocol`, `rows`, `settings`,
`metrics`) and `predictor.inputs`; never the model, the routes or the server, so the engine
core process loads none of the front's code.
"""
