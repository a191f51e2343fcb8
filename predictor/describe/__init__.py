"""`qwen-vl-describe`: caption a folder of images against a running predictor.

Why a client in the server's package: users caption whole datasets, and doing that well
(concurrency, retries while a pod restarts, resume after Ctrl-C, outputs that are never half
written) is the same work for every user. The modules, one job each:

- `files`: which images to describe, and where their sidecar captions go;
- `outputs`: what is already done, and writing captions atomically (sidecar `.txt`, JSONL);
- `protocols`: one small client class per wire protocol behind one interface;
- `retry`: exponential backoff with jitter, honouring `Retry-After`;
- `runner`: the thread pool, progress bar and counts;
- `cli`: flags, the summary and the exit code.
"""
