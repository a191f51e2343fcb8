"""The front process: KServe's ModelServer with the predictor's routes, limits, door and drain.

It owns:
  - `main`: flags, the model's load, the app's assembly and `serve` (`python -m predictor`);
  - `kserve_servers`: KServe's REST and gRPC servers with our protocol, interceptors and limits;
  - `admission`: the door that answers 503 before a request reaches the app;
  - `http_limits` and `request_limits`: header, body and message limits and deadlines;
  - `drain`: what SIGTERM does; `health`: liveness and readiness that tell the truth;
  - `logs`: one line per request or refusal; `rest`: the v2 `infer` and config routes;
  - `grpc_model_config` and `triton_config`: Triton's model configuration on both protocols;
  - `openapi`: the OpenAPI document of every route.

It sits on top: it may import every other package of the predictor but the clients
(`describe`, `canary`), and nothing imports it but `predictor.__main__`.
"""
